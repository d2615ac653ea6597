"""Concurrent writes share commits: one statement and one COMMIT for many callers.

Twenty SMTP sessions ending their DATA at once would otherwise make twenty
transactions, each with its round trips, its statements to plan and its WAL
flush; so would twenty deliveries ending at once. Instead the writes that
arrive while one batch is being committed wait, and the next batch takes them
all (the SQLite engine's group commit, done here in the client). Each caller
still returns only after the COMMIT that stored its write: the 250 follows a
durable commit, as before, and an outcome is never reported before it is stored.

A batch that fails fails every caller in it with StoreError (451 4.3.0 for new
mail), and nothing of it is stored: it was one transaction. The one exception:
when the server refused the data itself (SQLSTATE classes 22 and 23, or an
argument the driver cannot encode), the writes are tried again one at a time,
so one message the database will not take does not turn away the others'
senders. Other failures (the server down or read-only, its disk full, a
connection cut) are not retried: a commit cut off by a broken connection may
have happened, and the caller's own retry (the client's after a 451, the queue
manager's) is the safe one.

Measured with benchmarks/store_bench.py: see benchmarks/README.md, "PostgreSQL store".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

from mta.errors import StoreError

T = TypeVar("T")
R = TypeVar("R")

# A batch is one statement: new mail's bodies travel as one bytea[] parameter, which
# PostgreSQL caps at 1 GB. Far below that, and enough to share every commit of a busy node.
MAX_BATCH_ITEMS = 100
MAX_BATCH_BYTES = 16 << 20


class Batches(Generic[T, R]):
    """``await add(item)`` returns ``store``'s result for the item once ``store`` has
    committed a batch holding it. ``store`` takes a batch, returns one result per item.

    ``size``: an item's bytes (a batch holds at most MAX_BATCH_BYTES, or one item).
    ``key``: items with the same key never share a batch (they are committed in turn)."""

    def __init__(self, store: Callable[[Sequence[T]], Awaitable[Sequence[R]]], *,
                 size: Callable[[T], int] = lambda item: 0,
                 key: Callable[[T], Hashable] | None = None):
        self._store = store
        self._size = size
        self._key = key
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.commits = 0     # batches committed (fewer than items when commits are shared)

    async def add(self, item: T) -> R:
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="commit-batches")
        return await done

    def _next_batch(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        later: list[tuple[T, asyncio.Future[R]]] = []
        keys: set[Hashable] = set()
        size = 0
        for waiting in self._waiting:
            item = waiting[0]
            key = self._key(item) if self._key is not None else None
            full = len(batch) == MAX_BATCH_ITEMS or (batch and size + self._size(item) > MAX_BATCH_BYTES)
            if full or (key is not None and key in keys):
                later.append(waiting)
                continue
            batch.append(waiting)
            keys.add(key)
            size += self._size(item)
        self._waiting = later
        return batch

    async def _write(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch = self._next_batch()
                try:
                    results = await self._store([item for item, _ in batch])
                except StoreError as exc:
                    if len(batch) > 1 and _about_the_data(exc):
                        await self._one_by_one(batch)
                    else:
                        for _, done in batch:
                            _fail(done, exc)
                else:
                    self.commits += 1
                    for (_, done), result in zip(batch, results, strict=True):
                        if not done.done():
                            done.set_result(result)
                batch = []
        except BaseException:
            # Cancelled (the loop is shutting down): nobody may wait for ever.
            for _, done in batch + self._waiting:
                _fail(done, StoreError("queue is closing"))
            self._waiting = []
            raise

    async def _one_by_one(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        for item, done in batch:
            try:
                [result] = await self._store([item])
            except StoreError as exc:
                _fail(done, exc)
            else:
                self.commits += 1
                if not done.done():
                    done.set_result(result)


def _fail(done: asyncio.Future[R], exc: StoreError) -> None:
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
