"""Queue administration on PostgreSQL: `mta queue …` and the metrics' queue gauges.

The same semantics as the SQLite backend (mta/store/sqlite/admin.py): the same
classification into active/deferred/hold, the same state changes, the same history
rows, and writes in short transactions of at most ADMIN_CHUNK messages.

Several nodes deliver from the same tables, so every change is made by one UPDATE
(or DELETE) that says which states it acts on: PostgreSQL re-checks that condition
on each row after waiting for a node's claim of it, and the history is written
from what the statement RETURNed, so a recipient claimed meanwhile is neither
changed wrongly nor reported as changed.

Leases: a recipient held while a node delivers it keeps that node's ``lease_node``,
so the node still records a final outcome (as on SQLite) and a deferral leaves it
held (PostgreSQLQueue.record_outcomes); a node whose lease another node took over
records nothing, held or not. Released (or requeued) while that lease still runs,
it is 'active' again, that delivery's: no other node starts a second one, as on
SQLite the one queue manager never does. Summaries and counts are read from the
database, so every node reports the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterable, Sequence
from typing import Any, cast

from mta.model import QueuedMessage, Recipient
from mta.store.admin_rows import PENDING_SQL, RCPT_STATES, detail_from_rows, entries_from_rows
from mta.store.api import (
    QUEUE_NAMES,
    AdminResult,
    MessageDetail,
    QueueEntry,
    QueueSummary,
)
from mta.store.postgresql.engine import PgEngine

# classify_message() (api.py) and _CLASSIFY_SQL are the same rule, so `queue list`
# and queue_summary() agree.
_PENDING = ("queued", "active", "deferred", "held")
_CLASSIFY_SQL = ("CASE WHEN bool_or(r.state = 'held') THEN 'hold'"
                 " WHEN bool_or(r.state IN ('queued', 'active')) THEN 'active' ELSE 'deferred' END")
# A held recipient whose delivery is still running: hold keeps the delivering node's lease
# (lease_node is cleared when that node records its outcome), and it has not ended ($4: now).
# Once the lease has ended the node is taken for dead or stalled, as a claim would take it.
_IN_FLIGHT = "state = 'held' AND lease_node IS NOT NULL AND lease_until > $4"
_KEEP_LIVE_LEASE = ("lease_node = CASE WHEN lease_until > $4 THEN lease_node END,"
                    " lease_until = CASE WHEN lease_until > $4 THEN lease_until END")
ADMIN_CHUNK = 500  # messages per admin write transaction: the nodes never wait long
CHECK_LIMIT = 100  # problems reported by check(), as SQLite's integrity_check(100)


class PostgreSQLQueueAdmin:
    """mta.store.api.QueueAdmin on PostgreSQL."""

    def __init__(self, engine: PgEngine):
        self.engine = engine

    async def list_messages(self, ids: Iterable[str] | None = None) -> list[QueuedMessage]:
        """Every message with its recipients, oldest first (no message data loaded)."""
        where, args = "", cast(tuple[list[str], ...], ())
        if ids is not None:
            where, args = "WHERE m.id = ANY($1::text[])", (list(ids),)
        query = (
            "SELECT m.id, m.sender, m.arrival, m.size, m.client, m.listener, m.smtputf8, m.body_8bit,"
            " m.ret, m.envid, r.address, r.state, r.attempts, r.next_attempt, r.last_error, r.notify,"
            f" r.orcpt FROM messages m JOIN recipients r ON r.message_id = m.id {where}"
            " ORDER BY m.arrival, m.id, r.rcpt_no"
        )

        async def read(conn: Any) -> list[Any]:
            return list(await conn.fetch(query, *args))

        return _group_messages(await self.engine.run(read))

    async def count_recipients(self) -> dict[str, int]:
        """Recipients per state: one scan of the recipients_due index (state comes first)."""
        async def read(conn: Any) -> dict[str, int]:
            rows = await conn.fetch("SELECT state, count(*) FROM recipients GROUP BY state")
            return {str(state): int(n) for state, n in rows}

        return await self.engine.run(read)

    async def queue_summary(self, now: float) -> QueueSummary:
        """Messages per queue (classified as `mta queue list` does) in one aggregate query.

        The classification depends on recipient states only, not on the time: ``now``
        is accepted so callers need not change if due-but-deferred mail ever counts apart.
        """
        # The counts come from the recipients_due index alone (state leads it, message_id
        # is in it); the oldest pending message is the first one in arrival order with a
        # pending recipient (messages_arrival, then the recipients' primary key).
        query = (f"SELECT cls, count(*), (SELECT m.arrival FROM messages m WHERE EXISTS (SELECT 1 FROM"
                 f" recipients r WHERE r.message_id = m.id AND r.state IN {PENDING_SQL}) ORDER BY m.arrival"
                 f" LIMIT 1) FROM (SELECT {_CLASSIFY_SQL} AS cls FROM recipients r"
                 f" WHERE r.state IN {PENDING_SQL} GROUP BY r.message_id) per_message GROUP BY cls")

        async def read(conn: Any) -> list[Any]:
            return list(await conn.fetch(query))

        counts = dict.fromkeys(QUEUE_NAMES, 0)
        oldest: float | None = None
        for cls, n, arrival in await self.engine.run(read):
            counts[str(cls)] = int(n)
            oldest = float(arrival) if arrival is not None else None
        return QueueSummary(counts["active"], counts["deferred"], counts["hold"], oldest)

    async def iter_queue(self, *, batch: int = 2000) -> AsyncGenerator[list[QueueEntry], None]:
        """Messages with pending recipients, oldest first, each with those recipients only
        (what mailq shows), in lists of about ``batch`` rows.

        One SELECT through a cursor (PgEngine.stream): one snapshot, so a message is listed
        whole or not at all however long the listing takes, and no query per message."""
        query = ("SELECT m.id, m.sender, m.arrival, m.size, r.address, r.state, r.attempts,"
                 " r.next_attempt, r.last_error FROM messages m JOIN recipients r"
                 f" ON r.message_id = m.id WHERE r.state IN {PENDING_SQL}"
                 " ORDER BY m.arrival, m.id, r.rcpt_no")
        async with contextlib.aclosing(self.engine.stream(query, batch=batch)) as batches, \
                contextlib.aclosing(entries_from_rows(batches)) as entries:
            async for done in entries:
                yield done

    async def message_detail(self, message_id: str) -> MessageDetail | None:
        """The whole message for `mta queue show`, read in one snapshot."""

        async def read(conn: Any) -> tuple[Any, list[Any], list[Any]] | None:
            # The three queries see the same queue (first statement of the transaction).
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            row = await conn.fetchrow(
                "SELECT id, sender, arrival, size, client, listener, smtputf8, body_8bit, ret, envid,"
                " helo, auth_user, b.data FROM messages JOIN bodies b ON b.message_id = id WHERE id = $1",
                message_id)
            if row is None:
                return None
            rcpts = await conn.fetch(
                "SELECT address, state, attempts, next_attempt, last_error, notify, orcpt FROM recipients"
                " WHERE message_id = $1 ORDER BY rcpt_no", message_id)
            history = await conn.fetch(
                "SELECT time, recipient, event, detail FROM history WHERE message_id = $1"
                " ORDER BY time, no", message_id)
            return row, list(rcpts), list(history)

        found = await self.engine.run(read)
        if found is None:
            return None
        return detail_from_rows(*found)

    async def hold(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult:
        """Pending recipients (queued, deferred, even active) become 'held': never claimed.
        One being delivered right now keeps its result if that is final (record_outcomes:
        the delivering node keeps lease_node, so only it can write that result)."""
        return await self._admin(ids, ("queued", "deferred", "active"), "held",
                                 "state = 'held'", (), now, detail)

    async def release(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult:
        """Held recipients are due now: 'deferred' if tried before, else 'queued'. One held
        while a node was delivering it, whose lease still runs, is 'active' again: that
        delivery goes on and records its outcome, and no other node starts a second one
        (on SQLite the one queue manager knows what it has in flight)."""
        return await self._admin(ids, ("held",), "released",
                                 f"state = CASE WHEN {_IN_FLIGHT} THEN 'active' WHEN attempts > 0 THEN 'deferred'"
                                 f" ELSE 'queued' END, {_KEEP_LIVE_LEASE}, next_attempt = $4", (now,), now, detail)

    async def flush(self, ids: Iterable[str] | None, now: float, *, detail: str | None = None) -> AdminResult:
        """Deferred recipients (of ``ids``, or all) are due now; they stay 'deferred'."""
        return await self._admin(ids, ("deferred",), "flushed", "next_attempt = $4", (now,), now, detail)

    async def requeue(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult:
        """Queued, deferred and held recipients become fresh work due now ('queued'; attempts
        kept). Active ones are left to the delivery in progress, and so are held ones still
        being delivered (see release)."""
        return await self._admin(ids, ("queued", "deferred", "held"), "requeued",
                                 f"state = CASE WHEN {_IN_FLIGHT} THEN 'active' ELSE 'queued' END,"
                                 f" {_KEEP_LIVE_LEASE}, next_attempt = $4", (now,), now, detail)

    async def delete(self, ids: Iterable[str] | None) -> AdminResult:
        """Remove messages (``ids``, or all); recipients, bodies and history go with them
        (ON DELETE CASCADE). A node delivering one of them finds its recipients gone and
        records nothing (PostgreSQLQueue.record_outcomes)."""
        return await self._admin(ids, None, None, "", (), 0.0, None)

    async def _admin(self, ids: Iterable[str] | None, states: tuple[str, ...] | None, event: str | None,
                     assignment: str, args: tuple[Any, ...], now: float, detail: str | None) -> AdminResult:
        """Update the recipients in ``states`` of the messages ``ids`` with ``assignment``
        (its parameters ``args`` are $4 on: $1 to $3 are the messages, the states and now)
        and write an ``event`` history row for each; delete the messages when ``states``
        is None. ids=None means every message with a recipient in ``states`` (every
        message, for delete)."""
        acted_on = list(states) if states else list(_PENDING)
        if ids is None:
            async def every(conn: Any) -> list[str]:
                if states is None:
                    rows = await conn.fetch("SELECT id FROM messages ORDER BY arrival, id")
                else:
                    rows = await conn.fetch("SELECT DISTINCT message_id FROM recipients"
                                            " WHERE state = ANY($1::text[])", acted_on)
                return [str(r[0]) for r in rows]

            ids = await self.engine.run(every)
        wanted = list(dict.fromkeys(ids))
        found: list[str] = []
        changed: dict[str, int] = {}
        for start in range(0, len(wanted), ADMIN_CHUNK):
            chunk = wanted[start:start + ADMIN_CHUNK]

            async def op(conn: Any, chunk: list[str] = chunk) -> tuple[set[str], dict[str, int]]:
                counts: dict[str, int] = {}
                if states is None:
                    # The pending recipients counted in the snapshot the DELETE acts on.
                    rows = await conn.fetch(
                        "WITH gone AS (DELETE FROM messages WHERE id = ANY($1::text[]) RETURNING id)"
                        " SELECT g.id, (SELECT count(*) FROM recipients r WHERE r.message_id = g.id"
                        " AND r.state = ANY($2::text[])) FROM gone g", chunk, acted_on)
                    for message_id, n in rows:
                        if n:
                            counts[str(message_id)] = int(n)
                    return {str(r[0]) for r in rows}, counts
                present = {str(r[0]) for r in await conn.fetch(
                    "SELECT id FROM messages WHERE id = ANY($1::text[])", chunk)}
                # One statement: a row a node claims meanwhile is re-checked after that
                # claim's commit, and only the rows changed are in the history. Rows are
                # locked in primary key order, as a node's outcomes lock its message's
                # (rcpt_no order), so the two never wait for each other in a cycle.
                rows = await conn.fetch(
                    f"UPDATE recipients r SET {assignment}, updated = $3"
                    " FROM (SELECT message_id, rcpt_no FROM recipients WHERE message_id = ANY($1::text[])"
                    " AND state = ANY($2::text[]) ORDER BY message_id, rcpt_no FOR UPDATE) AS locked"
                    " WHERE r.message_id = locked.message_id AND r.rcpt_no = locked.rcpt_no"
                    " AND r.state = ANY($2::text[])"
                    " RETURNING r.message_id, r.rcpt_no, r.address",
                    chunk, acted_on, now, *args)
                if rows:
                    done = sorted((str(m), int(n), str(a)) for m, n, a in rows)
                    await conn.executemany(
                        "INSERT INTO history (message_id, time, recipient, event, detail)"
                        " VALUES ($1, $2, $3, $4, $5)",
                        [(m, now, a, event, detail) for m, _n, a in done])
                    for m, _n, _a in done:
                        counts[m] = counts.get(m, 0) + 1
                return present, counts

            present, counts = await self.engine.run(op)
            for message_id in chunk:
                if message_id in present:
                    found.append(message_id)
                    changed[message_id] = counts.get(message_id, 0)
        return AdminResult(tuple(found), changed)

    async def check(self, limit: int = CHECK_LIMIT) -> list[str]:
        """Look at the queue's and the mailboxes' rows for what the schema cannot forbid
        (`mta queue check`): [] when sound, else up to ``limit`` problems, one line each.

        PostgreSQL keeps its own pages sound (checksums, WAL): what can go wrong here is
        rows that break mta's rules, e.g. after a restore with the foreign keys' triggers
        disabled (pg_restore --disable-triggers) or a hand-made change."""
        known = ", ".join(f"'{s}'" for s in RCPT_STATES)
        checks = (
            ("SELECT m.id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM bodies b WHERE b.message_id = m.id)"
             " ORDER BY m.id", "message {}: no body"),
            ("SELECT m.id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r"
             " WHERE r.message_id = m.id) ORDER BY m.id", "message {}: no recipients"),
            ("SELECT m.id || ' (' || m.size || ' stored, ' || octet_length(b.data) || ' in the body)'"
             " FROM messages m JOIN bodies b ON b.message_id = m.id WHERE m.size <> octet_length(b.data)"
             " ORDER BY m.id", "message {}: wrong size"),
            ("SELECT DISTINCT r.message_id FROM recipients r WHERE NOT EXISTS (SELECT 1 FROM messages m"
             " WHERE m.id = r.message_id) ORDER BY 1", "recipients of message {}: no such message"),
            ("SELECT DISTINCT b.message_id FROM bodies b WHERE NOT EXISTS (SELECT 1 FROM messages m"
             " WHERE m.id = b.message_id) ORDER BY 1", "body of message {}: no such message"),
            ("SELECT DISTINCT h.message_id FROM history h WHERE NOT EXISTS (SELECT 1 FROM messages m"
             " WHERE m.id = h.message_id) ORDER BY 1", "history of message {}: no such message"),
            (f"SELECT r.message_id || ' recipient ' || r.rcpt_no || ': ' || r.state FROM recipients r"
             f" WHERE r.state NOT IN ({known}) ORDER BY r.message_id, r.rcpt_no", "message {}: unknown state"),
            ("SELECT r.message_id || ' recipient ' || r.rcpt_no FROM recipients r WHERE r.state = 'active'"
             " AND (r.lease_node IS NULL OR r.lease_until IS NULL) ORDER BY r.message_id, r.rcpt_no",
             "message {}: active without a lease (no node will take it over)"),
            ("SELECT mailbox || ' message ' || id || ' (' || size || ' stored, ' || octet_length(data)"
             " || ' in the data)' FROM mailbox_messages WHERE size <> octet_length(data) ORDER BY id",
             "mailbox {}: wrong size"),
        )

        async def read(conn: Any) -> list[str]:
            # One snapshot for every check: rows moving meanwhile are not reported as lost.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            problems: list[str] = []
            for query, text in checks:
                left = limit - len(problems)
                if left <= 0:
                    break
                for row in await conn.fetch(f"{query} LIMIT {left}"):
                    problems.append(text.format(row[0]))
            return problems

        return await self.engine.run(read)


def _group_messages(rows: Iterable[Sequence[Any]]) -> list[QueuedMessage]:
    messages: list[QueuedMessage] = []
    current: dict[str, Any] | None = None
    rcpts: list[Recipient] = []

    def flush() -> None:
        if current is not None:
            messages.append(QueuedMessage(recipients=tuple(rcpts), **current))

    for row in rows:
        (mid, sender, arrival, size, client, listener, smtputf8, body_8bit, ret, envid,
         address, state, attempts, next_attempt, last_error, notify, orcpt) = row
        if current is None or current["id"] != mid:
            flush()
            current = dict(id=str(mid), sender=str(sender), arrival=float(arrival), size=int(size),
                           client=str(client), listener=str(listener), smtputf8=bool(smtputf8),
                           body_8bit=bool(body_8bit), ret=ret, envid=envid)
            rcpts = []
        rcpts.append(Recipient(address=str(address), state=RCPT_STATES[str(state)], attempts=int(attempts),
                               next_attempt=float(next_attempt), last_error=last_error,
                               notify=notify, orcpt=orcpt))
    flush()
    return messages
