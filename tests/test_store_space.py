"""Issue 12: recording delivery outcomes costs little room (a full disk heals by itself).

On the captured full queue (tests/test_diskfull_repro.py) removing one delivered
message wrote 157-210 kB to the WAL: 28 deferral history rows scattered over 28
pages, plus the body's pages zero-filled by Debian's secure_delete. These tests
pin the cheaper layout: repeated deferrals are one row, deferral history stops at
HISTORY_ROWS_PER_MESSAGE and below the reserve, and freed pages are not rewritten.
"""

from __future__ import annotations

import os
import time

import pytest

from mta.model import NewMessage, RcptState, Recipient
from mta.store.api import HistoryEntry, RecipientUpdate, new_queue_id
from mta.store.sqlite import queue as store_module
from mta.store.sqlite.store import SQLiteStore

REFUSED = "relay=none (451 4.4.1 connect to 127.0.0.2[127.0.0.2]:4046: Connection refused)"


def _message(n: int, size: int = 30_000) -> NewMessage:
    return NewMessage(id=new_queue_id(), sender="load@src.test", recipients=(Recipient("r@dst.test"),),
                      data=f"X-Seq: {n}\r\n\r\n".encode() + b"y" * size, arrival=time.time(),
                      client="127.0.0.1")


async def _defer_all(store: SQLiteStore, detail: str | None = None) -> None:
    """Claim every due recipient and record a deferral due again at once."""
    now = time.time()
    claimed = await store.queue.claim(now, 1000)
    detail = detail or REFUSED
    for d in claimed.due:
        update = RecipientUpdate(d.rcpt_no, RcptState.DEFERRED, d.attempts + 1, now, detail)
        await store.queue.record_outcomes(d.message_id, [update], now,
                                    history=[HistoryEntry(now, d.address, "deferred", detail)])


async def _history_rows(store: SQLiteStore, message_id: str) -> list[tuple[str, str]]:
    async with store.engine.db.execute("SELECT event, detail FROM history WHERE message_id = ? ORDER BY time, rowid",
                                (message_id,)) as cur:
        return [tuple(r) for r in await cur.fetchall()]


def _wal_bytes(store: SQLiteStore) -> int:
    wal = f"{store.path}-wal"
    return os.path.getsize(wal) if os.path.exists(wal) else 0


async def test_removing_a_message_deferred_28_times_writes_little(tmp_path):
    """50 messages of 30 kB each deferred 28 times with the same reason (the captured
    queue's shape): one history row each, and recording a delivery that removes one
    writes well under the 157-210 kB it took there."""
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    try:
        messages = [_message(n) for n in range(50)]
        for m in messages:
            await store.queue.enqueue(m)
        for _ in range(28):
            await _defer_all(store)
        middle = messages[25].id
        assert await _history_rows(store, middle) == [("deferred", REFUSED)]
        async with store.engine.db.execute("SELECT attempts, last_error FROM recipients WHERE message_id = ?",
                                    (middle,)) as cur:
            assert await cur.fetchall() == [(28, REFUSED)]   # the recipient row has the rest

        now = time.time()
        claimed = await store.queue.claim(now, 1000)
        due = next(d for d in claimed.due if d.message_id == middle)
        await store.engine.checkpoint()   # an empty WAL: what follows is the removal alone
        assert _wal_bytes(store) == 0
        removed = await store.queue.record_outcomes(
            middle, [RecipientUpdate(due.rcpt_no, RcptState.DELIVERED, 29, now, None)], now,
            history=[HistoryEntry(now, due.address, "sent", "relay=x (250 ok)")])
        assert removed
        written = _wal_bytes(store)
        print(f"removing a message deferred 28 times: {written} bytes of WAL")
        assert written < 64 * 1024
        assert await store.admin.integrity_check() == "ok"
    finally:
        await store.close()


async def test_deferral_history_is_capped_and_left_out_below_the_reserve(tmp_path, monkeypatch):
    """Different reasons are each written, up to HISTORY_ROWS_PER_MESSAGE rows per message;
    below the reserve (new mail is refused) no deferral row is written at all."""
    cap = store_module.HISTORY_ROWS_PER_MESSAGE
    store = SQLiteStore(tmp_path / "queue.db", reserve=100_000)
    await store.open()
    try:
        capped, short = _message(1, 100), _message(2, 100)
        await store.queue.enqueue(capped)
        for n in range(cap + 8):
            await _defer_all(store, f"relay=mx{n} (451 4.7.1 try later)")
        rows = await _history_rows(store, capped.id)
        assert rows == [("deferred", f"relay=mx{n} (451 4.7.1 try later)") for n in range(cap)]

        await store.admin.delete([capped.id])
        await store.queue.enqueue(short)
        monkeypatch.setattr(store.engine, "free_space", lambda: 50_000)   # below the reserve
        await _defer_all(store, "relay=mx1 (451 4.7.1 try later)")
        assert await _history_rows(store, short.id) == []
        monkeypatch.undo()
        await _defer_all(store, "relay=mx2 (451 4.7.1 try later)")
        assert await _history_rows(store, short.id) == [("deferred", "relay=mx2 (451 4.7.1 try later)")]
        # Operators' actions are always written.
        await store.admin.hold([short.id], time.time())
        assert [e for e, _ in await _history_rows(store, short.id)] == ["deferred", "held"]
    finally:
        await store.close()


@pytest.mark.parametrize("inline", [False, True])
async def test_deleted_pages_are_not_zero_filled(tmp_path, inline):
    """secure_delete FAST on both of the store's connections (Debian's SQLite has it ON)."""
    store = SQLiteStore(tmp_path / "queue.db")
    store.engine.inline_writes = inline
    await store.open()
    try:
        async with store.engine.db.execute("PRAGMA secure_delete") as cur:
            assert (await cur.fetchone())[0] == 2
        if inline:
            assert store.engine._inline is not None
            assert store.engine._inline.execute("PRAGMA secure_delete").fetchone()[0] == 2
    finally:
        await store.close()
