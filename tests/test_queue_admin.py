"""`mta queue list|show|flush|hold|release|requeue|delete` against a running `mta serve`.

The daemon is a real subprocess delivering to a smarthost: a RecordingPeer on
127.0.0.2 whose RCPT replies each test scripts (451 to defer, a hang to keep a
delivery in progress, the default 250 to deliver). Retries are an hour apart,
so only an operator's command can make deferred mail go again within a test.
The CLI runs as asyncio subprocesses: the peer keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mta.model import NewMessage, RcptState, Recipient
from mta.store.sqlite.store import SQLiteStore
from tests.support.daemon import mta_command, start_daemon, subprocess_env, wait_listening
from tests.support.ports import free_port
from tests.support.smtp_peer import RecordingPeer
from tests.support.waiting import wait_until
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(30)

PAD = " " * 45
DEFER = "451 4.3.0 try again later"
BODY = b"Subject: admin test\r\nFrom: lab@lab.test\r\n\r\nhello\r\n"


@dataclass
class Script:
    """How the peer answers RCPT TO, per recipient address: a reply, "hang", or 250."""

    rcpt: dict[str, str] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, verb: str, arg: str, conn: object) -> str | None:
        if verb != "RCPT":
            return None
        address = arg.partition("<")[2].partition(">")[0]
        action = self.rcpt.get(address)
        if action == "hang":
            await self.release.wait()
            action = self.rcpt.get(address)  # what the test wants by the time it is released
            return None if action == "hang" else action
        return action


@dataclass
class Daemon:
    proc: object
    port: int
    config: Path
    db: Path
    peer: RecordingPeer
    script: Script

    async def submit(self, *recipients: str, body: bytes = BODY) -> str:
        async with await Wire.connect("127.0.0.1", self.port) as w:
            reply = await w.mail("lab@lab.test", list(recipients), body)
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        return reply.rsplit(" ", 1)[1]

    async def mta(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *mta_command("queue", *args, "--config", str(self.config)), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=subprocess_env(TZ="UTC"))
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    def rows(self, query: str, *args: object) -> list[tuple]:
        with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as db, db:
            return db.execute(query, args).fetchall()

    def states(self, queue_id: str) -> list[tuple[str, str, int]]:
        return self.rows("SELECT address, state, attempts FROM recipients WHERE message_id = ?"
                         " ORDER BY rcpt_no", queue_id)

    def events(self, queue_id: str) -> list[tuple[str, str]]:
        return self.rows("SELECT recipient, event FROM history WHERE message_id = ? ORDER BY time, rowid",
                         queue_id)

    async def wait_state(self, queue_id: str, expected: list[tuple[str, str, int]],
                         timeout: float = 8.0) -> None:
        await wait_until(lambda: self.states(queue_id) == expected, timeout,
                         lambda: f"{queue_id}: {self.states(queue_id)} != {expected}")


@pytest.fixture
async def daemon(write_config, tmp_path) -> AsyncIterator[Daemon]:
    script = Script()
    port = free_port()
    db = tmp_path / "queue.db"
    async with RecordingPeer("127.0.0.2", free_port("127.0.0.2"), replies=script) as peer:
        config = write_config({
            "hostname": "relay.lab.test",
            "listeners": [{"name": "mta", "address": f"127.0.0.1:{port}", "mode": "relay"}],
            "queue": {"path": str(db)},
            "metrics": {"address": None},
            "delivery": {
                "smarthost": f"127.0.0.2:{peer.port}",
                "retry": {"min_backoff": "1h", "max_backoff": "1h"},
                "connection_cache": {"idle_timeout": "0.2s"},
                "timeouts": {"connect": "2s", "command": "20s"},
            },
        })
        proc = start_daemon(config, tmp_path / "mta.log")
        try:
            await wait_listening(port, proc)
            yield Daemon(proc, port, config, db, peer, script)
        finally:
            script.release.set()
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # keep the peer answering the daemon's QUITs
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)


def mailq_head(d: Daemon, queue_id: str, mark: str) -> str:
    [(size, arrival)] = d.rows("SELECT size, arrival FROM messages WHERE id = ?", queue_id)
    when = time.strftime("%a %b %d %H:%M:%S", time.gmtime(arrival))
    return f"{queue_id + mark:<13} {size:>8} {when}  lab@lab.test"


def utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S +0000", time.gmtime(t))


# --------------------------------------------------------------------------- list

async def test_list_marks_active_deferred_and_held_mail(daemon):
    d = daemon
    d.script.rcpt.update({"busy@remote.test": "hang", "later@remote.test": DEFER, "held@remote.test": DEFER})
    assert await d.mta("list") == (0, "Mail queue is empty\n", "")
    assert await d.mta("list", "--json") == (0, "", "")

    active = await d.submit("busy@remote.test")
    deferred = await d.submit("later@remote.test")
    held = await d.submit("held@remote.test")
    await d.wait_state(active, [("busy@remote.test", "active", 0)])
    await d.wait_state(deferred, [("later@remote.test", "deferred", 1)])
    await d.wait_state(held, [("held@remote.test", "deferred", 1)])
    assert await d.mta("hold", held) == (0, f"{held}: held 1 recipient\n", "")
    [(reason,)] = d.rows("SELECT last_error FROM recipients WHERE message_id = ?", deferred)
    assert reason.startswith("451 4.3.0 ") and "try again later" in reason

    code, out, err = await d.mta("list")
    assert (code, err) == (0, "")
    sizes = dict(d.rows("SELECT id, size FROM messages"))
    kbytes = (sum(sizes.values()) + 1023) // 1024
    assert out.splitlines() == [
        "-Queue ID-    --Size-- ----Arrival Time---- -Sender/Recipient-------",
        mailq_head(d, active, "*"),
        f"{PAD}busy@remote.test [active]",
        "",
        mailq_head(d, deferred, ""),
        f"{PAD}({reason})",
        f"{PAD}later@remote.test [deferred]",
        "",
        mailq_head(d, held, "!"),
        f"{PAD}({reason})",
        f"{PAD}held@remote.test [held]",
        "",
        f"-- {kbytes} Kbytes in 3 Requests.",
    ]

    code, out, err = await d.mta("list", "--json")
    assert (code, err) == (0, "")
    info = {mid: (arrival, size, next_attempt) for mid, arrival, size, next_attempt in d.rows(
        "SELECT m.id, m.arrival, m.size, r.next_attempt FROM messages m"
        " JOIN recipients r ON r.message_id = m.id")}

    def obj(queue_name, queue_id, address, state, attempts, **extra):
        arrival, size, next_attempt = info[queue_id]
        return {"queue_name": queue_name, "queue_id": queue_id, "arrival_time": int(arrival),
                "message_size": size, "sender": "lab@lab.test",
                "recipients": [{"address": address, "state": state, "attempts": attempts,
                                "next_attempt": int(next_attempt), **extra}]}

    assert [json.loads(line) for line in out.splitlines()] == [
        obj("active", active, "busy@remote.test", "active", 0),
        obj("deferred", deferred, "later@remote.test", "deferred", 1, delay_reason=reason),
        obj("hold", held, "held@remote.test", "held", 1, delay_reason=reason),
    ]
    # Retries are an hour away.
    assert info[deferred][2] > time.time() + 3000

    # The active delivery finishes (250): that message leaves the list.
    d.script.release.set()
    await d.peer.wait_for_messages(1, timeout=8)
    await wait_until(lambda: d.states(active) == [], 8.0)
    code, out, _ = await d.mta("list", "--json")
    assert [json.loads(line)["queue_id"] for line in out.splitlines()] == [deferred, held]


# --------------------------------------------------------------------------- show

async def test_show_prints_envelope_history_and_headers(daemon):
    d = daemon
    d.script.rcpt.update({"later@remote.test": DEFER})
    queue_id = await d.submit("later@remote.test", "ok@remote.test")
    await d.wait_state(queue_id, [("later@remote.test", "deferred", 1), ("ok@remote.test", "delivered", 1)])
    [(arrival, size, data)] = d.rows("SELECT arrival, size, data FROM messages JOIN bodies ON message_id = id WHERE id = ?", queue_id)
    [(next_later, reason), (next_ok, _)] = d.rows(
        "SELECT next_attempt, last_error FROM recipients WHERE message_id = ? ORDER BY rcpt_no", queue_id)
    history = d.rows("SELECT time, recipient, event, detail FROM history WHERE message_id = ?"
                     " ORDER BY time, rowid", queue_id)
    assert sorted((r, e) for _, r, e, _ in history) == [("later@remote.test", "deferred"),
                                                         ("ok@remote.test", "sent")]
    header_section, _, body = data.partition(b"\r\n\r\n")
    assert header_section.startswith(b"Received: from client.test") and body == b"hello\r\n"

    code, out, err = await d.mta("show", queue_id.lower())  # ids are case-insensitive
    assert (code, err) == (0, "")
    envelope = [
        f"queue_id:   {queue_id}",
        "sender:     <lab@lab.test>",
        f"arrival:    {utc(arrival)}",
        f"size:       {size}",
        "client:     127.0.0.1",
        "listener:   mta",
        "helo:       client.test",
        "auth_user:  -",
        "recipients:",
        f"  <later@remote.test> deferred attempts=1 next_attempt={utc(next_later)}",
        f"    last_error: {reason}",
        f"  <ok@remote.test> delivered attempts=1 next_attempt={utc(next_ok)}",
        "history:",
        *(f"  {utc(t)} <{r}> {e} {detail}" for t, r, e, detail in history),
        "message:",
    ]
    lines = out.splitlines()
    assert lines[:16] == envelope
    assert lines[16:] == header_section.decode().split("\r\n")
    assert "hello" not in out

    code, out, err = await d.mta("show", queue_id, "--body")
    assert (code, err) == (0, "")
    assert out.splitlines()[16:] == data.decode().split("\r\n")[:-1]
    assert out.endswith("\n\nhello\n")


# --------------------------------------------------------------------------- hold / release

async def test_hold_keeps_due_mail_and_release_delivers_it(daemon):
    d = daemon
    d.script.rcpt["bob@remote.test"] = DEFER
    queue_id = await d.submit("bob@remote.test")
    await d.wait_state(queue_id, [("bob@remote.test", "deferred", 1)])
    d.script.rcpt.clear()  # the peer would accept now

    assert await d.mta("hold", queue_id.lower()) == (0, f"{queue_id}: held 1 recipient\n", "")
    # Due since long ago, and flushed: a held recipient is still never tried.
    d.rows("UPDATE recipients SET next_attempt = 0 WHERE message_id = ?", queue_id)
    assert await d.mta("flush") == (0, "flushed 0 recipients in 0 messages\n", "")
    assert await d.mta("flush", queue_id) == (0, f"{queue_id}: flushed 0 recipients\n", "")
    await asyncio.sleep(2.2)  # two polls of the queue manager
    assert d.states(queue_id) == [("bob@remote.test", "held", 1)]
    assert d.peer.messages == [] and d.peer.counts["RCPT"] == 1
    assert await d.mta("hold", queue_id) == (0, f"{queue_id}: held 0 recipients\n", "")  # already held

    started = time.monotonic()
    assert await d.mta("release", queue_id) == (0, f"{queue_id}: released 1 recipient\n", "")
    [message] = await d.peer.wait_for_messages(1, timeout=5)
    assert time.monotonic() - started < 3
    assert message.rcpts == ["bob@remote.test"]
    await wait_until(lambda: d.states(queue_id) == [], 8.0)  # delivered: the message is gone
    assert await d.mta("release", queue_id) == (1, "", f"mta: queue: {queue_id}: no such message\n")


async def held_during_delivery(d: Daemon) -> str:
    """A message to slow@remote.test, held while its delivery hangs at RCPT."""
    d.script.rcpt["slow@remote.test"] = "hang"
    queue_id = await d.submit("slow@remote.test")
    await d.wait_state(queue_id, [("slow@remote.test", "active", 0)])
    assert await d.mta("hold", queue_id) == (0, f"{queue_id}: held 1 recipient\n", "")
    return queue_id


async def test_hold_during_delivery_keeps_a_deferred_recipient_held(daemon):
    d = daemon
    queue_id = await held_during_delivery(d)
    d.script.rcpt["slow@remote.test"] = DEFER
    d.script.release.set()  # the attempt in progress ends with 451
    await wait_until(lambda: ("slow@remote.test", "deferred") in d.events(queue_id), 8.0)
    assert d.states(queue_id) == [("slow@remote.test", "held", 1)]
    code, out, _ = await d.mta("list")
    assert out.splitlines()[1].startswith(f"{queue_id}!")


async def test_hold_and_release_during_delivery_delivers_once(daemon):
    # Released while its attempt is still running, the recipient is due again and
    # claimed again; the queue manager must not start a second delivery of it.
    d = daemon
    queue_id = await held_during_delivery(d)
    assert await d.mta("release", queue_id) == (0, f"{queue_id}: released 1 recipient\n", "")
    await asyncio.sleep(2.2)  # two polls of the queue manager: a second claim has happened
    assert d.peer.counts["RCPT"] == 1
    d.script.rcpt.clear()
    d.script.release.set()  # the attempt in progress goes on and is accepted
    [message] = await d.peer.wait_for_messages(1, timeout=5)
    assert message.rcpts == ["slow@remote.test"]
    await wait_until(lambda: d.states(queue_id) == [], 8.0)
    await asyncio.sleep(1.2)
    assert len(d.peer.messages) == 1 and d.peer.counts["RCPT"] == 1


# --------------------------------------------------------------------------- flush

async def test_flush_makes_deferred_mail_go_within_a_second(daemon):
    d = daemon

    def first_rcpt_fails(verb, arg, conn):  # 451 to each recipient's first RCPT, then 250
        if verb == "RCPT":
            seen.append(arg)
            return DEFER if seen.count(arg) == 1 else None
        return None

    seen: list[str] = []
    d.peer.replies = first_rcpt_fails
    one = await d.submit("one@remote.test")
    two = await d.submit("two@remote.test")
    await d.wait_state(one, [("one@remote.test", "deferred", 1)])
    await d.wait_state(two, [("two@remote.test", "deferred", 1)])
    await asyncio.sleep(1.2)
    assert d.peer.messages == []  # nothing is due for an hour

    assert await d.mta("flush", one) == (0, f"{one}: flushed 1 recipient\n", "")
    flushed = time.monotonic()
    [message] = await d.peer.wait_for_messages(1, timeout=5)
    assert message.rcpts == ["one@remote.test"]
    assert time.monotonic() - flushed < 2.0  # the queue manager polls every second
    await wait_until(lambda: d.states(one) == [], 8.0)
    assert d.states(two) == [("two@remote.test", "deferred", 1)]

    assert await d.mta("flush") == (0, "flushed 1 recipient in 1 message\n", "")
    await d.peer.wait_for_messages(2, timeout=5)
    assert d.peer.messages[1].rcpts == ["two@remote.test"]
    await wait_until(lambda: d.rows("SELECT count(*) FROM messages") == [(0,)], 8.0)
    assert await d.mta("list") == (0, "Mail queue is empty\n", "")


# --------------------------------------------------------------------------- requeue

async def test_requeue_retries_now_and_keeps_the_attempt_count(daemon):
    d = daemon
    d.script.rcpt["bob@remote.test"] = DEFER
    queue_id = await d.submit("bob@remote.test")
    await d.wait_state(queue_id, [("bob@remote.test", "deferred", 1)])

    assert await d.mta("requeue", queue_id) == (0, f"{queue_id}: requeued 1 recipient\n", "")
    await d.wait_state(queue_id, [("bob@remote.test", "deferred", 2)], timeout=5)  # tried again at once
    assert d.events(queue_id) == [("bob@remote.test", "deferred"), ("bob@remote.test", "requeued"),
                                  ("bob@remote.test", "deferred")]

    d.script.rcpt.clear()
    assert await d.mta("requeue", queue_id) == (0, f"{queue_id}: requeued 1 recipient\n", "")
    [message] = await d.peer.wait_for_messages(1, timeout=5)
    assert message.rcpts == ["bob@remote.test"]
    await wait_until(lambda: d.states(queue_id) == [], 8.0)


# --------------------------------------------------------------------------- delete

async def test_delete_one_then_all(daemon):
    d = daemon
    d.script.rcpt.update({f"r{i}@remote.test": DEFER for i in range(3)})
    ids = [await d.submit(f"r{i}@remote.test") for i in range(3)]
    for i, queue_id in enumerate(ids):
        await d.wait_state(queue_id, [(f"r{i}@remote.test", "deferred", 1)])

    assert await d.mta("delete", ids[0].lower()) == (0, f"{ids[0]}: deleted\n", "")
    assert d.rows("SELECT count(*) FROM history WHERE message_id = ?", ids[0]) == [(0,)]
    assert d.states(ids[0]) == []
    code, out, _ = await d.mta("list", "--json")
    assert [json.loads(line)["queue_id"] for line in out.splitlines()] == ids[1:]

    code, out, err = await d.mta("delete")
    assert code == 2 and "give message ids or --all" in err
    code, out, err = await d.mta("delete", "--all", ids[1])
    assert code == 2 and out == ""

    assert await d.mta("delete", "--all") == (0, "deleted 2 messages\n", "")
    assert d.rows("SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM recipients),"
                  " (SELECT count(*) FROM history)") == [(0, 0, 0)]
    assert await d.mta("list") == (0, "Mail queue is empty\n", "")
    # The daemon goes on: new mail is still accepted and delivered.
    d.script.rcpt.clear()
    await d.submit("fresh@remote.test")
    await d.peer.wait_for_messages(1, timeout=5)


# --------------------------------------------------------------------------- errors

async def test_unknown_ids_are_reported_and_the_rest_processed(daemon):
    d = daemon
    d.script.rcpt["bob@remote.test"] = DEFER
    queue_id = await d.submit("bob@remote.test")
    await d.wait_state(queue_id, [("bob@remote.test", "deferred", 1)])

    for action in ("hold", "release", "flush", "requeue"):
        code, out, err = await d.mta(action, "0BADBADBAD00", queue_id, "nosuch")
        assert code == 1, action
        assert err == "mta: queue: 0BADBADBAD00: no such message\nmta: queue: nosuch: no such message\n"
        assert out.startswith(f"{queue_id}: ") and out.count("\n") == 1
    assert await d.mta("show", "0badbadbad00") == (1, "", "mta: queue: 0badbadbad00: no such message\n")
    assert await d.mta("delete", "0BADBADBAD00") == (1, "", "mta: queue: 0BADBADBAD00: no such message\n")
    assert await d.mta("delete", "0BADBADBAD00", queue_id) == (
        1, f"{queue_id}: deleted\n", "mta: queue: 0BADBADBAD00: no such message\n")
    assert d.states(queue_id) == []
    assert [e for _, e in d.rows("SELECT 1, event FROM history")] == []


@pytest.mark.parametrize("argv", [("list",), ("show", "0A1B2C3D4E01"), ("flush",), ("hold", "0A1B2C3D4E01"),
                                  ("delete", "--all")])
async def test_no_queue_file(tmp_path, argv):
    db = tmp_path / "queue.db"
    config = tmp_path / "mta.yaml"
    config.write_text(f"queue:\n  path: {db}\nmetrics:\n  address: off\n")
    proc = await asyncio.create_subprocess_exec(
        *mta_command("queue", *argv, "--config", str(config)), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=subprocess_env())
    out, err = await proc.communicate()
    assert (proc.returncode, out) == (1, b"")
    assert err.decode() == f"mta: queue: {db}: no queue database (has the daemon run?)\n"
    assert not db.exists()


# --------------------------------------------------------------------------- ids in any case
# (queue_summary against the listing, on both backends: tests/test_store_admin.py)

async def test_config_before_the_command_and_ids_in_any_case(tmp_path):
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    try:
        await store.queue.enqueue(NewMessage(
            id="0C0000000001", sender="a@lab.test", recipients=(Recipient("r0@remote.test", state=RcptState.HELD),),
            data=b"x" * 10, arrival=1_700_000_001))
    finally:
        await store.close()
    # --config before the command, ids in any case: the same as everywhere else.
    config = tmp_path / "mta.yaml"
    config.write_text(f"queue:\n  path: {tmp_path / 'queue.db'}\nmetrics:\n  address: off\n")
    proc = await asyncio.create_subprocess_exec(
        *mta_command("--config", str(config), "queue", "release", "0c0000000001"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=subprocess_env())
    out, err = await proc.communicate()
    assert (proc.returncode, out, err) == (0, b"0C0000000001: released 1 recipient\n", b"")
