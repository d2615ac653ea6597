"""A damaged queue file is never a silent one (issue 12, part 4).

Against real `mta serve` and `mta queue …` processes, each with a timeout so a
hang fails: a file SQLite cannot open gives exit status 2 and one line; a file
with a damaged data page, found at start or at run time, makes the daemon stay
up, say so once in the log, answer 503 on /healthz, show
mta_health_status{component="queue_database"} 0 and refuse new mail with 451.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from mta.model import NewMessage, RcptState, Recipient
from mta.store.api import new_queue_id
from mta.store.sqlite.schema import SCHEMA_VERSION
from mta.store.sqlite.store import SQLiteStore
from tests.support.daemon import mta_command, start_daemon, subprocess_env
from tests.support.ports import free_port
from tests.support.waiting import wait_until
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(120)

PAGE = 4096
HINT = 'see README "Recovering a damaged queue"'
STORE_FAILED = "451 4.3.0 Error: queue file write error"
# A command that hangs fails the test after this long (the old code hung for ever).
COMMAND_TIMEOUT = 30


# --------------------------------------------------------------------------- queue files

async def build_queue(path: Path, messages: int = 68, *, deferred_for: float = 0.0) -> list[str]:
    """A real queue file holding ``messages`` messages of about 6 kB, one recipient each
    (deferred for ``deferred_for`` seconds if given); closed, so everything is in the
    database file and nothing in a WAL."""
    store = SQLiteStore(path)
    await store.open()
    ids = []
    now = time.time()
    try:
        for i in range(messages):
            state = RcptState.DEFERRED if deferred_for else RcptState.QUEUED
            rcpt = Recipient(address=f"r{i}@example.org", state=state,
                             next_attempt=now + deferred_for if deferred_for else 0.0)
            message = NewMessage(id=new_queue_id(), sender="lab@lab.test", recipients=(rcpt,),
                                 data=b"Subject: stuck\r\n\r\n" + (b"%06d" % i) * 1000 + b"\r\n", arrival=now)
            await store.queue.enqueue(message)
            ids.append(message.id)
    finally:
        await store.close()
    assert not Path(f"{path}-wal").exists()
    return ids


def table_pages(path: Path, table: str, kind: str = "leaf") -> list[int]:
    """Page numbers of ``table``'s b-tree pages of ``kind`` (the dbstat virtual table)."""
    with sqlite3.connect(path) as db:
        try:
            rows = db.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = ?", (table, kind)).fetchall()
        except sqlite3.OperationalError:   # SQLite built without dbstat: the root page is a leaf then
            rows = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchall()
    db.close()
    assert rows, f"no {kind} page for {table}"
    return [int(r[0]) for r in rows]


def overwrite_pages(path: Path, pages: list[int]) -> None:
    """Garbage over whole pages (1-based page numbers), as a disk fault would leave them."""
    with open(path, "r+b") as f:
        for page in pages:
            f.seek((page - 1) * PAGE)
            f.write(b"\xa5" * PAGE)
        f.flush()
        os.fsync(f.fileno())


def damage(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        data = data[:1000]
    elif kind == "header":
        data[0:100] = b"\xa5" * 100
    elif kind == "schema":   # page 1 after the 100-byte file header: sqlite_master
        data[100:PAGE] = b"\xa5" * (PAGE - 100)
    elif kind == "text":
        data = bytearray(b"queue:\n  path: /var/lib/mta/queue.db\n")
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- processes

def write_config(tmp_path: Path, queue: Path, *, port: int = 0, metrics_port: int = 0) -> Path:
    doc = {
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{port or free_port()}", "mode": "relay"}],
        "mynetworks": ["127.0.0.0/8"],
        "queue": {"path": str(queue)},
        "metrics": {"address": f"127.0.0.1:{metrics_port}" if metrics_port else None},
        # Nobody listens there: mail that is tried is deferred and stays queued.
        "delivery": {"smarthost": f"127.0.0.1:{free_port()}",
                     "retry": {"min_backoff": "1h", "max_backoff": "2h"}},
    }
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_mta(*args: str) -> subprocess.CompletedProcess[str]:
    """A whole `mta …` run; a hang raises TimeoutExpired (and the process is killed)."""
    return subprocess.run(mta_command(*args), capture_output=True, text=True, env=subprocess_env(),
                          timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)


# An INFO line in Postfix's shape: time stamp, host, "mta/<component>[pid]: " and no severity word.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00 \S+ mta/\w+\[\d+\]: (?!warning: |error: |fatal: )")


def assert_one_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Exit status 2 and ``expected`` as the one line saying what is wrong (a daemon may
    have logged INFO lines before it, nothing else)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines and lines[-1] == expected, result.stderr
    assert all(LOG_LINE.match(line) for line in lines[:-1]), result.stderr
    assert result.returncode == 2, result.stderr


class Daemon:
    """`mta serve` with its output in a file."""

    def __init__(self, tmp_path: Path, config: Path, port: int, metrics_port: int):
        self.config = config
        self.port = port
        self.metrics_port = metrics_port
        self.log_path = tmp_path / "mta.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = start_daemon(self.config, self.log_path)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited during start-up:\n{self.log()}"
            try:
                status, _ = await self.get("/healthz")
            except OSError:
                await asyncio.sleep(0.05)
                continue
            if status and "mta ready" in self.log():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"daemon did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def get(self, path: str) -> tuple[int, str]:
        def fetch() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
        return await asyncio.to_thread(fetch)

    async def metric(self, line_start: str) -> float:
        _, text = await self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.split()[-1])
        raise AssertionError(f"no {line_start} in /metrics")

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 30)

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def start_watched(tmp_path: Path, queue: Path) -> Daemon:
    port, metrics_port = free_port(), free_port()
    daemon = Daemon(tmp_path, write_config(tmp_path, queue, port=port, metrics_port=metrics_port),
                    port, metrics_port)
    await daemon.start()
    return daemon


async def mail_from(port: int) -> tuple[Wire, str]:
    wire = await Wire.connect("127.0.0.1", port)
    await wire.ehlo()
    return wire, await wire.cmd("MAIL FROM:<lab@lab.test>")


# --------------------------------------------------------------------------- files that cannot be opened

CANNOT_OPEN = {
    "truncated": "database disk image is malformed",   # the first 1000 bytes of a real queue
    "header": "file is not a database",                # garbage over bytes 0-100
    "schema": "database disk image is malformed",      # garbage over the rest of page 1 (sqlite_master)
    "text": "file is not a database",                  # not a database at all
}


@pytest.mark.parametrize("kind", sorted(CANNOT_OPEN))
async def test_a_queue_file_that_cannot_be_opened_gives_one_line_and_exit_2(tmp_path, kind):
    queue = tmp_path / "queue.db"
    await build_queue(queue, 20)
    damage(queue, kind)
    config = write_config(tmp_path, queue)
    expected = f"queue: {queue} is damaged: {CANNOT_OPEN[kind]}; {HINT}"

    started = time.monotonic()
    assert_one_line(run_mta("serve", "--config", str(config)), expected)
    assert_one_line(run_mta("queue", "list", "--config", str(config)), expected)
    assert_one_line(run_mta("queue", "check", "--config", str(config)), expected)
    # Promptly: three process starts, no waiting on anything.
    assert time.monotonic() - started < 20


# --------------------------------------------------------------------------- a damaged data page

@pytest.mark.parametrize("table", ["recipients", "bodies"])
async def test_a_damaged_data_page_found_at_start_refuses_mail_and_says_so(tmp_path, table):
    queue = tmp_path / "queue.db"
    await build_queue(queue, 68, deferred_for=3600)
    overwrite_pages(queue, table_pages(queue, table)[:1])
    reason = f"{queue} is damaged: database disk image is malformed"

    daemon = await start_watched(tmp_path, queue)
    try:
        # The start-up check found it before "ready": one line in the main process's log.
        log = daemon.log()
        pid = daemon.proc.pid
        lines = [line for line in log.splitlines() if f"[{pid}]:" in line and "queue_database" in line]
        assert lines and lines[0].endswith(f"error: health: queue_database: {reason}"), log
        assert log.index(lines[0]) < log.index("mta ready")

        assert await daemon.get("/healthz") == (503, f"queue_database: {reason}\n")
        assert await daemon.metric('mta_health_status{component="queue_database"}') == 0.0

        # New mail is refused at MAIL, before the client sends it.
        wire, reply = await mail_from(daemon.port)
        assert reply == STORE_FAILED
        assert await wire.cmd("QUIT") == "221 2.0.0 Bye"
        await wire.close()

        # Still up, still saying so, and said once: not every time the queue manager retries.
        await asyncio.sleep(3)
        assert daemon.proc.poll() is None
        assert (await daemon.get("/healthz"))[0] == 503
        for process in {m for m in re.findall(r"\[(\d+)\]: error: health: queue_database", daemon.log())}:
            assert daemon.log().count(f"[{process}]: error: health: queue_database") == 1, daemon.log()
        assert await daemon.stop() == 0
    finally:
        daemon.ensure_dead()


async def test_a_page_damaged_while_the_daemon_runs_is_found_and_reported(tmp_path):
    queue = tmp_path / "queue.db"
    ids = await build_queue(queue, 20, deferred_for=3600)
    daemon = await start_watched(tmp_path, queue)
    try:
        assert await daemon.get("/healthz") == (200, "ok\n")
        # A client that is inside its transaction when the damage is found.
        early, reply = await mail_from(daemon.port)
        assert reply == "250 2.1.0 Ok"
        assert await early.cmd("RCPT TO:<late@example.org>") == "250 2.1.5 Ok"

        # The bodies' pages go bad under the running daemon (nobody has read them since
        # the start-up check); `mta queue flush` makes the mail due, so the queue manager
        # reads them for delivery, in the delivery process.
        overwrite_pages(queue, table_pages(queue, "bodies"))
        flushed = run_mta("queue", "flush", "--config", str(daemon.config))
        assert flushed.returncode == 0, flushed.stderr
        assert flushed.stdout == f"flushed 20 recipients in {len(ids)} messages\n"

        reason = f"{queue} is damaged: database disk image is malformed"

        async def reported() -> bool:
            return (await daemon.get("/healthz"))[0] == 503
        await wait_until(reported, 20.0, "/healthz 503", interval=0.1)
        assert await daemon.get("/healthz") == (503, f"queue_database: {reason}\n")
        assert await daemon.metric('mta_health_status{component="queue_database"}') == 0.0
        assert f"error: health: queue_database: {reason}" in daemon.log()

        # The client in the middle of its transaction is refused at the end of DATA:
        # nothing more is written into the damaged file.
        assert await early.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        assert await early.cmd(b"Subject: late\r\n\r\nlate\r\n.") == STORE_FAILED
        await early.close()
        # A new one at MAIL.
        wire, reply = await mail_from(daemon.port)
        assert reply == STORE_FAILED
        await wire.close()
        assert daemon.proc.poll() is None
        assert await daemon.stop() == 0
    finally:
        daemon.ensure_dead()
    with sqlite3.connect(queue) as db:   # the refused message was not written
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (len(ids),)
    db.close()


async def test_a_metrics_refresh_that_meets_the_damage_is_counted_as_failed(tmp_path):
    queue = tmp_path / "queue.db"
    await build_queue(queue, 68, deferred_for=3600)
    overwrite_pages(queue, table_pages(queue, "recipients")[:1])
    daemon = await start_watched(tmp_path, queue)
    try:
        # The queue gauges cannot be read: the scrape says its refresh failed (and
        # /healthz says why), rather than showing a quiet, empty queue.
        await daemon.get("/metrics")
        assert await daemon.metric("mta_metrics_refresh_failures_total") >= 1
        assert (await daemon.get("/healthz"))[0] == 503
    finally:
        daemon.ensure_dead()


# --------------------------------------------------------------------------- mta queue check

async def test_queue_check_says_ok_or_what_is_wrong(tmp_path):
    queue = tmp_path / "queue.db"
    await build_queue(queue, 30)
    config = write_config(tmp_path, queue)

    result = run_mta("queue", "check", "--config", str(config))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"queue: {queue}: ok\n", "")

    overwrite_pages(queue, table_pages(queue, "recipients")[:1])
    result = run_mta("queue", "check", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr == f"queue: {queue} is damaged: database disk image is malformed; {HINT}\n"
    assert result.stdout == "database disk image is malformed\n"

    # `queue list` meets the same page while listing: the same one line, exit 2.
    assert_one_line(run_mta("queue", "list", "--config", str(config)),
                    f"queue: {queue} is damaged: database disk image is malformed; {HINT}")


# --------------------------------------------------------------------------- mta queue repair

async def test_queue_repair_keeps_every_readable_message_and_names_the_lost_ones(tmp_path):
    queue = tmp_path / "queue.db"
    ids = await build_queue(queue, 68, deferred_for=3600)
    config = write_config(tmp_path, queue)
    bodies = table_pages(queue, "bodies")
    overwrite_pages(queue, bodies[:1])   # the first leaf: the first few messages' bodies
    with sqlite3.connect(queue) as db:   # what can still be read, row by row, is what must be kept
        readable = []
        for message_id in ids:
            try:
                db.execute("SELECT data FROM bodies WHERE message_id = ?", (message_id,)).fetchone()
                readable.append(message_id)
            except sqlite3.DatabaseError:
                pass
    db.close()
    assert 0 < len(readable) < len(ids)
    lost = [i for i in ids if i not in readable]

    result = run_mta("queue", "repair", "--config", str(config))
    assert result.returncode == 0, result.stderr
    repaired = f"{queue}.repaired"
    lines = result.stdout.splitlines()
    assert lines[0] == (f"queue: copied {len(readable)} messages ({len(readable)} recipients, 0 history rows)"
                        f" and 0 mailbox messages from {queue} to {repaired}")
    assert lines[1] == f"queue: lost {len(lost)} message{'s' if len(lost) > 1 else ''} (tell their senders):"
    assert lines[2:2 + len(lost)] == [f"  {i} <lab@lab.test>: database disk image is malformed" for i in lost]
    assert lines[-1] == (f"queue: to use it: stop mta; move {queue}, {queue}-wal and {queue}-shm aside;"
                         f" rename {repaired} to {queue}; start mta")
    assert oct(os.stat(repaired).st_mode & 0o777) == "0o600"

    # As the README says: the repaired file in place, and the queue is sound and whole.
    os.replace(queue, f"{queue}.damaged")
    os.replace(repaired, queue)
    result = run_mta("queue", "check", "--config", str(config))
    assert (result.returncode, result.stdout) == (0, f"queue: {queue}: ok\n")
    result = run_mta("queue", "list", "--json", "--config", str(config))
    assert result.returncode == 0
    assert [line.split('"queue_id": "')[1][:12] for line in result.stdout.splitlines()] == readable
    with sqlite3.connect(queue) as db:
        assert db.execute("SELECT count(*) FROM recipients WHERE state = 'deferred'").fetchone() == (len(readable),)
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.close()


async def test_queue_repair_of_a_file_with_nothing_readable_says_so(tmp_path):
    queue = tmp_path / "queue.db"
    await build_queue(queue, 5)
    damage(queue, "header")
    result = run_mta("queue", "repair", "--config", str(write_config(tmp_path, queue)))
    assert result.returncode == 2
    assert result.stderr == (f"queue: nothing can be read of {queue} (file is not a database): its header or"
                             " schema page cannot be read; restore it from a backup\n")
    assert not Path(f"{queue}.repaired").exists()
