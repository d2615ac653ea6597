"""Concurrent enqueues share commits: one statement and one COMMIT for many messages.

Twenty SMTP sessions ending their DATA at once would otherwise make twenty
transactions, each with its round trips, its statements to plan and its WAL
flush. Instead the messages that arrive while one batch is being committed wait,
and the next batch takes them all (the SQLite engine's group commit, done here
in the client). Each caller still returns only after the COMMIT that stored its
message: the 250 follows a durable commit, as before.

A batch that fails fails every caller in it with StoreError (451 4.3.0), and
nothing of it is stored: it was one transaction. The one exception: when the
server refused the data itself (SQLSTATE classes 22 and 23, or an argument the
driver cannot encode), the messages are tried again one at a time, so one
message the database will not take does not turn away the others' senders.
Other failures (the server down or read-only, a disk full, a connection cut) are
not retried: a commit cut off by a broken connection may have happened, and the
client's own retry after the 451 is the safe one.

Measured with benchmarks/store_bench.py: see benchmarks/README.md, "PostgreSQL store".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from mta.errors import StoreError
from mta.model import NewMessage

# A batch is one statement: its bodies travel as one bytea[] parameter, which PostgreSQL
# caps at 1 GB. Far below that, and enough to share every commit of a busy node.
MAX_BATCH_MESSAGES = 100
MAX_BATCH_BYTES = 16 << 20

Store = Callable[[Sequence[NewMessage]], Awaitable[None]]


class NewMailBatches:
    """``await add(message)`` returns once ``store`` committed a batch holding the message."""

    def __init__(self, store: Store):
        self._store = store
        self._waiting: list[tuple[NewMessage, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.commits = 0     # batches committed (fewer than messages when commits are shared)

    async def add(self, message: NewMessage) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((message, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="enqueue-batches")
        await done

    def _next_batch(self) -> list[tuple[NewMessage, asyncio.Future[None]]]:
        size = 0
        for n, (message, _) in enumerate(self._waiting):
            size += len(message.data)
            if n and (n == MAX_BATCH_MESSAGES or size > MAX_BATCH_BYTES):
                break
        else:
            n = len(self._waiting)
        batch, self._waiting = self._waiting[:n], self._waiting[n:]
        return batch

    async def _write(self) -> None:
        batch: list[tuple[NewMessage, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch = self._next_batch()
                try:
                    await self._store([message for message, _ in batch])
                except StoreError as exc:
                    if len(batch) > 1 and _about_the_data(exc):
                        await self._one_by_one(batch)
                    else:
                        for _, done in batch:
                            _fail(done, exc)
                else:
                    self.commits += 1
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)
                batch = []
        except BaseException:
            # Cancelled (the loop is shutting down): nobody may wait for ever.
            for _, done in batch + self._waiting:
                _fail(done, StoreError("queue is closing"))
            self._waiting = []
            raise

    async def _one_by_one(self, batch: list[tuple[NewMessage, asyncio.Future[None]]]) -> None:
        for message, done in batch:
            try:
                await self._store([message])
            except StoreError as exc:
                _fail(done, exc)
            else:
                self.commits += 1
                if not done.done():
                    done.set_result(None)


def _fail(done: asyncio.Future[None], exc: StoreError) -> None:
    if not done.done():
        # One exception object each: every caller raises (and extends the traceback of) its own.
        own = StoreError(str(exc), disk_full=exc.disk_full)
        own.__cause__ = exc.__cause__
        done.set_exception(own)


def _about_the_data(exc: StoreError) -> bool:
    """The server (or the driver) refused what was sent, not the transaction as such."""
    cause = exc.__cause__
    sqlstate = getattr(cause, "sqlstate", None) or ""
    # asyncpg's client-side DataError (an argument it cannot encode) is a ValueError.
    return sqlstate[:2] in ("22", "23") or isinstance(cause, ValueError)
