"""The mta daemon under test (``python -m mta serve``) and its queue prefill."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

import procfs

ROOT = Path(__file__).resolve().parent.parent  # the repository: `mta` is imported from here


def mta_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MTA_CONFIG", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_config(workdir: Path, listen: tuple[str, int], *, smarthost: tuple[str, int] | None,
                 routes: dict[str, tuple[str, int]] | None = None, concurrency: int = 20,
                 dest_limit: int = 20, http: tuple[str, int] | None = None, dsn: str | None = None,
                 hostname: str = "mta.bench.test") -> Path:
    """mta's config for the bench; ``dsn``: the queue on that PostgreSQL database (issue 16),
    the node named ``hostname`` (every node on one database needs its own)."""
    delivery: dict[str, object] = {
        "concurrency": concurrency,
        "per_destination_concurrency": dest_limit,
        "tls": "none",
        "connection_cache": {"max_messages": 100, "idle_timeout": "2s"},
        "retry": {"min_backoff": "1h", "max_backoff": "1h"},
    }
    if smarthost:
        delivery["smarthost"] = f"{smarthost[0]}:{smarthost[1]}"
    if routes:
        delivery["routes"] = {d: f"{h}:{p}" for d, (h, p) in routes.items()}
    queue: dict[str, object] = {"path": str(workdir / "queue.db")}
    if dsn is not None:
        # path stays the node's own: `mta serve` locks it (queue.db.lock) whatever the backend,
        # so two nodes on one machine need two paths.
        queue.update(backend="postgresql", dsn=dsn)
    doc = {
        "hostname": hostname,
        "listeners": [{"name": "bench", "address": f"{listen[0]}:{listen[1]}", "mode": "relay"}],
        "mynetworks": ["127.0.0.0/8"],
        "queue": queue,
        "metrics": {"address": None},
        "delivery": delivery,
        "limits": {"max_connections_per_ip": 200, "max_connections": 400},
    }
    if http:   # the lab inbox's web UI and API (issue 15), for --http-poll
        doc["listeners"].append({"name": "web", "address": f"{http[0]}:{http[1]}", "mode": "http"})
    path = workdir / "mta.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def wait_greeting(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited during start-up (status {proc.returncode})")
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                if s.recv(100).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"nothing answered on {host}:{port} within {timeout:.0f}s")


class MtaDaemon:
    def __init__(self, config: Path, listen: tuple[str, int], log: Path):
        self.config = config
        self.listen = listen
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def start(self, timeout: float = 120) -> None:
        with open(self.log, "ab") as log:
            t0 = time.monotonic()
            self.proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=mta_env(), cwd=ROOT)
        try:
            wait_greeting(*self.listen, timeout=timeout, proc=self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"mta: {exc}\n{self.log_tail()}") from None
        self.startup_s = time.monotonic() - t0

    def pids(self) -> list[int]:
        # The main process and its delivery child (mta/daemon/delivery_process.py).
        return procfs.tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def create_backlog_db(path: Path, count: int, *, size: int = 1024, domain: str = "backlog.test") -> float:
    """A queue.db holding ``count`` deferred messages (one recipient each) due in 1-2 hours.

    Written through mta's own queue enqueue (so it follows whatever the
    schema is today), 5,000 messages per group commit; then the recipients'
    attempts and last error are set as a first failed attempt would leave
    them. Returns the seconds it took.
    """
    sys.path.insert(0, str(ROOT))
    from mta.model import NewMessage, RcptState, Recipient
    from mta.store.sqlite.store import SQLiteStore

    t0 = time.monotonic()
    now = time.time()
    line = b"Deferred backlog message body line, padded to a realistic size for the bench.\r\n"
    body = (line * (size // len(line) + 1))[:size]

    def message(i: int) -> NewMessage:
        mid = f"B{i:011X}"
        return NewMessage(
            id=mid, sender="sender@bench.test",
            recipients=(Recipient(f"user{i}@{domain}", state=RcptState.DEFERRED,
                                  next_attempt=now + 3600 + i % 3600),),
            data=f"Message-ID: <{mid}@bench.test>\r\nSubject: backlog {i}\r\n\r\n".encode() + body,
            arrival=now - 1800 + i * 1e-3, client="127.0.0.1", listener="bench", helo="backlog")

    async def fill() -> None:
        store = SQLiteStore(path)
        await store.open()  # creates the schema (migrations)
        try:
            await store.engine.db.execute("PRAGMA synchronous = OFF")  # a fixture, not mail
            for start in range(0, count, 5000):
                # Concurrent enqueues share one commit (the store's group commit).
                chunk = range(start, min(count, start + 5000))
                await asyncio.gather(*(store.queue.enqueue(message(i)) for i in chunk))
        finally:
            await store.close()

    if not _fill_fast(path, count, message):
        asyncio.run(fill())
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("UPDATE recipients SET attempts = 1, last_error = ? WHERE state = 'deferred'",
                   ("451 4.4.1 connect to mx.backlog.test[192.0.2.1]:25: Connection timed out",))
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return time.monotonic() - t0


def _fill_fast(path: Path, count: int, message) -> bool:
    """The same rows, faster: the store's own insert function run on a plain
    sqlite3 connection in one transaction. False (and nothing written) if the
    store's internals no longer fit; the caller then uses the queue's enqueue."""
    from mta.store.sqlite import queue as store_module
    from mta.store.sqlite.store import SQLiteStore
    insert = getattr(store_module, "_insert_message", None)
    if insert is None:
        return False

    async def make_schema() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.close()

    asyncio.run(make_schema())
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("BEGIN")
        try:
            for i in range(count):
                insert(db, message(i))   # the store's own (synchronous) insert
        except Exception:  # noqa: BLE001 - internals changed: use the public path
            db.execute("ROLLBACK")
            return False
        db.execute("COMMIT")
        return True
    finally:
        db.close()
