"""Helpers for the fault tests (test_faults.py and the other real-daemon tests): a
daemon config, clients that tag every message with a unique X-Seq header,
misbehaving SMTP peers, queue reads. The daemon process itself is support.daemon.

Everything here is asyncio-friendly: the recording peers run on the test's
event loop, so nothing may block it (no ``proc.wait()`` without a timeout of 0).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.daemon import Daemon
from tests.support.wire import Wire

# MTA_LONG_TESTS=1: the long versions (more SIGKILL rounds, more load).
LONG = os.environ.get("MTA_LONG_TESTS", "") not in ("", "0", "no", "false")

SEQ_HEADER = re.compile(rb"(?:^|\r\n)X-Seq: (\d+)\r\n")


def daemon_doc(tmp_path: Path, port: int, *, queue: Path | None = None, **delivery: Any) -> dict[str, Any]:
    """A daemon config: relay for loopback, no metrics, small retry and timeouts."""
    doc: dict[str, Any] = {
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{port}", "mode": "relay"}],
        "mynetworks": ["127.0.0.0/8"],
        "queue": {"path": str(queue or tmp_path / "queue.db")},
        "metrics": {"address": None},
        "limits": {"max_connections_per_ip": 200, "max_connections": 400},
        "delivery": {
            "tls": "none",
            "retry": {"min_backoff": "0.2s", "max_backoff": "1s"},
            "connection_cache": {"idle_timeout": "1s"},
            "timeouts": {"connect": "1s", "command": "2s"},
        },
    }
    for key, value in delivery.items():
        if isinstance(value, dict) and isinstance(doc["delivery"].get(key), dict):
            doc["delivery"][key] = {**doc["delivery"][key], **value}
        else:
            doc["delivery"][key] = value
    return doc


# --------------------------------------------------------------------------- clients

def tagged_body(seq: int, size: int = 0) -> bytes:
    head = f"X-Seq: {seq}\r\nSubject: fault test {seq}\r\nFrom: lab@lab.test\r\n\r\n".encode()
    filler = b""
    if size > 0:
        line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
        filler = line * (size // len(line) + 1)
    return head + f"body {seq}\r\n".encode() + filler


@dataclass
class Attempt:
    """What one client transaction saw."""

    seq: int
    outcome: str            # "accepted", "refused" (a 4xx/5xx reply), "unknown" (cut off), "no-connect"
    reply: str = ""         # the last reply line seen
    queue_id: str | None = None
    replies: list[str] = field(default_factory=list)
    mail_accepted: bool = False   # MAIL FROM got 250: the transaction was running
    started: float = 0.0          # time.monotonic() at connect and when the last reply came
    ended: float = 0.0

    @property
    def greeted(self) -> bool:
        return bool(self.replies) and self.replies[0].startswith("220")


_QUEUED = re.compile(r"250 2\.0\.0 Ok: queued as (\w+)$")


async def send_tagged(port: int, seq: int, *, size: int = 0, rcpt: str | None = None,
                      timeout: float = 15.0) -> Attempt:
    """One transaction carrying ``X-Seq: seq``; never raises for network trouble."""
    attempt = Attempt(seq, "unknown", started=time.monotonic())
    try:
        w = await Wire.connect("127.0.0.1", port, greeting=False)
    except (TimeoutError, OSError, ConnectionError):
        attempt.outcome = "no-connect"
        return attempt
    try:
        async def step(line: str | bytes | None, *, crlf: bool = True) -> str:
            if line is not None:
                await w.send(line, crlf=crlf)
            reply = (await w.reply(timeout))[-1]
            attempt.replies.append(reply)
            attempt.reply = reply
            attempt.ended = time.monotonic()
            return reply

        if not (await step(None)).startswith("220"):
            attempt.outcome = "refused"
            return attempt
        if not (await step("EHLO client.test")).startswith("250"):
            attempt.outcome = "refused"
            return attempt
        for line in ("MAIL FROM:<lab@lab.test>", f"RCPT TO:<{rcpt or f'r{seq}@example.org'}>", "DATA"):
            reply = await step(line)
            if not reply.startswith(("250", "354")):
                attempt.outcome = "refused"
                return attempt
            if line.startswith("MAIL"):
                attempt.mail_accepted = True
        reply = await step(tagged_body(seq, size) + b".\r\n", crlf=False)
        m = _QUEUED.match(reply)
        if m:
            attempt.outcome, attempt.queue_id = "accepted", m.group(1)
        else:
            attempt.outcome = "refused"
        with contextlib.suppress(Exception):
            await asyncio.wait_for(w.send("QUIT"), 1)
        return attempt
    except (TimeoutError, OSError, ConnectionError, UnicodeError):
        return attempt
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(w.close(), 2)


# --------------------------------------------------------------------------- the queue, read from outside

def connect_queue(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10)
    return db


def pending_messages(path: str) -> int:
    if not Path(path).exists():
        return 0
    with contextlib.closing(connect_queue(path)) as db:
        return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])


def recipient_rows(path: str) -> list[tuple[str, str, str, int, str | None]]:
    """(message id, address, state, attempts, last_error) of every recipient row."""
    with contextlib.closing(connect_queue(path)) as db:
        return db.execute("SELECT message_id, address, state, attempts, last_error FROM recipients"
                          " ORDER BY message_id, rcpt_no").fetchall()


def integrity(path: str) -> str:
    with contextlib.closing(connect_queue(path)) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


async def wait_drained(daemon: Daemon, timeout: float) -> None:
    """Until the queue has no message left (everything delivered)."""
    deadline = time.monotonic() + timeout
    while True:
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited while draining:\n{daemon.log_tail()}")
        n = pending_messages(daemon.queue_path)
        if n == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{n} message(s) still queued after {timeout}s:\n{daemon.log_tail()}")
        await asyncio.sleep(0.1)


def seq_counts(messages: Iterable[Any]) -> collections.Counter[int]:
    """How many times each X-Seq arrived at a RecordingPeer."""
    seen: collections.Counter[int] = collections.Counter()
    for message in messages:
        m = SEQ_HEADER.search(message.data)
        assert m is not None, message.data[:200]
        seen[int(m.group(1))] += 1
    return seen


# --------------------------------------------------------------------------- misbehaving peers

class BadPeer:
    """A TCP server that runs ``behaviour(reader, writer)`` for every connection and
    records when each connection was opened and closed (by either side)."""

    def __init__(self, host: str, behaviour: Any, port: int = 0):
        self.host = host
        self.port = port
        self.behaviour = behaviour
        self.connections = 0
        self.open = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self.open += 1
        try:
            await self.behaviour(reader, writer)
        except (OSError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.transport.abort()
            self._tasks.discard(task)

    async def __aenter__(self) -> BadPeer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


async def _until_client_closes(reader: asyncio.StreamReader) -> None:
    while await reader.read(4096):
        pass


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept the connection and never say a word."""
    await _until_client_closes(reader)


async def one_byte_a_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A tar pit: the greeting, one byte per second (and it never gets further)."""
    closed = asyncio.ensure_future(_until_client_closes(reader))
    try:
        for byte in b"220 tarpit.test ESMTP slowly\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            done, _ = await asyncio.wait([closed], timeout=1.0)
            if done:
                return
        await closed
    finally:
        closed.cancel()


async def greet_then_421(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A 220, then -- before the client has said anything -- 421, and hang up after the
    client's next line (hanging up at once could reset the connection before the
    client has read the 421)."""
    writer.write(b"220 busy.test ESMTP\r\n421 4.4.2 busy.test Error: timeout exceeded\r\n")
    await writer.drain()
    await reader.readline()
    writer.close()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Binary noise instead of a greeting, then whatever the client says is ignored."""
    writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not smtp at all\r\n\xff\xfe\r\n")
    await writer.drain()
    await _until_client_closes(reader)
