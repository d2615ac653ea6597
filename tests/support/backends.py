"""One queue, either backend: what the store tests that are about queue behaviour run on.

``store_backend`` (tests/conftest.py) yields a :class:`QueueBackend` for SQLite (a file
in the test's directory) or PostgreSQL (a fresh database of the session's private
cluster); the test sees ``.queue`` (mta.store.api.Queue) and reads the rows back
with :meth:`recipients`, straight from the database, not through the code under test."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mta.store.api import Inbox, Mailboxes, Queue
from mta.store.sqlite.store import SQLiteStore

if TYPE_CHECKING:   # imported when used: asyncpg is an optional extra
    from mta.store.postgresql.engine import PgEngine

BACKENDS = ("sqlite", "postgresql")


class QueueBackend:
    def __init__(self, name: str, queue: Queue, closer: Any, path: Path | None = None,
                 engine: PgEngine | None = None):
        self.name = name
        self.queue = queue
        self._closer = closer
        self._path = path
        self._engine = engine
        self.inbox: Inbox | None = None   # the lab inbox on the same database (test_inbox_store.py)
        self.mailboxes: Mailboxes | None = None

    @classmethod
    async def sqlite(cls, path: Path) -> QueueBackend:
        store = SQLiteStore(path)
        await store.open()
        backend = cls("sqlite", store.queue, store.close, path=path)
        backend.inbox = store.inbox
        backend.mailboxes = store.mailboxes
        return backend

    @classmethod
    async def postgresql(cls, dsn: str, *, node: str = "node-a", lease: float = 60.0) -> QueueBackend:
        from mta.store.postgresql.engine import PgEngine
        from mta.store.postgresql.inbox import PostgreSQLInbox
        from mta.store.postgresql.queue import PostgreSQLQueue

        engine = PgEngine(dsn)
        await engine.open()
        backend = cls("postgresql", PostgreSQLQueue(engine, node=node, lease=lease), engine.close, engine=engine)
        backend.inbox = PostgreSQLInbox(engine)
        return backend

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` (written in the SQL both understand), read directly."""
        if self._path is not None:
            with closing(sqlite3.connect(self._path)) as db:
                return [tuple(row) for row in db.execute(sql)]
        assert self._engine is not None

        async def read(conn: Any) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in await conn.fetch(sql)]

        return await self._engine.run(read)

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

    async def close(self) -> None:
        await self._closer()
