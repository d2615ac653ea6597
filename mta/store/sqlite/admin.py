"""Queue administration in SQL: `mta queue …` and the metrics' queue gauges.

`mta queue …` runs these in its own process on the daemon's live file. Each
write is a short BEGIN IMMEDIATE transaction over at most ADMIN_CHUNK messages
(Engine.write), so the daemon never waits long; it sees the result at its next
poll of the queue (within a second). Reads go through Engine.read, Engine.stream
and Engine.read_snapshot, so damage met here is reported like any other.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncGenerator, Iterable, Sequence
from typing import Any, cast

from mta.model import QueuedMessage, RcptState, Recipient
from mta.store.admin_rows import PENDING_SQL, detail_from_rows, entries_from_rows
from mta.store.api import (
    QUEUE_NAMES,
    AdminResult,
    MessageDetail,
    QueueEntry,
    QueueSummary,
)
from mta.store.sqlite.damage import is_corruption
from mta.store.sqlite.engine import Engine

# classify_message() (api.py) and _CLASSIFY_SQL are the same rule, so `queue list`
# and queue_summary() agree.
_CLASSIFY_SQL = ("CASE WHEN max(r.state = 'held') THEN 'hold'"
                 " WHEN max(r.state IN ('queued', 'active')) THEN 'active' ELSE 'deferred' END")
ADMIN_CHUNK = 500  # messages per admin write transaction: the daemon never waits long




class SQLiteQueueAdmin:
    """mta.store.api.QueueAdmin on the SQLite engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def list_messages(self, ids: Iterable[str] | None = None) -> list[QueuedMessage]:
        """Every message with its recipients, oldest first (no message data loaded)."""
        where, args = "", cast(tuple[str, ...], ())
        if ids is not None:
            id_list = tuple(ids)
            where = f"WHERE m.id IN ({','.join('?' * len(id_list))})"
            args = id_list
        query = (
            "SELECT m.id, m.sender, m.arrival, m.size, m.client, m.listener, m.smtputf8, m.body_8bit,"
            " m.ret, m.envid, r.address, r.state, r.attempts, r.next_attempt, r.last_error, r.notify,"
            f" r.orcpt FROM messages m JOIN recipients r ON r.message_id = m.id {where}"
            " ORDER BY m.arrival, m.id, r.rcpt_no"
        )
        rows = await self.engine.read(lambda conn: conn.execute(query, args).fetchall())
        return _group_messages(rows)

    async def count_recipients(self) -> dict[str, int]:
        rows = await self.engine.read(
            lambda conn: conn.execute("SELECT state, count(*) FROM recipients GROUP BY state").fetchall())
        return {str(state): int(n) for state, n in rows}

    async def integrity_check(self) -> str:
        """``PRAGMA integrity_check``'s first line: "ok" when the file is sound."""
        row = await self.engine.read(lambda conn: conn.execute("PRAGMA integrity_check").fetchone())
        return str(row[0]) if row else "no answer"

    async def check(self, limit: int = 100) -> list[str]:
        """``PRAGMA integrity_check``, every page (`mta queue check`): [] when the file is
        sound, else up to ``limit`` problems. Some damage SQLite reports by failing the
        check instead: that failure is the one problem then."""

        def check(conn: sqlite3.Connection) -> list[str]:
            try:
                rows = conn.execute(f"PRAGMA integrity_check({int(limit)})").fetchall()
            except sqlite3.DatabaseError as exc:
                if not is_corruption(exc):
                    raise
                return [str(exc)]
            return [str(row[0]) for row in rows]

        problems = await self.engine.read(check)
        return [] if problems == ["ok"] else problems

    async def queue_summary(self, now: float) -> QueueSummary:
        """Messages per queue (classified as `mta queue list` does) in one aggregate query.

        The classification depends on recipient states only, not on the time: ``now``
        is accepted so callers need not change if due-but-deferred mail ever counts apart.
        """
        # The counts come from the recipients index alone; the oldest pending message is
        # the first one in arrival order with a pending recipient (a short index scan).
        query = (f"SELECT cls, count(*), (SELECT m.arrival FROM messages m WHERE EXISTS (SELECT 1 FROM"
                 f" recipients r WHERE r.message_id = m.id AND r.state IN {PENDING_SQL}) ORDER BY m.arrival"
                 f" LIMIT 1) FROM (SELECT {_CLASSIFY_SQL} AS cls FROM recipients r"
                 f" WHERE r.state IN {PENDING_SQL} GROUP BY r.message_id) GROUP BY cls")
        counts = dict.fromkeys(QUEUE_NAMES, 0)
        oldest: float | None = None
        # Through Engine.read, so that a damaged page found here is reported.
        for cls, n, arrival in await self.engine.read(lambda conn: conn.execute(query).fetchall()):
            counts[str(cls)] = int(n)
            oldest = float(arrival) if arrival is not None else None
        return QueueSummary(counts["active"], counts["deferred"], counts["hold"], oldest)

    async def iter_queue(self, *, batch: int = 2000) -> AsyncGenerator[list[QueueEntry], None]:
        """Messages with pending recipients, oldest first, each with those recipients only
        (what mailq shows), in lists of about ``batch`` rows.

        One SELECT, streamed (Engine.stream): one snapshot, so a message is listed whole
        or not at all however long the listing takes, and no query per message."""
        # CROSS JOIN keeps messages outermost: a scan of messages_arrival (arrival, rowid),
        # then each message's recipients by primary key (message_id, rcpt_no). That is
        # exactly the ORDER BY, so SQLite sorts nothing (an index with arrival, sender,
        # size and id would also spare the lookups of the message rows).
        query = ("SELECT m.id, m.sender, m.arrival, m.size, r.address, r.state, r.attempts,"
                 " r.next_attempt, r.last_error FROM messages m CROSS JOIN recipients r"
                 f" ON r.message_id = m.id WHERE r.state IN {PENDING_SQL}"
                 " ORDER BY m.arrival, m.rowid, r.rcpt_no")
        async with contextlib.aclosing(self.engine.stream(query, batch=batch)) as batches, \
                contextlib.aclosing(entries_from_rows(batches)) as entries:
            async for done in entries:
                yield done

    async def message_detail(self, message_id: str) -> MessageDetail | None:
        """The whole message for `mta queue show`, read in one snapshot."""
        def read(conn: sqlite3.Connection) -> tuple[Any, list[Any], list[Any]] | None:
            row = conn.execute(
                "SELECT id, sender, arrival, size, client, listener, smtputf8, body_8bit, ret, envid,"
                " helo, auth_user, b.data FROM messages JOIN bodies b ON b.message_id = id WHERE id = ?",
                (message_id,)).fetchone()
            if row is None:
                return None
            rcpts = conn.execute(
                "SELECT address, state, attempts, next_attempt, last_error, notify, orcpt FROM recipients"
                " WHERE message_id = ? ORDER BY rcpt_no", (message_id,)).fetchall()
            history = conn.execute(
                "SELECT time, recipient, event, detail FROM history WHERE message_id = ?"
                " ORDER BY time, rowid", (message_id,)).fetchall()
            return row, rcpts, history

        # One read transaction: the three queries see the same queue.
        found = await self.engine.read_snapshot(read)
        if found is None:
            return None
        return detail_from_rows(*found)

    async def hold(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult:
        """Pending recipients (queued, deferred, even active) become 'held': never claimed.
        One being delivered right now keeps its result if that is final (record_outcomes)."""
        return await self._admin(ids, ("queued", "deferred", "active"), "held",
                                 "state = 'held'", (), now, detail)

    async def release(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult:
        """Held recipients are due now: 'deferred' if tried before, else 'queued'."""
        return await self._admin(ids, ("held",), "released",
                                 "state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END,"
                                 " next_attempt = ?", (now,), now, detail)

    async def flush(self, ids: Iterable[str] | None, now: float, *, detail: str | None = None) -> AdminResult:
        """Deferred recipients (of ``ids``, or all) are due now; they stay 'deferred'."""
        return await self._admin(ids, ("deferred",), "flushed", "next_attempt = ?", (now,), now, detail)

    async def requeue(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult:
        """Queued, deferred and held recipients become fresh work due now ('queued'; attempts
        kept). Active ones are left to the delivery in progress."""
        return await self._admin(ids, ("queued", "deferred", "held"), "requeued",
                                 "state = 'queued', next_attempt = ?", (now,), now, detail)

    async def delete(self, ids: Iterable[str] | None) -> AdminResult:
        """Remove messages (``ids``, or all); recipients and history go with them."""
        return await self._admin(ids, None, None, "", (), 0.0, None)

    async def _admin(self, ids: Iterable[str] | None, states: tuple[str, ...] | None, event: str | None,
                     assignment: str, args: tuple[Any, ...], now: float, detail: str | None) -> AdminResult:
        """Update the recipients in ``states`` of the messages ``ids`` with ``assignment``
        and write an ``event`` history row for each; delete the messages when ``states``
        is None. ids=None means every message with a recipient in ``states``."""
        # The recipients acted on (delete: counts the pending ones it removes). Within a
        # chunk, "+state" keeps SQLite on the primary key (message_id): the (state, …)
        # index would have it scan every deferred recipient of the queue for each chunk.
        state_list = f"({', '.join(repr(s) for s in states)})" if states else PENDING_SQL
        in_states = f"+state IN {state_list}"
        if ids is None:
            query = ("SELECT id FROM messages ORDER BY arrival, id" if states is None else
                     f"SELECT DISTINCT message_id FROM recipients WHERE state IN {state_list}")
            ids = [str(r[0]) for r in await self.engine.read(lambda conn: conn.execute(query).fetchall())]
        wanted = list(dict.fromkeys(ids))
        found: list[str] = []
        changed: dict[str, int] = {}
        for start in range(0, len(wanted), ADMIN_CHUNK):
            chunk = tuple(wanted[start:start + ADMIN_CHUNK])
            marks = ", ".join("?" * len(chunk))

            def op(conn: sqlite3.Connection, chunk: tuple[str, ...] = chunk,
                   marks: str = marks) -> tuple[set[str], dict[str, int]]:
                present = {str(r[0]) for r in conn.execute(f"SELECT id FROM messages WHERE id IN ({marks})",
                                                           chunk)}
                counts = {str(m): int(n) for m, n in conn.execute(
                    f"SELECT message_id, count(*) FROM recipients WHERE message_id IN ({marks})"
                    f" AND {in_states} GROUP BY message_id", chunk)}
                if states is None:
                    conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
                elif counts:
                    conn.execute(
                        "INSERT INTO history (message_id, time, recipient, event, detail)"
                        f" SELECT message_id, ?, address, ?, ? FROM recipients WHERE message_id IN ({marks})"
                        f" AND {in_states} ORDER BY message_id, rcpt_no", (now, event, detail, *chunk))
                    conn.execute(
                        f"UPDATE recipients SET {assignment}, updated = ? WHERE message_id IN ({marks})"
                        f" AND {in_states}", (*args, now, *chunk))
                return present, counts

            present, counts = await self.engine.write(op)
            for message_id in chunk:
                if message_id in present:
                    found.append(message_id)
                    changed[message_id] = counts.get(message_id, 0)
        return AdminResult(tuple(found), changed)


def _group_messages(rows: Iterable[Sequence[object]]) -> list[QueuedMessage]:
    messages: list[QueuedMessage] = []
    current: dict[str, object] | None = None
    rcpts: list[Recipient] = []

    def flush() -> None:
        if current is not None:
            messages.append(QueuedMessage(recipients=tuple(rcpts), **current))  # type: ignore[arg-type]

    for row in rows:
        (mid, sender, arrival, size, client, listener, smtputf8, body_8bit, ret, envid,
         address, state, attempts, next_attempt, last_error, notify, orcpt) = row
        if current is None or current["id"] != mid:
            flush()
            current = dict(id=mid, sender=sender, arrival=arrival, size=size, client=client,
                           listener=listener, smtputf8=bool(smtputf8), body_8bit=bool(body_8bit),
                           ret=ret, envid=envid)
            rcpts = []
        rcpts.append(Recipient(address=str(address), state=RcptState(str(state)), attempts=int(attempts),  # type: ignore[call-overload]
                               next_attempt=float(next_attempt), last_error=last_error,  # type: ignore[arg-type]
                               notify=notify, orcpt=orcpt))  # type: ignore[arg-type]
    flush()
    return messages
