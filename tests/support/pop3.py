"""Shared helpers for the POP3 tests: a lab (a store's mailboxes, users, a listener
on a free loopback port) and a raw POP3 client that shows the wire. The lab's store
is a SQLite queue file unless a test gives ``backend`` (the ``store_backend`` fixture:
the same test on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from mta.config import Config, build_config
from mta.mailbox.users import MailboxUsers
from mta.passwords import AuthThrottle
from mta.pop3 import POP3Listener
from mta.store.api import Mailboxes
from tests.support.backends import QueueBackend
from tests.support.ports import free_port
from tests.support.users import write_users

USERS = {"alice@lab.test": "alice pw", "bob@lab.test": "b0b secret"}

# Three messages for alice, oldest first. ONE has lines that must be byte-stuffed;
# THREE lacks its final CRLF (the server adds one before the terminating ".").
ONE = (b"From: carol@remote.test\r\nTo: alice@lab.test\r\nSubject: one\r\n\r\n"
       b"Hello\r\n.hidden\r\n.\r\n..two dots\r\nend\r\n")
TWO = b"Subject: two\r\n\r\nline 1\r\nline 2\r\nline 3\r\n"
THREE = b"Subject: three\r\n\r\nno line end at the end"
ALICE = [ONE, TWO, THREE]


@dataclass
class Lab:
    config: Config
    backend: QueueBackend
    mailboxes: Mailboxes
    users: MailboxUsers
    listener: POP3Listener
    db_path: Path
    _doc: dict[str, Any]

    @property
    def port(self) -> int:
        return self.listener.listener.port

    async def deliver(self, mailbox: str, *messages: bytes) -> None:
        """Store messages as local delivery does (the mailbox's order is the order given)."""
        await self.backend.deliver(mailbox, *messages)

    def stored(self, mailbox: str) -> list[bytes]:
        """The mailbox as the database holds it, read directly (oldest first)."""
        rows = self.backend.query_blocking(
            f"SELECT data FROM mailbox_messages WHERE mailbox = '{mailbox.lower()}' ORDER BY id")
        return [bytes(r[0]) for r in rows]

    async def remove_row(self, mailbox: str, index: int) -> None:
        """Delete a message behind the server's back (as the max_age pruning would)."""
        ids = [r[0] for r in await self.backend.query(
            f"SELECT id FROM mailbox_messages WHERE mailbox = '{mailbox.lower()}' ORDER BY id")]
        await self.backend.execute(f"DELETE FROM mailbox_messages WHERE id = {ids[index]}")

    def second_listener(self, **listener: Any) -> POP3Listener:
        """Another POP3 listener of the same daemon: same store, users, locks and throttle."""
        lc = build_config({**self._doc, "listeners": [self._listener_doc(listener)]}).listeners[0]
        return POP3Listener(self.config, lc, self.mailboxes, self.users,
                            locks=self.listener.locks, throttle=self.listener.throttle)

    @staticmethod
    def _listener_doc(extra: dict[str, Any]) -> dict[str, Any]:
        return {"name": "pop3", "address": f"127.0.0.1:{free_port()}", "mode": "pop3", **extra}


@contextlib.asynccontextmanager
async def pop3_lab(tmp_path: Path, *, listener: dict[str, Any] | None = None,
                   limits: dict[str, Any] | None = None, throttle: AuthThrottle | None = None,
                   fill: bool = True, backend: QueueBackend | None = None) -> AsyncIterator[Lab]:
    """A store with alice's three messages (a SQLite queue file unless ``backend`` is
    given), a users file and a started POP3Listener (plaintext login allowed unless
    ``listener`` says otherwise)."""
    users_file = tmp_path / "mailbox-users"
    if not users_file.exists():
        write_users(users_file, USERS)
    doc: dict[str, Any] = {
        "hostname": "relay.lab.test",
        "queue": {"path": str(tmp_path / "queue.db")},
        "metrics": {"address": None},
        "local_domains": ["lab.test"],
        "mailboxes": {"users_file": str(users_file)},
        "limits": limits or {},
    }
    lc = Lab._listener_doc({"allow_insecure_auth": True, **(listener or {})})
    config = build_config({**doc, "listeners": [lc]})
    store = backend or await QueueBackend.sqlite(Path(config.queue.path))
    try:
        mailboxes = store.mailboxes
        users = MailboxUsers(config)
        pop3 = POP3Listener(config, config.listeners[0], mailboxes, users,
                            throttle=throttle or AuthThrottle(max_delay=0.0))
        lab = Lab(config, store, mailboxes, users, pop3, Path(config.queue.path), doc)
        if fill:
            await lab.deliver("alice@lab.test", *ALICE)
        await pop3.start()
        try:
            yield lab
        finally:
            pop3.stop_accepting()
            await pop3.drain(1.0)
    finally:
        if backend is None:   # the fixture closes what it gave
            await store.close()


class Client:
    """A raw POP3 client over asyncio streams: exact bytes in, exact bytes out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.greeting = b""

    @classmethod
    async def connect(cls, port: int, *, ssl_context: ssl.SSLContext | None = None,
                      greeting: bool = True) -> Self:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ssl_context,
                                    server_hostname="relay.lab.test" if ssl_context else None), 5)
        client = cls(reader, writer)
        if greeting:
            try:
                client.greeting = await client.line()
            except BaseException:
                await client.close()
                raise
        return client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.writer.write(raw)
        await self.writer.drain()

    async def line(self, timeout: float = 5) -> bytes:
        """One line, CRLF included (b"" at EOF)."""
        return await asyncio.wait_for(self.reader.readline(), timeout)

    async def cmd(self, command: str | bytes) -> bytes:
        """Send one command line; return the one-line reply with its CRLF."""
        await self.send((command.encode() if isinstance(command, str) else command) + b"\r\n")
        return await self.line()

    async def multi(self, command: str | bytes | None = None, timeout: float = 5) -> bytes:
        """Send a command (if given) and return its whole multi-line reply, bytes as sent,
        up to and including the terminating ".\r\n" (or just the status line if -ERR)."""
        if command is not None:
            await self.send((command.encode() if isinstance(command, str) else command) + b"\r\n")
        first = await self.line(timeout)
        if not first.startswith(b"+OK"):
            return first
        return first + await self._until_dot(timeout)

    async def _until_dot(self, timeout: float) -> bytes:
        out = b""
        while True:
            line = await self.line(timeout)
            if not line:
                raise ConnectionError(f"closed inside a multi-line reply: {out!r}")
            out += line
            if line == b".\r\n":
                return out

    async def login(self, user: str = "alice@lab.test", password: str | None = None) -> bytes:
        assert await self.cmd(f"USER {user}") == b"+OK send PASS\r\n"
        return await self.cmd(f"PASS {password if password is not None else USERS[user.lower()]}")

    async def closed(self, timeout: float = 5) -> bool:
        return await asyncio.wait_for(self.reader.read(), timeout) == b""

    async def start_tls(self, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context, server_hostname="relay.lab.test")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            await self.writer.wait_closed()


def capa(*lines: str) -> bytes:
    return b"+OK Capability list follows\r\n" + b"".join(x.encode() + b"\r\n" for x in lines) + b".\r\n"

