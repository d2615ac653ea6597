"""`mta queue export` / `mta queue import` (issue 16): a SQLite queue with its mailboxes
moved into PostgreSQL and back, through the real command line, with real SQLite files
and the tests' own PostgreSQL cluster."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import yaml

from mta.model import MailboxCopy, NewMessage, RcptState, Recipient
from mta.store.api import HistoryEntry, RecipientUpdate, new_queue_id
from mta.store.sqlite.store import SQLiteStore
from tests.support.backends import BACKENDS, QueueBackend
from tests.support.daemon import Daemon, mta_command, subprocess_env
from tests.support.messages import message
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(60)

LATER = time.time() + 3600   # deferred mail's next attempt: not due while the tests run


def mta(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mta_command(*args), capture_output=True, text=True, env=subprocess_env(), timeout=60)


def mta_bytes(*args: str) -> bytes:
    done = subprocess.run(mta_command(*args), capture_output=True, env=subprocess_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def sqlite_config(tmp_path: Path, name: str, queue: Path) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"queue": {"path": str(queue)}}))
    return path


def postgresql_config(tmp_path: Path, dsn: str) -> Path:
    path = tmp_path / "postgresql.yaml"
    path.write_text(yaml.safe_dump({"queue": {"backend": "postgresql", "dsn": dsn}}))
    return path


class Source:
    """The ids of the messages build_source() queued."""

    def __init__(self) -> None:
        self.deferred = self.held = self.bounce = self.multi = ""
        self.local: list[str] = []


def _copy(mailbox: str, m: NewMessage) -> MailboxCopy:
    return MailboxCopy(mailbox, m.id, m.sender, m.data.split(b"\r\n")[0].decode()[9:],
                       b"Delivered-To: " + mailbox.lower().encode() + b"\r\n" + m.data, arrival=m.arrival)


async def build_source(path: Path) -> Source:
    """A SQLite queue as a daemon stopped mid-work leaves it: deferred mail (one recipient
    delivered, one deferred, with RFC 3461 parameters and history), held mail, a bounce
    waiting to go, a message with a bounced, a deferred and an in-flight recipient, and
    lab mailboxes (a copy removed, so ids have a gap; one entry read, one tagged)."""
    ids = Source()
    store = SQLiteStore(path)
    await store.open()
    try:
        q = store.queue
        deferred = NewMessage(
            id=new_queue_id(), sender="alice@lab.test",
            recipients=(Recipient("x@example.org", notify="SUCCESS,FAILURE", orcpt="rfc822;X@example.org"),
                        Recipient("y@example.org")),
            data="Subject: d\u00e9j\u00e0 vu\r\n\r\n8bit body \u00e9\r\n".encode(), arrival=1_700_000_000.25,
            client="10.0.0.5", listener="submission", helo="client.lab.test", auth_user="alice", smtputf8=True,
            body_8bit=True, ret="HDRS", envid="ENV-1")
        held = message(2)
        bounce = NewMessage(id=new_queue_id(), sender="", recipients=(Recipient("a@lab.test"),),
                            data=b"Subject: Undelivered Mail Returned to Sender\r\n\r\nsorry\r\n",
                            arrival=1_700_000_003.5, listener="bounce")
        multi = message(4, rcpts=("p@example.org", "q@example.org", "r@example.org"))
        local = [message(5, rcpts=("alice@lab.test", "Bob@lab.test")), message(6, rcpts=("alice@lab.test",)),
                 message(7, rcpts=("carol@lab.test",))]
        for m in (deferred, held, bounce, multi, *local):
            await q.enqueue(m)
        now = 1_700_000_100.0
        await q.claim(now, 100)
        await q.record_outcomes(
            deferred.id, [RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None),
                          RecipientUpdate(1, RcptState.DEFERRED, 1, LATER, "451 4.4.1 try later")], now,
            history=[HistoryEntry(now, "x@example.org", "sent", "250 2.0.0 ok"),
                     HistoryEntry(now, "y@example.org", "deferred", "451 4.4.1 try later")], delay_warned=True)
        await q.give_back(held.id, [0])
        await store.admin.hold([held.id], now, detail="by operator")
        await q.give_back(bounce.id, [0])
        # p bounced, q deferred, r left in flight (the daemon stopped mid-delivery).
        await q.record_outcomes(
            multi.id, [RecipientUpdate(0, RcptState.BOUNCED, 1, 0.0, "550 5.1.1 unknown user"),
                       RecipientUpdate(1, RcptState.DEFERRED, 1, LATER, "421 4.4.2 timeout")], now,
            history=[HistoryEntry(now, "p@example.org", "bounced", "550 5.1.1 unknown user")])
        for m in local:
            await q.record_outcomes(
                m.id, [RecipientUpdate(i, RcptState.DELIVERED, 1, 0.0, None) for i in range(len(m.recipients))],
                now, mailbox_copies=[_copy(r.address, m) for r in m.recipients])
        [first, _second] = await store.mailboxes.messages("alice@lab.test")
        assert await store.mailboxes.delete("alice@lab.test", [first.id]) == 1   # bob keeps that message
        await store.inbox.set_read([local[1].id], True)
        await store.inbox.set_tags([local[0].id], ["lab", "urgent"])
        ids.deferred, ids.held, ids.bounce, ids.multi = deferred.id, held.id, bounce.id, multi.id
        ids.local = [m.id for m in local]
    finally:
        await store.close()
    return ids


async def recover(path: Path) -> None:
    """What the next daemon start does to the in-flight recipient (for comparing listings)."""
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.queue.recover_in_flight()
    finally:
        await store.close()


def views(config: Path, ids: list[str]) -> dict[str, bytes]:
    """What an operator sees of a queue through the CLI: listings, every message, every mailbox."""
    seen = {"list": mta_bytes("queue", "list", "--config", str(config)),
            "list --json": mta_bytes("queue", "list", "--json", "--config", str(config)),
            "mailboxes": mta_bytes("mailbox", "list", "--config", str(config))}
    for queue_id in ids:
        seen[f"show {queue_id}"] = mta_bytes("queue", "show", queue_id, "--body", "--config", str(config))
    for box in ("alice@lab.test", "bob@lab.test", "carol@lab.test"):
        seen[f"mailbox {box}"] = mta_bytes("mailbox", "list", box, "--json", "--config", str(config))
        listing = json.loads(seen[f"mailbox {box}"].splitlines()[0])
        seen[f"show {box}"] = mta_bytes("mailbox", "show", box, listing["uidl"], "--config", str(config))
    return seen


def inbox_marks(path: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT e.id, e.read, group_concat(t.tag) FROM inbox e LEFT JOIN inbox_tags t"
                          " ON t.no = e.no GROUP BY e.id ORDER BY e.id").fetchall()


def records(dump: Path) -> list[dict[str, Any]]:
    """The dump's records after its header (which says when and from where)."""
    return [json.loads(line) for line in dump.read_bytes().splitlines()[1:]]


# --------------------------------------------------------------------------- SQLite -> PostgreSQL -> SQLite


def test_sqlite_to_postgresql_and_back_keeps_every_row_and_byte(tmp_path: Path, postgres_dsn: str) -> None:
    source = tmp_path / "source.db"
    ids = asyncio.run(build_source(source))
    old, pg = sqlite_config(tmp_path, "old", source), postgresql_config(tmp_path, postgres_dsn)

    dump = tmp_path / "queue.export"
    done = mta("queue", "export", str(dump), "--config", str(old))
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "exported 4 messages (7 recipients), 3 mailbox copies\n", "")
    assert dump.stat().st_mode & 0o777 == 0o600
    lines = dump.read_bytes().splitlines()
    header = json.loads(lines[0])
    assert (header["format"], header["version"], header["source"]) == ("mta-queue-export", 1, "sqlite")
    exported = records(dump)
    assert [r["type"] for r in exported] == ["message"] * 4 + ["copy"] * 3 + ["end"]
    assert exported[-1] == {"type": "end", "messages": 4, "recipients": 7, "copies": 3}
    by_id = {r["id"]: r for r in exported if r["type"] == "message"}
    # The in-flight recipient is written as due again; the rest as they were.
    assert [(r["address"], r["state"], r["attempts"]) for r in by_id[ids.multi]["recipients"]] == [
        ("p@example.org", "bounced", 1), ("q@example.org", "deferred", 1), ("r@example.org", "queued", 0)]
    d = by_id[ids.deferred]
    assert (d["sender"], d["arrival"], d["client"], d["listener"], d["helo"], d["auth_user"], d["smtputf8"],
            d["body_8bit"], d["ret"], d["envid"], d["delay_warned"]) == (
        "alice@lab.test", 1_700_000_000.25, "10.0.0.5", "submission", "client.lab.test", "alice", True, True,
        "HDRS", "ENV-1", True)
    assert d["recipients"][0]["notify"] == "SUCCESS,FAILURE"
    assert d["recipients"][0]["orcpt"] == "rfc822;X@example.org"
    assert d["recipients"][1]["last_error"] == "451 4.4.1 try later"
    assert base64.b64decode(d["data"]) == "Subject: d\u00e9j\u00e0 vu\r\n\r\n8bit body \u00e9\r\n".encode()
    assert [h["event"] for h in d["history"]] == ["sent", "deferred"]
    assert by_id[ids.bounce]["listener"] == "bounce" and by_id[ids.bounce]["sender"] == ""
    copies = [(r["mailbox"], r["queue_id"], r["read"], r["tags"]) for r in exported if r["type"] == "copy"]
    assert copies == [("bob@lab.test", ids.local[0], False, ["lab", "urgent"]),
                      ("alice@lab.test", ids.local[1], True, []), ("carol@lab.test", ids.local[2], False, [])]

    done = mta("queue", "import", str(dump), "--config", str(pg))
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "imported 4 messages (7 recipients), 3 mailbox copies\n", "")
    # Again: everything is there already (an interrupted import may be run again).
    done = mta("queue", "import", str(dump), "--config", str(pg))
    assert (done.returncode, done.stdout) == (
        0, "imported 0 messages (0 recipients), 0 mailbox copies, skipped 7 already present\n")

    # What PostgreSQL holds, exported again, is the same records.
    again = tmp_path / "again.export"
    done = mta("queue", "export", str(again), "--config", str(pg))
    assert (done.returncode, done.stdout) == (0, "exported 4 messages (7 recipients), 3 mailbox copies\n")
    assert json.loads(again.read_bytes().splitlines()[0])["source"] == "postgresql"

    # And back into a fresh SQLite file: the operator sees the same queue and mailboxes, byte for byte.
    back = tmp_path / "back.db"
    new = sqlite_config(tmp_path, "new", back)
    done = mta("queue", "import", str(again), "--config", str(new))
    assert (done.returncode, done.stdout) == (0, "imported 4 messages (7 recipients), 3 mailbox copies\n")
    asyncio.run(recover(source))
    everything = [ids.deferred, ids.held, ids.bounce, ids.multi]
    seen = views(old, everything)
    assert views(pg, everything) == seen
    assert views(new, everything) == seen
    assert inbox_marks(back) == inbox_marks(source) == [
        (ids.local[0], 0, "lab,urgent"), (ids.local[1], 1, None), (ids.local[2], 0, None)]
    assert records(again) == exported


# --------------------------------------------------------------------------- into a store in use


@pytest.mark.parametrize("backend", BACKENDS)
async def test_ids_taken_in_the_target_are_given_new_ones(tmp_path: Path, backend: str,
                                                          request: pytest.FixtureRequest) -> None:
    """Importing into a store that has mail of its own: a queue id another message has, and
    mailbox copy ids (part of POP3 UIDLs) that are taken, get new ones; the rest are kept."""
    source = tmp_path / "source.db"
    ids = await build_source(source)
    dump = tmp_path / "queue.export"
    done = await asyncio.to_thread(mta, "queue", "export", str(dump), "--config",
                                   str(sqlite_config(tmp_path, "old", source)))
    assert done.returncode == 0, done.stderr
    if backend == "sqlite":
        target = await QueueBackend.sqlite(tmp_path / "target.db")
        config = sqlite_config(tmp_path, "new", tmp_path / "target.db")
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        target = await QueueBackend.postgresql(dsn)
        config = postgresql_config(tmp_path, dsn)
    try:
        other = NewMessage(id=ids.deferred, sender="zed@lab.test", recipients=(Recipient("k@example.org"),),
                           data=b"Subject: other\r\n\r\n.\r\n", arrival=1_600_000_000.0)
        await target.queue.enqueue(other)
        for m in (message(8, rcpts=("dave@lab.test",)), message(9, rcpts=("dave@lab.test",))):
            await target.queue.enqueue(m)
            await target.queue.claim(2e9, 10)
            await target.queue.record_outcomes(m.id, [RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None)], 2e9,
                                               mailbox_copies=[_copy("dave@lab.test", m)])
        await target.queue.give_back(other.id, [0])

        done = await asyncio.to_thread(mta, "queue", "import", str(dump), "--config", str(config))
        assert done.returncode == 0, done.stderr
        [renamed, summary] = done.stdout.splitlines()
        assert summary == "imported 4 messages (7 recipients), 3 mailbox copies"
        match = re.fullmatch(rf"{ids.deferred}: its queue id is another message's here: imported as ([0-9A-F]{{12}})",
                             renamed)
        assert match is not None, renamed
        assert sorted(await target.query("SELECT id, sender FROM messages WHERE sender IN ('zed@lab.test',"
                                         " 'alice@lab.test')")) == sorted(
            [(ids.deferred, "zed@lab.test"), (match[1], "alice@lab.test")])
        # Copies 3 and 4 keep their ids; 2 is taken here, so bob's copy gets one above the file's highest.
        assert await target.query("SELECT id, mailbox FROM mailbox_messages ORDER BY id") == [
            (1, "dave@lab.test"), (2, "dave@lab.test"), (3, "alice@lab.test"), (4, "carol@lab.test"),
            (5, "bob@lab.test")]
    finally:
        await target.close()


# --------------------------------------------------------------------------- bad files


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    source = tmp_path / "source.db"
    asyncio.run(build_source(source))
    path = tmp_path / "queue.export"
    assert mta("queue", "export", str(path), "--config", str(sqlite_config(tmp_path, "old", source))).returncode == 0
    return path


def _import_into_fresh(tmp_path: Path, dump: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    target = tmp_path / "target.db"
    return mta("queue", "import", str(dump), "--config", str(sqlite_config(tmp_path, "new", target))), target


def _messages(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as db:
        return [str(r[0]) for r in db.execute("SELECT id FROM messages ORDER BY id")]


def test_a_truncated_file_is_refused_at_its_line_after_the_whole_messages(tmp_path: Path, dump: Path) -> None:
    lines = dump.read_bytes().splitlines(keepends=True)
    wanted = [json.loads(line)["id"] for line in lines[1:3]]
    dump.write_bytes(b"".join(lines[:3]) + lines[3][:100])   # cut inside the third message
    done, target = _import_into_fresh(tmp_path, dump)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"mta: queue import: {dump}: line 4: the line is cut off (the file is truncated);"
                           " imported 2 messages (3 recipients), 0 mailbox copies before it\n")
    assert _messages(target) == sorted(wanted)   # nothing of the third

    dump.write_bytes(b"".join(lines[:-1]))       # cut at a line end: the end record is missing
    done, target = _import_into_fresh(tmp_path, dump)
    assert done.returncode == 1
    assert done.stderr == (f"mta: queue import: {dump}: line {len(lines)}: the file ends without its end record"
                           " (it is truncated); imported 2 messages (4 recipients), 3 mailbox copies, skipped 2"
                           " already present before it\n")


def test_a_garbled_line_is_named_and_nothing_of_its_message_is_stored(tmp_path: Path, dump: Path) -> None:
    lines = dump.read_bytes().splitlines(keepends=True)
    for bad, reason in [(b"{not json\n", "not a JSON object (the file is damaged or truncated)"),
                        (lines[2].replace(b'"data":"', b'"data":"!'), "'data' is not base64"),
                        (lines[2].replace(b'"state":"queued"', b'"state":"lost"').replace(
                            b'"state":"held"', b'"state":"lost"'),
                         "recipient state 'lost' is not one of queued, deferred, held, delivered, bounced"),
                        (lines[2].replace(b'"attempts":', b'"attempts":"x",' b'"x":'), "'attempts' is \"x\", not an integer")]:
        dump.write_bytes(b"".join([lines[0], lines[1], bad, *lines[3:]]))
        target = tmp_path / "target.db"
        target.unlink(missing_ok=True)
        done, target = _import_into_fresh(tmp_path, dump)
        assert done.returncode == 1, done.stdout
        assert done.stderr == (f"mta: queue import: {dump}: line 3: {reason}; imported 1 message (2 recipients),"
                               " 0 mailbox copies before it\n")
        assert _messages(target) == [json.loads(lines[1])["id"]]


def test_a_file_that_is_no_export_creates_no_queue(tmp_path: Path) -> None:
    target = tmp_path / "target.db"
    config = sqlite_config(tmp_path, "new", target)
    cases = {"missing": None, "empty": b"", "other": b'{"format": "mbox"}\n',
             "newer": b'{"format": "mta-queue-export", "version": 2}\n'}
    expected = {"missing": "No such file or directory",
                "empty": "line 1: the file is empty (not an mta queue export); nothing imported from it",
                "other": 'line 1: not an mta queue export (no "format": "mta-queue-export" header);'
                         " nothing imported from it",
                "newer": "line 1: format version 2: this mta reads version 1; nothing imported from it"}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        done = mta("queue", "import", str(path), "--config", str(config))
        assert (done.returncode, done.stdout, done.stderr) == (1, "", f"mta: queue import: {path}: {expected[name]}\n")
        assert not target.exists()


def test_export_to_standard_output_and_import_from_standard_input(tmp_path: Path, dump: Path) -> None:
    source = tmp_path / "source.db"
    out = subprocess.run(mta_command("queue", "export", "-", "--config", str(sqlite_config(tmp_path, "old", source))),
                         capture_output=True, env=subprocess_env(), timeout=60)
    assert out.returncode == 0
    assert out.stderr == b"exported 4 messages (7 recipients), 3 mailbox copies\n"
    assert [json.loads(line) for line in out.stdout.splitlines()[1:]] == records(dump)
    target = tmp_path / "target.db"
    done = subprocess.run(mta_command("queue", "import", "-", "--config", str(sqlite_config(tmp_path, "new", target))),
                          input=out.stdout, capture_output=True, env=subprocess_env(), timeout=60)
    assert (done.returncode, done.stdout) == (0, b"imported 4 messages (7 recipients), 3 mailbox copies\n")


# --------------------------------------------------------------------------- a queue in use


async def test_export_is_refused_while_a_daemon_serves_the_sqlite_queue(tmp_path: Path) -> None:
    source = tmp_path / "queue.db"
    await build_source(source)
    daemon = Daemon(tmp_path, {"hostname": "relay.lab.test", "queue": {"path": str(source)},
                               "listeners": [{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"}],
                               "metrics": {"address": None}})
    await daemon.started()
    try:
        assert daemon.proc is not None
        out = tmp_path / "queue.export"
        done = await asyncio.to_thread(mta, "queue", "export", str(out), "--config", str(daemon.config_path))
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == (f"mta: queue export: {source} is in use by mta pid {daemon.proc.pid}: stop it first"
                               " (mail arriving or being delivered during the export would be missed or delivered"
                               " twice)\n")
        assert not out.exists() and list(tmp_path.glob(".queue.export*")) == []
    finally:
        assert await daemon.terminate() == 0
    done = await asyncio.to_thread(mta, "queue", "export", str(out), "--config", str(daemon.config_path))
    assert done.returncode == 0, done.stderr


async def test_export_is_refused_while_a_node_uses_the_database(tmp_path: Path, postgres_dsn: str) -> None:
    from mta.store.postgresql.engine import PgEngine
    from mta.store.postgresql.queue import PostgreSQLQueue

    pg = postgresql_config(tmp_path, postgres_dsn)
    out = tmp_path / "queue.export"
    engine = PgEngine(postgres_dsn)
    await engine.open()
    try:
        queue = PostgreSQLQueue(engine, node="node-a", lease=60.0)
        await queue.enqueue(message(1))
        # A node runs: it listens for new mail (PgEngine.listen), as every node does.
        listening = asyncio.Event()
        engine.listen("mta_new_mail", lambda _payload: listening.set())
        await asyncio.wait_for(listening.wait(), 10)
        done = await asyncio.to_thread(mta, "queue", "export", str(out), "--config", str(pg))
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == ("mta: queue export: 1 mta node is connected to this database: stop"
                               " every node first (mail arriving or being delivered during the export would be"
                               " missed or delivered twice)\n")
        assert not out.exists()
    finally:
        await engine.close()
    # A node died mid-delivery: its lease still runs.
    engine = PgEngine(postgres_dsn)
    await engine.open()
    try:
        await PostgreSQLQueue(engine, node="node-a", lease=60.0).claim(time.time(), 10)
    finally:
        await engine.close()
    done = await asyncio.to_thread(mta, "queue", "export", str(out), "--config", str(pg))
    assert done.returncode == 1
    assert done.stderr.startswith("mta: queue export: recipients are being delivered by node node-a (leases until ")
    assert done.stderr.endswith("): stop every node first, or wait until those leases end\n")
    assert not out.exists()


# --------------------------------------------------------------------------- end to end


async def test_deferred_mail_moved_into_postgresql_is_delivered_by_a_node(tmp_path: Path, postgres_dsn: str,
                                                                         dns_server: Any, peer_port: int) -> None:
    """The move as the README tells it: a node runs on the database, the old daemon is stopped,
    its queue is exported and imported; the node delivers the deferred mail, keeps the held
    mail held, and the bytes the next hop gets are the bytes accepted."""
    source = tmp_path / "old.db"
    store = SQLiteStore(source)
    await store.open()
    try:
        due = NewMessage(id=new_queue_id(), sender="alice@lab.test", recipients=(Recipient("z@routed.test"),),
                         data=b"Subject: moved\r\n\r\nacross backends\r\n", arrival=time.time() - 600,
                         client="10.0.0.5", listener="mta")
        held = message(2, rcpts=("w@routed.test",))
        await store.queue.enqueue(due)
        await store.queue.enqueue(held)
        await store.queue.claim(time.time(), 10)
        await store.queue.record_outcomes(due.id, [RecipientUpdate(0, RcptState.DEFERRED, 1, time.time() - 1,
                                                                   "421 4.4.2 peer went away")], time.time())
        await store.queue.give_back(held.id, [0])
        await store.admin.hold([held.id], time.time())
    finally:
        await store.close()
    dump = tmp_path / "queue.export"
    done = await asyncio.to_thread(mta, "queue", "export", str(dump), "--config",
                                   str(sqlite_config(tmp_path, "old", source)))
    assert done.stdout == "exported 2 messages (2 recipients), 0 mailbox copies\n", done.stderr

    from tests.support.smtp_peer import RecordingPeer
    async with RecordingPeer("127.0.0.3", peer_port) as peer:
        node = Daemon(tmp_path, {
            "hostname": "node-a.lab.test",
            "listeners": [{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"}],
            "metrics": {"address": None},
            "queue": {"backend": "postgresql", "dsn": postgres_dsn, "path": str(tmp_path / "node-a" / "queue.db")},
            "delivery": {"routes": {"routed.test": f"127.0.0.3:{peer_port}"},
                         "dns": {"nameservers": ["127.0.0.1"], "port": dns_server.port, "timeout": "2s"},
                         "timeouts": {"connect": "2s", "command": "5s"}}})
        await node.started()
        try:
            done = await asyncio.to_thread(mta, "queue", "import", str(dump), "--config", str(node.config_path))
            assert (done.returncode, done.stdout) == (0, "imported 2 messages (2 recipients), 0 mailbox copies\n")
            [got] = await peer.wait_for_messages(1, timeout=15)
            assert (got.sender, got.rcpts) == ("alice@lab.test", ["z@routed.test"])
            assert got.data == due.data
            # Gone from the queue once delivered; the held message stays, held.
            for _ in range(100):
                listing = await asyncio.to_thread(mta, "queue", "list", "--json", "--config", str(node.config_path))
                if due.id not in listing.stdout:
                    break
                await asyncio.sleep(0.1)
            [entry] = [json.loads(line) for line in listing.stdout.splitlines()]
            assert (entry["queue_id"], entry["queue_name"]) == (held.id, "hold")
            assert len(peer.messages) == 1
            # While the node runs, its database is not exported.
            done = await asyncio.to_thread(mta, "queue", "export", str(tmp_path / "back.export"), "--config",
                                           str(node.config_path))
            assert (done.returncode, done.stderr) == (
                1, "mta: queue export: node node-a.lab.test is running on this database: stop every node first"
                   " (mail arriving or being delivered during the export would be missed or delivered twice)\n")
        finally:
            assert await node.terminate() == 0


def test_a_database_that_is_down_is_one_line(tmp_path: Path, dump: Path) -> None:
    dsn = f"postgresql://mta@127.0.0.1:{free_port()}/mta"
    down = postgresql_config(tmp_path, dsn)
    for command in ("export", "import"):
        target = tmp_path / f"{command}.export" if command == "export" else dump
        done = mta("queue", command, str(target), "--config", str(down))
        assert (done.returncode, done.stdout) == (1, ""), command
        [line] = done.stderr.splitlines()
        assert line.startswith(f"mta: queue: cannot open {dsn}: PostgreSQL: "), line
    assert not (tmp_path / "export.export").exists()
