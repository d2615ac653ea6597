"""The lab mailboxes (mta.store.api.Mailboxes) on both backends (``store_backend``): what
POP3 and `mta mailbox` read and remove, straight on the store. Mail gets in the way
local delivery puts it there: through the queue, in the commit that marks it delivered."""

from __future__ import annotations

import time

import pytest

from mta.store.api import MailboxSummary, MessageSummary, StoredMessage, uidl

pytestmark = pytest.mark.timeout(60)

ONE = b"From: carol@remote.test\r\nSubject: one\r\n\r\nHello\r\n.hidden\r\n"
TWO = b"Subject: two\r\n\r\nline 1\r\nline 2\r\n"
THREE = b"Subject: three\r\n\r\nno line end at the end"


async def test_messages_in_arrival_order_with_sizes_and_bytes(store_backend):
    boxes = store_backend.mailboxes
    # Arrival order, not delivery order: THREE arrived first.
    t = time.time()
    ids = await store_backend.deliver("Alice@Lab.Test", (ONE, t - 20), (TWO, t - 10), (THREE, t - 30))
    stored = await boxes.messages("alice@lab.test")
    assert [(m.queue_id, m.size) for m in stored] == [(ids[2], len(THREE)), (ids[0], len(ONE)), (ids[1], len(TWO))]
    assert [m.received for m in stored] == sorted(m.received for m in stored)
    assert await boxes.messages("ALICE@lab.test") == stored   # mailboxes ignore case
    assert [await boxes.read("alice@lab.test", m.id) for m in stored] == [THREE, ONE, TWO]
    assert stored[0].uid == uidl(ids[2], stored[0].id)
    assert await boxes.read("bob@lab.test", stored[0].id) is None   # not bob's
    assert await boxes.read("alice@lab.test", max(m.id for m in stored) + 1000) is None
    assert await boxes.messages("bob@lab.test") == []
    assert await boxes.listing("alice@lab.test") == [
        MessageSummary(m.id, m.queue_id, m.size, m.received, "carol@remote.test", subject)
        for m, subject in zip(stored, ("three", "one", "two"), strict=True)]


async def test_delete_at_quit_and_ids_never_reused(store_backend):
    boxes = store_backend.mailboxes
    await store_backend.deliver("alice@lab.test", ONE, TWO, THREE)
    first, second, third = await boxes.messages("alice@lab.test")
    assert await boxes.delete("alice@lab.test", []) == 0
    assert await boxes.delete("bob@lab.test", [first.id]) == 0              # another's message: kept
    assert await boxes.delete("alice@lab.test", [first.id, third.id, third.id + 1000]) == 2
    assert await boxes.messages("alice@lab.test") == [second]
    assert await boxes.delete("alice@lab.test", [first.id]) == 0            # gone already
    # The newest message was removed: a new one still gets a new id (it is in the UIDL).
    await store_backend.deliver("alice@lab.test", ONE)
    newest = (await boxes.messages("alice@lab.test"))[-1]
    assert newest.id > third.id and newest.uid not in {m.uid for m in (first, second, third)}


async def test_purge_summaries_and_prune(store_backend):
    boxes = store_backend.mailboxes
    now = time.time()
    await store_backend.deliver("alice@lab.test", (ONE, now - 3 * 86400), (TWO, now - 3600))
    await store_backend.deliver("bob@lab.test", (THREE, now - 2 * 86400))
    await store_backend.deliver("carol@lab.test", (TWO, now - 5 * 86400), (THREE, now - 60))
    assert await boxes.summaries() == [
        MailboxSummary("alice@lab.test", 2, len(ONE) + len(TWO), now - 3 * 86400, now - 3600),
        MailboxSummary("bob@lab.test", 1, len(THREE), now - 2 * 86400, now - 2 * 86400),
        MailboxSummary("carol@lab.test", 2, len(TWO) + len(THREE), now - 5 * 86400, now - 60)]
    # max_age 1 day, bob's maildrop held by a POP3 session (given in any case): it waits.
    assert await boxes.prune_older_than(now - 86400, skip={"Bob@lab.test".lower()}) == 2
    assert [(s.mailbox, s.messages) for s in await boxes.summaries()] == [
        ("alice@lab.test", 1), ("bob@lab.test", 1), ("carol@lab.test", 1)]
    assert await boxes.prune_older_than(now - 86400) == 1
    assert await boxes.prune_older_than(now - 86400) == 0
    assert await boxes.purge("Carol@lab.test") == 1
    assert await boxes.purge("carol@lab.test") == 0
    assert [(s.mailbox, s.messages) for s in await boxes.summaries()] == [("alice@lab.test", 1)]
    [left] = await boxes.messages("alice@lab.test")
    assert (left.size, left.received) == (len(TWO), now - 3600)
    assert isinstance(left, StoredMessage)


async def test_max_messages_keeps_the_newest(store_backend):
    for n in range(5):
        await store_backend.deliver("alice@lab.test", b"Subject: %d\r\n\r\n" % n, max_messages=3)
    assert [m.subject for m in await store_backend.mailboxes.listing("alice@lab.test")] == ["2", "3", "4"]


async def test_the_maildrop_lock(store_backend):
    boxes = store_backend.mailboxes
    first = await boxes.lock("alice@lab.test")
    assert first is not None
    assert await boxes.lock("alice@lab.test") is None
    assert await boxes.lock("ALICE@Lab.Test") is None       # the same maildrop
    other = await boxes.lock("bob@lab.test")                 # another one is free
    assert other is not None
    await first.release()
    await first.release()                                    # idempotent
    again = await boxes.lock("Alice@lab.test")
    assert again is not None
    assert await boxes.lock("alice@lab.test") is None        # the second release freed nothing else
    await again.release()
    await other.release()
