"""The queue store: its behaviour on both backends (``store_backend``: SQLite and PostgreSQL),
then SQLite's own schema, versioning, durability settings and file mode."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat

import pytest

from mta.errors import StoreError
from mta.model import MailboxCopy, RcptState
from mta.store.api import HistoryEntry, RecipientUpdate, new_queue_id
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


async def test_enqueue_stores_one_row_per_recipient(store_backend):
    m = message(rcpts=("x@example.org", "y@example.net"))
    woken = []
    store_backend.queue.add_listener(woken.append)
    await store_backend.queue.enqueue(m)
    assert await store_backend.recipients() == {m.id: [("x@example.org", "queued", 0), ("y@example.net", "queued", 0)]}
    assert await store_backend.query("SELECT id, size FROM messages") == [(m.id, len(m.data))]
    assert await store_backend.queue.message_data(m.id) == m.data
    assert await store_backend.queue.message_data("NOSUCHID") is None
    assert woken == [[m]]   # after the commit: the queue manager wakes up


async def test_concurrent_enqueues_share_commits(tmp_path):
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    await asyncio.gather(*(store.queue.enqueue(message(i)) for i in range(200)))
    assert len(await store.admin.list_messages()) == 200
    assert store.engine.commits < 50  # one fsync served many messages
    await store.close()


async def test_a_failed_enqueue_raises_and_the_store_recovers(store_backend):
    m = message()
    await store_backend.queue.enqueue(m)
    with pytest.raises(StoreError):
        await store_backend.queue.enqueue(m)  # same id: the PRIMARY KEY refuses it, the transaction rolls back
    await store_backend.queue.enqueue(message(1))
    assert len(await store_backend.recipients()) == 2
    assert len(await store_backend.query("SELECT data FROM bodies")) == 2   # nothing half-written


async def test_claim_prefetches_bodies_and_outcomes_finish_messages(store_backend):
    queue = store_backend.queue
    first, second = message(1, rcpts=("x@example.org", "y@example.org")), message(2)
    await queue.enqueue(first)
    await queue.enqueue(second)
    claimed = await queue.claim(2e9, 10, prefetch_bytes=len(first.data))
    assert [(d.message_id, d.rcpt_no, d.address) for d in claimed.due] == [
        (first.id, 0, "x@example.org"), (first.id, 1, "y@example.org"), (second.id, 0, "b@example.org")]
    assert claimed.due[0].sender == "a@lab.test" and claimed.due[0].arrival == first.arrival
    assert claimed.bodies == {first.id: first.data}     # the budget held one body
    assert claimed.next_due is None
    assert (await queue.claim(2e9, 10)).due == []       # claimed ones are not claimed again
    # One recipient delivered, one deferred: the message stays, with its history.
    finished = await queue.record_outcomes(
        first.id, [RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None),
                   RecipientUpdate(1, RcptState.DEFERRED, 1, 2e9 + 300, "451 4.4.1 later")], 2e9,
        history=[HistoryEntry(2e9, "y@example.org", "deferred", "451 4.4.1 later")], delay_warned=True)
    assert not finished
    assert await queue.next_due_time() == 2e9 + 300
    await queue.give_back(second.id, [0])
    assert await store_backend.recipients() == {
        first.id: [("x@example.org", "delivered", 1), ("y@example.org", "deferred", 1)],
        second.id: [("b@example.org", "queued", 0)]}
    assert await store_backend.query("SELECT event, detail FROM history") == [("deferred", "451 4.4.1 later")]
    [(warned,)] = await store_backend.query(f"SELECT delay_warned FROM messages WHERE id = '{first.id}'")
    assert warned
    # Not due yet, then due: deferred mail comes back with what it had.
    assert [d.message_id for d in (await queue.claim(2e9 + 1, 10)).due] == [second.id]
    [again] = (await queue.claim(2e9 + 300, 10)).due
    assert (again.rcpt_no, again.attempts, again.last_error, again.delay_warned) == (1, 1, "451 4.4.1 later", True)
    # The same deferral again writes no second history row.
    await queue.record_outcomes(first.id, [RecipientUpdate(1, RcptState.DEFERRED, 2, 2e9 + 900, "451 4.4.1 later")],
                                2e9 + 300, history=[HistoryEntry(2e9 + 300, "y@example.org", "deferred",
                                                                 "451 4.4.1 later")])
    assert len(await store_backend.query("SELECT event FROM history")) == 1
    [again] = (await queue.claim(2e9 + 900, 10)).due
    assert await queue.record_outcomes(first.id, [RecipientUpdate(1, RcptState.BOUNCED, 3, 0.0, "550 5.1.1 no")],
                                       2e9 + 900, new_messages=[message(3, rcpts=("a@lab.test",))])
    # Gone with its body and history; the bounce (a new message) is queued in the same commit.
    remaining = await store_backend.recipients()
    assert first.id not in remaining and len(remaining) == 2
    assert await queue.message_data(first.id) is None
    assert await store_backend.query("SELECT event FROM history") == []


async def test_a_delivery_recorded_one_recipient_at_a_time(store_backend):
    """The common outcome (delivered, nothing else to store) one recipient after the other:
    the message stays with its history while any recipient is pending, then goes whole."""
    queue = store_backend.queue
    m = message(1, rcpts=("x@example.org", "y@example.org", "z@example.org"))
    await queue.enqueue(m)
    await queue.claim(2e9, 10)
    sent = [HistoryEntry(2e9, "x@example.org", "sent", "relay=mx (250 ok)")]
    assert not await queue.record_outcomes(m.id, [RecipientUpdate(0, RcptState.DELIVERED, 1, 2e9, None)], 2e9,
                                           history=sent)
    assert not await queue.record_outcomes(m.id, [RecipientUpdate(1, RcptState.BOUNCED, 1, 2e9, "550 5.1.1 no")],
                                           2e9, history=[HistoryEntry(2e9, "y@example.org", "bounced", "550")])
    assert await store_backend.recipients() == {m.id: [
        ("x@example.org", "delivered", 1), ("y@example.org", "bounced", 1), ("z@example.org", "active", 0)]}
    assert await store_backend.query("SELECT recipient, event FROM history ORDER BY time, recipient") == [
        ("x@example.org", "sent"), ("y@example.org", "bounced")]
    assert await queue.record_outcomes(m.id, [RecipientUpdate(2, RcptState.DELIVERED, 1, 2e9, None)], 2e9,
                                       history=[HistoryEntry(2e9, "z@example.org", "sent", "relay=mx (250 ok)")])
    assert await store_backend.recipients() == {}
    assert await store_backend.query("SELECT count(*) FROM history") == [(0,)]
    assert await queue.message_data(m.id) is None


async def test_a_claim_takes_fresh_mail_first_then_due_deferrals_and_says_when_the_next_is_due(store_backend):
    queue = store_backend.queue
    deferred = [message(n) for n in range(3)]
    for m in deferred:
        await queue.enqueue(m)
    await queue.claim(2e9, 10)
    for n, m in enumerate(deferred):    # due at 2e9 + 100, + 200 and + 300
        await queue.record_outcomes(m.id, [RecipientUpdate(0, RcptState.DEFERRED, 1, 2e9 + 100 * (n + 1),
                                                           "451 4.4.1 later")], 2e9)
    fresh = [message(10), message(11)]
    for m in fresh:
        await queue.enqueue(m)
    # At 2e9 + 250 two deferrals are due: fresh mail goes first, then the deferrals oldest first,
    # as much as the limit leaves room for; the next due is the first not claimed.
    first = await queue.claim(2e9 + 250, 3)
    assert [d.message_id for d in first.due] == [fresh[0].id, fresh[1].id, deferred[0].id]
    assert first.next_due == 2e9 + 200
    second = await queue.claim(2e9 + 250, 3)
    assert [(d.message_id, d.attempts) for d in second.due] == [(deferred[1].id, 1)]
    assert second.next_due == 2e9 + 300
    empty = await queue.claim(2e9 + 250, 3)
    assert (empty.due, empty.bodies, empty.next_due) == ([], {}, 2e9 + 300)


async def test_recover_in_flight_makes_claimed_recipients_due(store_backend):
    queue = store_backend.queue
    fresh, tried = message(1), message(2)
    await queue.enqueue(fresh)
    await queue.enqueue(tried)
    await queue.claim(2e9, 10)
    await queue.record_outcomes(tried.id, [RecipientUpdate(0, RcptState.DEFERRED, 1, 2e9, "451 4.4.1 later")], 2e9)
    await queue.claim(2e9, 10)
    # As after a crash: both left 'active' by this node's previous life.
    assert await queue.recover_in_flight() == 2
    assert await store_backend.recipients() == {fresh.id: [("b@example.org", "queued", 0)],
                                                tried.id: [("b@example.org", "deferred", 1)]}


async def test_local_delivery_copies_are_stored_with_the_outcome(store_backend):
    queue = store_backend.queue
    m = message(1, rcpts=("Bob@lab.test",))
    await queue.enqueue(m)
    await queue.claim(2e9, 10)
    copy = MailboxCopy("Bob@lab.test", m.id, m.sender, "1", b"Return-Path: <a@lab.test>\r\n" + m.data,
                       arrival=m.arrival)
    assert await queue.record_outcomes(m.id, [RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None)], 2e9,
                                       mailbox_copies=[copy])
    assert await store_backend.query("SELECT mailbox, queue_id, received, sender, subject, size, data"
                                     " FROM mailbox_messages") == [
        ("bob@lab.test", m.id, m.arrival, m.sender, "1", len(copy.data), copy.data)]


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
