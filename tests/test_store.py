"""The SQLite queue itself: schema, versioning, durability settings, file mode."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat

import pytest

from mta.errors import StoreError
from mta.model import RcptState
from mta.store.api import new_queue_id
from mta.store.sqlite.schema import SCHEMA_VERSION
from mta.store.sqlite.store import SQLiteStore
from tests.support.messages import message

pytestmark = pytest.mark.timeout(30)


async def test_new_queue_file_is_private_wal_and_versioned(tmp_path):
    store = SQLiteStore(tmp_path / "q" / "queue.db")
    await store.open()
    async with store.engine.db.execute("PRAGMA synchronous") as cur:
        assert (await cur.fetchone())[0] == 2  # FULL
    await store.close()
    path = tmp_path / "q" / "queue.db"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        indexes = {row[1] for row in db.execute("PRAGMA index_list(recipients)")}
    assert "recipients_due" in indexes


async def test_enqueue_stores_one_row_per_recipient(tmp_path):
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    m = message(rcpts=("x@example.org", "y@example.net"))
    await store.queue.enqueue(m)
    [listed] = await store.admin.list_messages()
    assert listed.id == m.id and listed.size == len(m.data)
    assert [(r.address, r.state) for r in listed.recipients] == [
        ("x@example.org", RcptState.QUEUED), ("y@example.net", RcptState.QUEUED)]
    assert await store.queue.message_data(m.id) == m.data
    await store.close()


async def test_concurrent_enqueues_share_commits(tmp_path):
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    await asyncio.gather(*(store.queue.enqueue(message(i)) for i in range(200)))
    assert len(await store.admin.list_messages()) == 200
    assert store.engine.commits < 50  # one fsync served many messages
    await store.close()


async def test_a_failed_batch_raises_and_the_store_recovers(tmp_path):
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    m = message()
    await store.queue.enqueue(m)
    with pytest.raises(StoreError):
        await store.queue.enqueue(m)  # same id: the PRIMARY KEY refuses it, the transaction rolls back
    await store.queue.enqueue(message(1))
    assert len(await store.admin.list_messages()) == 2
    await store.close()


async def test_open_migrates_an_empty_file_and_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "queue.db"
    sqlite3.connect(path).close()  # version 0: an empty database
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match="newer than this mta"):
        await store.open()
    await store.close()


def test_queue_ids_are_short_and_unique():
    ids = [new_queue_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 12 and i.isalnum() and i.upper() == i for i in ids)


async def test_version_3_queue_moves_bodies_out_of_messages(tmp_path):
    """An upgrade keeps every queued message: the migration path from older releases."""
    from mta.store.sqlite.schema import MIGRATIONS
    from mta.store.sqlite.schema import statements as _statements
    path = tmp_path / "queue.db"
    with sqlite3.connect(path) as db:
        for version, script in enumerate(MIGRATIONS[:3], start=1):
            for statement in _statements(script):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version}")
        db.execute("INSERT INTO messages (id, sender, arrival, size, data) VALUES ('OLD1', 'a@x', 1, 5, x'6869')")
        db.execute("INSERT INTO recipients (message_id, rcpt_no, address, state) VALUES ('OLD1', 0, 'b@y', 'deferred')")
    store = SQLiteStore(path)
    await store.open()
    assert await store.queue.message_data("OLD1") == b"hi"
    [listed] = await store.admin.list_messages()
    assert listed.id == "OLD1" and listed.recipients[0].state == RcptState.DEFERRED
    await store.close()
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(messages)")]
    assert "data" not in columns
