"""The PostgreSQL engine: a pool of asyncpg connections, every error a StoreError.

Each call runs in one transaction on a pooled connection and returns after its
COMMIT; ``synchronous_commit`` is set on for every session, so a commit is
durable on the server (and on its synchronous standbys) before enqueue returns
and the 250 is sent. Errors of any kind (the server refused, is down or
unreachable, a connection broke) become :class:`mta.errors.StoreError`, which
callers answer with 451 4.3.0 as with SQLite. The engine reconnects by itself:
after a broken connection the pool's connections are expired, and the next call
connects anew (asyncpg's pool connects lazily); nothing is retried behind the
caller's back, since a COMMIT cut off by a broken connection may have happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from mta.config_values import redacted_dsn
from mta.errors import StoreError
from mta.health import Health
from mta.store.postgresql.schema import migrate

log = logging.getLogger("mta.queue")

T = TypeVar("T")
# An operation: given a connection inside an open transaction, does its queries.
Op = Callable[[Any], Awaitable[T]]

# Errors that mean "the database could not be reached or the connection broke".
# InternalClientError ("cannot switch to state 15; another operation (2) is in progress")
# is what asyncpg raises when a connection the server dropped mid-query is used again
# (seen with `pg_ctl restart` under load): not a StoreError, it ended delivery workers
# and SMTP sessions, and the recipients they held stayed leased for good.
CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError,
                      asyncpg.exceptions.PostgresConnectionError,
                      asyncpg.exceptions.CannotConnectNowError,
                      asyncpg.exceptions.AdminShutdownError,
                      asyncpg.InternalClientError)


# The server's probes of a long-idle connection of ours: first after 30 s idle, then every
# 10 s, given up after 3 unanswered (about a minute in all).
SERVER_KEEPALIVES = {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10", "tcp_keepalives_count": "3"}

# The health component (/healthz, mta_health) while the database cannot be reached.
HEALTH_COMPONENT = "database"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"PostgreSQL: {text}"


class PgEngine:
    """A connection pool to one database; :meth:`run` is the only way in."""

    def __init__(self, dsn: str, *, health: Health | None = None, max_connections: int = 10,
                 connect_timeout: float = 5.0, command_timeout: float = 30.0):
        self.dsn = dsn
        self.health = health or Health()
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._pool: Any = None
        self._listening: list[asyncio.Task[None]] = []
        self.schema_found: int | None = None   # the schema version open() found (0: empty)

    async def open(self) -> None:
        """Connect and migrate the schema; StoreError if the database cannot be reached."""
        try:
            self._pool = await asyncpg.create_pool(
                # min_size=0: no background "restore the pool's floor" while the database is
                # down (asyncpg logs each failed try with a traceback); a call connects instead.
                self.dsn, min_size=0, max_size=self.max_connections, timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                # 250 after COMMIT: whatever the server's default, our commits wait for the WAL flush.
                server_settings={"synchronous_commit": "on", "application_name": "mta"})
            async with self._pool.acquire(timeout=self.connect_timeout) as conn:
                self.schema_found = await migrate(conn)
        except StoreError:
            await self.close()
            raise
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            await self.close()
            # The one line `mta serve` and the CLI print: name the database (never its password).
            raise StoreError(f"cannot open {redacted_dsn(self.dsn)}: {one_line(exc)}") from exc

    async def close(self) -> None:
        for task in self._listening:
            task.cancel()
        for task in self._listening:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._listening.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.connect_timeout)
            except (TimeoutError, *CONNECTION_ERRORS, asyncpg.PostgresError):
                pool.terminate()

    async def run(self, op: Op[T], *, autocommit: bool = False) -> T:
        """``op`` in one transaction; returns once committed. StoreError on any failure.

        ``autocommit``: no transaction around ``op``: each statement it sends is a
        transaction of its own, which PostgreSQL commits before it replies. For an op of
        one statement (or of statements that need not commit together), without the
        round trips for BEGIN and COMMIT."""
        pool = self._pool
        if pool is None:
            raise StoreError("queue is not open")
        result: T
        try:
            async with pool.acquire(timeout=self.connect_timeout) as conn:
                if autocommit:
                    result = await op(conn)
                else:
                    async with conn.transaction():
                        result = await op(conn)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, CONNECTION_ERRORS):
                await self._unreachable(pool, exc)
            raise StoreError(one_line(exc)) from exc
        except CONNECTION_ERRORS as exc:
            # asyncpg's DataError (an argument it cannot encode) is an InterfaceError and a
            # ValueError: about the data, the connection is fine.
            if not isinstance(exc, ValueError):
                await self._unreachable(pool, exc)
            raise StoreError(one_line(exc)) from exc
        if self.health.failing(HEALTH_COMPONENT):
            self.health.clear(HEALTH_COMPONENT)
        return result

    async def stream(self, query: str, *args: Any, batch: int = 2000) -> AsyncGenerator[list[Any], None]:
        """The rows of one SELECT in lists of up to ``batch``, through a server-side cursor
        in one read-only transaction: one snapshot however long the caller takes, and never
        the whole result in memory. The connection goes back to the pool when the caller
        stops (close the generator: contextlib.aclosing). StoreError on any failure."""
        pool = self._pool
        if pool is None:
            raise StoreError("queue is not open")
        try:
            async with pool.acquire(timeout=self.connect_timeout) as conn, \
                    conn.transaction(isolation="repeatable_read", readonly=True):
                cursor = await conn.cursor(query, *args)
                while rows := await cursor.fetch(batch):
                    yield rows
        except asyncpg.PostgresError as exc:
            if isinstance(exc, CONNECTION_ERRORS):
                await self._unreachable(pool, exc)
            raise StoreError(one_line(exc)) from exc
        except CONNECTION_ERRORS as exc:
            await self._unreachable(pool, exc)
            raise StoreError(one_line(exc)) from exc

    async def connect(self, application_name: str) -> Any:
        """A connection of its own, outside the pool, with the pool's settings: for what
        holds a connection for long (a POP3 session's maildrop lock), so the pool never
        starves. The caller closes it. StoreError if the database cannot be reached.

        Such a connection is idle for long, and what it holds must go when its node
        does: the server probes it (TCP keepalives), so a node whose machine died or
        whose network went is found out within about a minute, not the system's two
        hours, and its session ends with its locks (over a Unix socket these do nothing)."""
        try:
            return await asyncpg.connect(
                self.dsn, timeout=self.connect_timeout, command_timeout=self.command_timeout,
                server_settings={"synchronous_commit": "on", "application_name": application_name,
                                 **SERVER_KEEPALIVES})
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            raise StoreError(one_line(exc)) from exc

    async def _unreachable(self, pool: Any, exc: BaseException) -> None:
        """Report it to health, and have every pooled connection replaced at its next use:
        after a server restart each would otherwise fail once before the pool noticed."""
        self.health.fail(HEALTH_COMPONENT, one_line(exc))
        await pool.expire_connections()

    def listen(self, channel: str, on_payload: Callable[[str], None], *, retry: float = 1.0) -> None:
        """Call ``on_payload`` for each NOTIFY on ``channel`` (PostgreSQL delivers them after
        the sender's COMMIT), on a connection of its own outside the pool, until close().
        The connection is made again whenever it breaks; notifications sent meanwhile are
        lost, so ``on_payload("")`` is called after every (re)connection: "look again"."""
        self._listening.append(asyncio.create_task(self._listen(channel, on_payload, retry)))

    async def _listen(self, channel: str, on_payload: Callable[[str], None], retry: float) -> None:
        def received(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            on_payload(payload)

        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout,
                                             server_settings={"application_name": "mta listen"})
                ended = asyncio.Event()
                conn.add_termination_listener(lambda _conn, ended=ended: ended.set())
                await conn.add_listener(channel, received)
                on_payload("")
                await ended.wait()
            except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
                log.debug("listening on %s: %s", channel, one_line(exc))
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(retry)
