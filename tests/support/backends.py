"""One store, either backend: what the store tests run on.

``store_backend`` (tests/conftest.py) yields a :class:`QueueBackend` for SQLite (a file
in the test's directory) or PostgreSQL (a fresh database of the session's private
cluster); the test sees the store's parts ``.queue`` (mta.store.api.Queue), ``.admin``
(QueueAdmin) and ``.mailboxes`` (Mailboxes), and reads the rows back with
:meth:`query` and :meth:`recipients`, straight from the database, not through the
code under test. On PostgreSQL, :meth:`QueueBackend.postgresql` with another ``node``
on the same DSN is a second node: its own engine (pool) on the same database."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mta.model import MailboxCopy, NewMessage, RcptState, Recipient
from mta.store.api import Inbox, Mailboxes, Queue, QueueAdmin, RecipientUpdate, new_queue_id
from mta.store.sqlite.store import SQLiteStore

if TYPE_CHECKING:   # imported when used: asyncpg is an optional extra
    from mta.store.postgresql.engine import PgEngine

BACKENDS = ("sqlite", "postgresql")


class QueueBackend:
    def __init__(self, name: str, queue: Queue, admin: QueueAdmin, mailboxes: Mailboxes, closer: Any,
                 path: Path | None = None, engine: PgEngine | None = None):
        self.name = name
        self.queue = queue
        self.admin = admin
        self.mailboxes = mailboxes
        self.inbox: Inbox | None = None   # the lab inbox on the same database (test_inbox_store.py)
        self._closer = closer
        self._path = path
        self._engine = engine

    @classmethod
    async def sqlite(cls, path: Path) -> QueueBackend:
        store = SQLiteStore(path)
        await store.open()
        backend = cls("sqlite", store.queue, store.admin, store.mailboxes, store.close, path=path)
        backend.inbox = store.inbox
        return backend

    @classmethod
    async def postgresql(cls, dsn: str, *, node: str = "node-a", lease: float = 60.0) -> QueueBackend:
        from mta.store.postgresql.admin import PostgreSQLQueueAdmin
        from mta.store.postgresql.engine import PgEngine
        from mta.store.postgresql.inbox import PostgreSQLInbox
        from mta.store.postgresql.mailboxes import PostgreSQLMailboxes
        from mta.store.postgresql.queue import PostgreSQLQueue

        engine = PgEngine(dsn)
        await engine.open()
        backend = cls("postgresql", PostgreSQLQueue(engine, node=node, lease=lease), PostgreSQLQueueAdmin(engine),
                      PostgreSQLMailboxes(engine), engine.close, engine=engine)
        backend.inbox = PostgreSQLInbox(engine)
        return backend

    @property
    def engine(self) -> PgEngine:
        """The PostgreSQL engine (PostgreSQL-only tests)."""
        assert self._engine is not None, "not a PostgreSQL backend"
        return self._engine

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` (written in the SQL both understand), read directly."""
        if self._path is not None:
            with closing(sqlite3.connect(self._path)) as db:
                return [tuple(row) for row in db.execute(sql)]
        assert self._engine is not None

        async def read(conn: Any) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in await conn.fetch(sql)]

        return await self._engine.run(read)

    def query_blocking(self, sql: str) -> list[tuple[Any, ...]]:
        """:meth:`query` for synchronous callers (a test's plain assert): on PostgreSQL a
        connection of its own in a thread, so the caller's event loop is not re-entered."""
        if self._path is not None:
            with closing(sqlite3.connect(self._path)) as db:
                return [tuple(row) for row in db.execute(sql)]
        import asyncpg

        dsn = self.engine.dsn

        async def read() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(dsn)
            try:
                return [tuple(row) for row in await conn.fetch(sql)]
            finally:
                await conn.close()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, read()).result(timeout=30)

    async def execute(self, sql: str) -> None:
        """Change rows directly (as an old release or a hand-made change would), committed."""
        if self._path is not None:
            with closing(sqlite3.connect(self._path)) as db, db:
                db.executescript(sql)
            return
        assert self._engine is not None

        async def write(conn: Any) -> None:
            await conn.execute(sql)

        await self._engine.run(write)

    async def recipients(self) -> dict[str, list[tuple[str, str, int]]]:
        """message id -> [(address, state, attempts)] in RCPT order, for every stored recipient."""
        found: dict[str, list[tuple[str, str, int]]] = {}
        for message_id, address, state, attempts in await self.query(
                "SELECT message_id, address, state, attempts FROM recipients ORDER BY message_id, rcpt_no"):
            found.setdefault(message_id, []).append((address, state, int(attempts)))
        return found

    async def deliver(self, mailbox: str, *messages: bytes | tuple[bytes, float],
                      sender: str = "carol@remote.test", max_messages: int = 10_000) -> list[str]:
        """Put ``messages`` into a lab mailbox the way local delivery does, through the
        queue: one queued message per copy, claimed, and delivered with its copy by
        record_outcomes. A message given as (data, arrival) arrived then (max_age tests;
        mailboxes are in arrival order). Returns the queue ids, in the order given."""
        given: dict[str, bytes] = {}
        for n, item in enumerate(messages):
            data, arrival = item if isinstance(item, tuple) else (item, time.time() + n * 1e-3)
            queue_id = new_queue_id()
            await self.queue.enqueue(NewMessage(id=queue_id, sender=sender, recipients=(Recipient(mailbox),),
                                                data=data, arrival=arrival))
            given[queue_id] = data
        claimed = (await self.queue.claim(time.time() + 3600, len(given))).due
        assert sorted(d.message_id for d in claimed) == sorted(given), "the test's queue holds other mail"
        for due in claimed:
            data = given[due.message_id]
            copy = MailboxCopy(mailbox, due.message_id, sender, _subject(data), data, arrival=due.arrival,
                               max_messages=max_messages)
            update = RecipientUpdate(due.rcpt_no, RcptState.DELIVERED, 1, time.time(), None)
            assert await self.queue.record_outcomes(due.message_id, [update], time.time(), mailbox_copies=[copy])
        return list(given)

    async def close(self) -> None:
        await self._closer()


def _subject(data: bytes) -> str:
    for line in data.split(b"\r\n"):
        if not line:
            break
        if line.lower().startswith(b"subject:"):
            return line[8:].strip().decode("utf-8", "replace")
    return ""
