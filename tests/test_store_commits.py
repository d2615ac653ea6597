"""How the queue commits: mail is fsynced before 250, the queue manager's own
bookkeeping (claims, outcomes) is not, and the delivery process commits that
bookkeeping on its event loop's thread without ever blocking on the lock."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from contextlib import closing

import pytest

from mta.model import RcptState
from mta.store.api import RecipientUpdate
from mta.store.sqlite import engine as engine_module
from mta.store.sqlite.store import SQLiteStore
from tests.support.messages import message

pytestmark = pytest.mark.timeout(60)

FULL, NORMAL = 2, 1


def synchronous_now(conn: sqlite3.Connection) -> int:
    """Run as a queue write: the PRAGMA synchronous its commit runs with."""
    return conn.execute("PRAGMA synchronous").fetchone()[0]


async def inline_store(path) -> SQLiteStore:
    """A store as the delivery process opens it (worker.run_child)."""
    store = SQLiteStore(path)
    store.engine.inline_writes = True
    await store.open()
    return store


def states(path) -> dict[str, str]:
    with closing(sqlite3.connect(path)) as db:
        return dict(db.execute("SELECT message_id, state FROM recipients"))


async def test_mail_is_committed_with_fsync_and_bookkeeping_without(tmp_path):
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    assert await store.engine.write(synchronous_now) == FULL
    assert await store.engine.write(synchronous_now, durable=False) == NORMAL
    # New mail sharing a commit with bookkeeping makes the whole commit durable.
    before = store.engine.commits
    _, seen = await asyncio.gather(store.queue.enqueue(message(1)), store.engine.write(synchronous_now, durable=False))
    assert seen == FULL and store.engine.commits == before + 1
    # Claims and outcomes alone are not fsynced; the next mail is again.
    claimed = await store.queue.claim(2e9, 10)
    assert [d.address for d in claimed.due] == ["b@example.org"]
    assert await store.engine.write(synchronous_now, durable=False) == NORMAL
    await store.queue.enqueue(message(2))
    assert await store.engine.write(synchronous_now) == FULL
    await store.close()


async def test_inline_writes_commit_claims_and_outcomes(tmp_path):
    path = tmp_path / "queue.db"
    store = await inline_store(path)
    first, second = message(1), message(2)
    await store.queue.enqueue(first)
    await store.queue.enqueue(second)
    claimed = await store.queue.claim(2e9, 10, prefetch_bytes=1 << 20)
    assert sorted(d.message_id for d in claimed.due) == sorted([first.id, second.id])
    assert claimed.bodies[first.id] == first.data
    assert states(path) == {first.id: "active", second.id: "active"}   # seen by another connection
    finished = await store.queue.record_outcomes(
        first.id, [RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None)], 2e9)
    assert finished
    await store.queue.record_outcomes(second.id, [RecipientUpdate(0, RcptState.DEFERRED, 1, 3e9, "451 4.4.1 later")], 2e9)
    assert states(path) == {second.id: "deferred"}
    await store.close()


async def test_inline_write_waits_for_another_writer_without_blocking_the_loop(tmp_path):
    path = tmp_path / "queue.db"
    store = await inline_store(path)
    m = message(1)
    await store.queue.enqueue(m)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")    # e.g. the main process committing new mail
    claim = asyncio.create_task(store.queue.claim(2e9, 10))
    ticks = 0
    for _ in range(20):
        await asyncio.sleep(0.01)       # the loop keeps running meanwhile
        ticks += 1
    assert ticks == 20 and not claim.done()
    other.execute("COMMIT")
    other.close()
    assert [d.message_id for d in (await claim).due] == [m.id]
    assert states(path) == {m.id: "active"}
    await store.close()


async def test_inline_writes_keep_the_wal_checkpointed(tmp_path, monkeypatch):
    # The inline connection never checkpoints by itself; without the store's own
    # passive checkpoints the WAL would grow by every claim and outcome.
    monkeypatch.setattr(engine_module, "INLINE_CHECKPOINT_EVERY", 10)
    path = tmp_path / "queue.db"
    store = await inline_store(path)
    messages = [message(i) for i in range(300)]
    await asyncio.gather(*(store.queue.enqueue(m) for m in messages))
    await store.engine.checkpoint()               # start from an empty WAL
    for m in messages:
        [due] = (await store.queue.claim(2e9, 1)).due
        assert due.message_id == m.id
        await store.queue.record_outcomes(m.id, [RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None)], 2e9)
        await asyncio.sleep(0)              # let a checkpoint that was asked for run
    assert states(path) == {}
    wal = os.path.getsize(f"{path}-wal")
    # 600 commits of a few pages each would be several MB of WAL without checkpoints.
    assert wal < 1_000_000, wal
    await store.close()
