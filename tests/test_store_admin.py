"""Queue administration (mta.store.api.QueueAdmin) on both backends (``store_backend``):
what `mta queue …` and the metrics' queue gauges read and change, straight on the store.

The daemon-level tests (tests/test_queue_admin.py) show the same commands end to end on
SQLite; here every result is checked on SQLite and PostgreSQL alike."""

from __future__ import annotations

import contextlib
import importlib
import time

import pytest

from mta.model import NewMessage, QueuedMessage, RcptState, Recipient
from mta.store.api import (
    AdminResult,
    HistoryEntry,
    QueueEntry,
    QueueSummary,
    RecipientUpdate,
    classify_message,
)

pytestmark = pytest.mark.timeout(60)

Q, A, D, H, S = RcptState.QUEUED, RcptState.ACTIVE, RcptState.DEFERRED, RcptState.HELD, RcptState.DELIVERED
T0 = 1_700_000_000.0
NOW = 2_000_000_000.0


def msg(n: int, *states: RcptState) -> NewMessage:
    """Message n (id 0C…n, arrival T0 + n) with one recipient per state, r0@, r1@, …"""
    rcpts = tuple(Recipient(f"r{i}@remote.test", state=s) for i, s in enumerate(states))
    return NewMessage(id=f"0C{n:010X}", sender="a@lab.test", recipients=rcpts, data=b"Subject: x\r\n\r\n" + b"x" * n,
                      arrival=T0 + n, client="192.0.2.7", listener="mta", helo="client.example", auth_user="alice")


async def enqueue(backend, *messages: NewMessage, attempts: int = 0) -> None:
    """Enqueue, then give every recipient ``attempts`` (as if tried before)."""
    for m in messages:
        await backend.queue.enqueue(m)
        if attempts:
            await backend.execute(f"UPDATE recipients SET attempts = {attempts} WHERE message_id = '{m.id}'")


async def states(backend, message_id: str) -> list[tuple[str, str, int, float]]:
    return [(a, s, int(n), float(t)) for a, s, n, t in await backend.query(
        f"SELECT address, state, attempts, next_attempt FROM recipients WHERE message_id = '{message_id}'"
        " ORDER BY rcpt_no")]


async def history(backend, message_id: str) -> list[tuple[str | None, str, str | None]]:
    # time, then insertion order: SQLite's rowid, PostgreSQL's identity column
    order = "rowid" if backend.name == "sqlite" else "no"
    return [tuple(r) for r in await backend.query(
        f"SELECT recipient, event, detail FROM history WHERE message_id = '{message_id}' ORDER BY time, {order}")]


async def listed(backend, batch: int = 2000) -> list[QueueEntry]:
    async with contextlib.aclosing(backend.admin.iter_queue(batch=batch)) as batches:
        return [e for b in [b async for b in batches] for e in b]


# --------------------------------------------------------------------------- reading


async def test_queue_summary_agrees_with_the_list(store_backend):
    admin = store_backend.admin
    assert await admin.queue_summary(time.time()) == QueueSummary(0, 0, 0, None)
    assert await admin.count_recipients() == {}
    # 1 hold, 2 hold (held wins over queued), 3 active, 4 active, 5 deferred, 6 deferred (+ delivered)
    for n, rcpt_states in enumerate([(H,), (Q, H), (Q, D), (A,), (D,), (S, D)], start=1):
        await store_backend.queue.enqueue(msg(n, *rcpt_states))
    entries = await listed(store_backend, batch=2)
    summary = await admin.queue_summary(time.time())
    assert [e.queue_name for e in entries] == ["hold", "hold", "active", "active", "deferred", "deferred"]
    assert [classify_message(r[1] for r in e.recipients) for e in entries] == [e.queue_name for e in entries]
    assert [len(e.recipients) for e in entries] == [1, 2, 2, 1, 1, 1]  # delivered ones are not listed
    assert summary == QueueSummary(active=2, deferred=2, hold=2, oldest_arrival=T0 + 1)
    assert await admin.count_recipients() == {"held": 2, "queued": 2, "deferred": 3, "active": 1, "delivered": 1}


async def test_iter_queue_lists_pending_recipients_oldest_first_in_batches(store_backend):
    await enqueue(store_backend, *(msg(n, Q, S, D) for n in (3, 1, 2)), attempts=1)
    for batch in (1, 2, 5, 2000):
        entries = await listed(store_backend, batch)
        assert entries == [
            QueueEntry("active", f"0C{n:010X}", "a@lab.test", T0 + n, 14 + n,
                       [("r0@remote.test", "queued", 1, T0 + n, None), ("r2@remote.test", "deferred", 1, T0 + n, None)])
            for n in (1, 2, 3)], batch
    # Stopped after the first list: the rest is never read, and the store stays usable.
    async with contextlib.aclosing(store_backend.admin.iter_queue(batch=1)) as batches:
        async for first in batches:
            assert [e.id for e in first] == ["0C0000000001"]
            break
    assert len(await store_backend.admin.list_messages()) == 3


async def test_list_messages_and_message_detail(store_backend):
    queue, admin = store_backend.queue, store_backend.admin
    first, second = msg(1, Q, Q), msg(2, Q)
    await queue.enqueue(first)
    await queue.enqueue(second)
    await queue.claim(NOW, 10)
    await queue.record_outcomes(
        first.id, [RecipientUpdate(0, S, 1, 0.0, None), RecipientUpdate(1, D, 1, NOW + 600, "451 4.3.0 later")],
        NOW, history=[HistoryEntry(NOW, "r0@remote.test", "delivered", "250 ok"),
                      HistoryEntry(NOW, "r1@remote.test", "deferred", "451 4.3.0 later")])
    expected_first = QueuedMessage(
        id=first.id, sender="a@lab.test", arrival=T0 + 1, size=len(first.data),
        recipients=(Recipient("r0@remote.test", S, 1, 0.0, None),
                    Recipient("r1@remote.test", D, 1, NOW + 600, "451 4.3.0 later")),
        client="192.0.2.7", listener="mta")
    expected_second = QueuedMessage(
        id=second.id, sender="a@lab.test", arrival=T0 + 2, size=len(second.data),
        recipients=(Recipient("r0@remote.test", A, 0, T0 + 2, None),), client="192.0.2.7", listener="mta")
    assert await admin.list_messages() == [expected_first, expected_second]
    assert await admin.list_messages([second.id, "0CFFFFFFFFFF"]) == [expected_second]
    assert await admin.list_messages([]) == []

    detail = await admin.message_detail(first.id)
    assert detail is not None
    assert (detail.message, detail.helo, detail.auth_user, detail.data) == (
        expected_first, "client.example", "alice", first.data)
    assert detail.history == (HistoryEntry(NOW, "r0@remote.test", "delivered", "250 ok"),
                              HistoryEntry(NOW, "r1@remote.test", "deferred", "451 4.3.0 later"))
    assert await admin.message_detail("0CFFFFFFFFFF") is None


async def test_check_finds_a_sound_store_sound(store_backend):
    await store_backend.deliver("alice@lab.test", b"Subject: hi\r\n\r\nbody\r\n")
    await store_backend.queue.enqueue(msg(1, Q, D))
    assert await store_backend.admin.check() == []


# --------------------------------------------------------------------------- changing


async def test_hold_release_flush_requeue(store_backend):
    queue, admin = store_backend.queue, store_backend.admin
    # A: queued + deferred (tried once), B: deferred only, C: all delivered but one held
    a, b, c = msg(1, Q, D), msg(2, D), msg(3, S, H)
    await enqueue(store_backend, a, c, attempts=1)
    await enqueue(store_backend, b, attempts=2)

    assert await admin.hold([a.id, "0CFFFFFFFFFF", a.id], NOW, detail="by test") == AdminResult((a.id,), {a.id: 2})
    assert await states(store_backend, a.id) == [("r0@remote.test", "held", 1, T0 + 1),
                                                  ("r1@remote.test", "held", 1, T0 + 1)]
    assert await history(store_backend, a.id) == [("r0@remote.test", "held", "by test"),
                                                   ("r1@remote.test", "held", "by test")]
    assert await admin.hold([c.id], NOW) == AdminResult((c.id,), {c.id: 0})   # nothing left to hold

    # release: tried before -> deferred, due now; history row per recipient
    assert await admin.release([a.id, c.id], NOW + 1) == AdminResult((a.id, c.id), {a.id: 2, c.id: 1})
    assert await states(store_backend, a.id) == [("r0@remote.test", "deferred", 1, NOW + 1),
                                                  ("r1@remote.test", "deferred", 1, NOW + 1)]
    assert await states(store_backend, c.id) == [("r0@remote.test", "delivered", 1, T0 + 3),
                                                  ("r1@remote.test", "deferred", 1, NOW + 1)]
    assert (await history(store_backend, c.id))[-1] == ("r1@remote.test", "released", None)

    # flush of all: every deferred recipient is due now, and stays deferred
    result = await admin.flush(None, NOW + 2, detail="flush all")
    assert (sorted(result.found), result.changed) == (sorted([a.id, b.id, c.id]), {a.id: 2, b.id: 1, c.id: 1})
    assert await states(store_backend, b.id) == [("r0@remote.test", "deferred", 2, NOW + 2)]
    assert await admin.flush([b.id], NOW + 3) == AdminResult((b.id,), {b.id: 1})

    # requeue: fresh work ('queued'), attempts kept; one being delivered is left alone
    [due] = (await queue.claim(NOW + 3, 1)).due
    assert (due.message_id, due.rcpt_no) == (a.id, 0)   # the earliest due
    assert await admin.requeue([a.id, b.id, c.id], NOW + 4) == AdminResult(
        (a.id, b.id, c.id), {a.id: 1, b.id: 1, c.id: 1})
    assert await states(store_backend, a.id) == [("r0@remote.test", "active", 1, NOW + 2),
                                                  ("r1@remote.test", "queued", 1, NOW + 4)]
    assert await states(store_backend, b.id) == [("r0@remote.test", "queued", 2, NOW + 4)]
    assert await states(store_backend, c.id) == [("r0@remote.test", "delivered", 1, T0 + 3),
                                                  ("r1@remote.test", "queued", 1, NOW + 4)]
    assert await history(store_backend, b.id) == [("r0@remote.test", "flushed", "flush all"),
                                                   ("r0@remote.test", "flushed", None),
                                                   ("r0@remote.test", "requeued", None)]
    assert await admin.release([b.id], NOW + 5) == AdminResult((b.id,), {b.id: 0})   # nothing held


async def test_hold_of_a_recipient_being_delivered(store_backend):
    """On hold while being tried: a deferral leaves it held, a final result is kept."""
    queue, admin = store_backend.queue, store_backend.admin
    m = msg(1, Q, Q)
    await queue.enqueue(m)
    assert len((await queue.claim(NOW, 10)).due) == 2
    assert await admin.hold([m.id], NOW, detail="wait") == AdminResult((m.id,), {m.id: 2})
    assert not await queue.record_outcomes(
        m.id, [RecipientUpdate(0, D, 1, NOW + 600, "451 later"), RecipientUpdate(1, S, 1, 0.0, None)], NOW + 1)
    assert await states(store_backend, m.id) == [("r0@remote.test", "held", 1, NOW + 600),
                                                  ("r1@remote.test", "delivered", 1, 0.0)]
    assert (await queue.claim(NOW + 3600, 10)).due == []   # held: never claimed
    assert await admin.release([m.id], NOW + 2) == AdminResult((m.id,), {m.id: 1})
    [again] = (await queue.claim(NOW + 2, 10)).due
    assert (again.message_id, again.rcpt_no, again.attempts) == (m.id, 0, 1)


async def test_delete_one_then_all(store_backend):
    queue, admin = store_backend.queue, store_backend.admin
    a, b, c = msg(1, Q, S), msg(2, D, H), msg(3, Q)
    for m in (a, b, c):
        await queue.enqueue(m)
    assert await admin.delete([b.id, "0CFFFFFFFFFF"]) == AdminResult((b.id,), {b.id: 2})
    assert await queue.message_data(b.id) is None
    assert await store_backend.query(f"SELECT count(*) FROM history WHERE message_id = '{b.id}'") == [(0,)]
    assert await admin.delete(None) == AdminResult((a.id, c.id), {a.id: 1, c.id: 1})
    assert await store_backend.recipients() == {}
    assert await store_backend.query("SELECT count(*) FROM bodies") == [(0,)]
    assert await admin.queue_summary(NOW) == QueueSummary(0, 0, 0, None)
    assert await admin.delete(None) == AdminResult((), {})


async def test_a_message_deleted_while_being_delivered_stays_gone(store_backend):
    queue, admin = store_backend.queue, store_backend.admin
    m = msg(1, Q)
    await queue.enqueue(m)
    [due] = (await queue.claim(NOW, 10)).due
    assert await admin.delete([m.id]) == AdminResult((m.id,), {m.id: 1})
    await queue.record_outcomes(m.id, [RecipientUpdate(0, D, 1, NOW + 600, "451 later")], NOW + 1,
                                history=[HistoryEntry(NOW + 1, "r0@remote.test", "deferred", "451 later")])
    assert await store_backend.recipients() == {}
    assert await store_backend.query("SELECT count(*) FROM history") == [(0,)]
    assert await admin.list_messages() == []


async def test_admin_writes_in_chunks_act_on_every_message(store_backend, monkeypatch):
    # asyncpg is an optional extra: the PostgreSQL module is imported on its backend only
    module = importlib.import_module(f"mta.store.{store_backend.name}.admin")
    monkeypatch.setattr(module, "ADMIN_CHUNK", 2)
    ids = []
    for n in range(1, 6):
        m = msg(n, D, Q)
        ids.append(m.id)
        await store_backend.queue.enqueue(m)
    result = await store_backend.admin.hold(reversed(ids), NOW)
    assert result == AdminResult(tuple(reversed(ids)), dict.fromkeys(ids, 2))
    assert await store_backend.admin.count_recipients() == {"held": 10}
    assert await store_backend.admin.delete(None) == AdminResult(tuple(ids), dict.fromkeys(ids, 2))
