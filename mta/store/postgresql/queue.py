"""The queue on PostgreSQL: what the inbound handler and the queue manager do to it.

The same semantics as the SQLite queue (mta/store/sqlite/queue.py): enqueue is one
transaction (message, body, recipients) and returns after its COMMIT; a claim also
reads the first bodies and the next due time; an attempt's outcomes, its bounces
and local delivery's mailbox copies are one transaction. Concurrent enqueues, and
concurrent plain outcomes (nothing but delivered or bounced recipients to write),
share one statement and one COMMIT (batches.py); claims and outcomes are single
statements where they can be: on PostgreSQL the round trips, not the WAL flushes,
are what a message costs.

Several nodes share the database, so a claim is a lease (issue 16). A node claims
due recipients with ``FOR UPDATE SKIP LOCKED`` (two nodes claiming at once take
different rows, neither waits), marks them 'active' with its identity and
``lease_until`` = now + lease, and renews its leases while deliveries run
(:meth:`renew_leases`). Outcomes and give-backs take effect only for recipients
this node still holds: a node that lost its lease (it stalled, another node took
the recipient over) cannot overwrite the other's result. A recipient whose lease
ended is due again: claims take such recipients over, and :meth:`recover_in_flight`
makes them (and this node's own, left by its previous life) due at once. Lease
times are the nodes' clocks, like next_attempt: nodes keep their clocks in step
(NTP), far closer than a lease's length.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mta.health import Health
from mta.model import MailboxCopy, NewMessage
from mta.store.api import Claimed, DueRecipient, HistoryEntry, NewMailListener, RecipientUpdate, mailbox_key
from mta.store.postgresql.batches import Batches
from mta.store.postgresql.engine import PgEngine
from mta.store.postgresql.entries import entry_for

# As in the SQLite queue: a repeated deferral is not written again, and no deferral once
# a message has this many history rows.
HISTORY_ROWS_PER_MESSAGE = 32

DEFAULT_LEASE = 60.0

# NOTIFY channel for new mail committed by any node (payload: the committing node's identity).
NEW_MAIL_CHANNEL = "mta_new_mail"

# An attempt's outcomes, for the recipients this node still holds ($8).
_UPDATE_OUTCOMES = (
    "UPDATE recipients r SET state = CASE WHEN r.state = 'held' AND u.state = 'deferred' THEN 'held'"
    " ELSE u.state END, attempts = u.attempts, next_attempt = u.next_attempt,"
    " last_error = u.last_error, updated = $2, lease_node = NULL, lease_until = NULL"
    " FROM unnest($3::int[], $4::text[], $5::int[], $6::float8[], $7::text[])"
    " AS u(rcpt_no, state, attempts, next_attempt, last_error)"
    " WHERE r.message_id = $1 AND r.rcpt_no = u.rcpt_no AND r.lease_node = $8")

# The outcomes of several record_outcomes calls without copies, bounces or deferrals (a
# delivery done, nothing else to store), in one statement: the outcomes, then each message
# deleted if no recipient of it is left pending, else its history rows written. All parts
# see the rows as they were before the statement, so "pending" is the updated rows' new
# states plus the other recipients' old ones. Recipients, bodies and history go with their
# message by the foreign keys' cascade, which runs after the statement. Its value: the
# messages that went. (A message this node no longer holds any recipient of is untouched.)
_RECORD_PLAIN_OUTCOMES = (
    "WITH u AS (SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::int[], $5::float8[], $6::text[],"
    " $7::float8[]) AS u(message_id, rcpt_no, state, attempts, next_attempt, last_error, updated)),"
    " applied AS (UPDATE recipients r SET state = CASE WHEN r.state = 'held' AND u.state = 'deferred'"
    " THEN 'held' ELSE u.state END, attempts = u.attempts, next_attempt = u.next_attempt,"
    " last_error = u.last_error, updated = u.updated, lease_node = NULL, lease_until = NULL"
    " FROM u WHERE r.message_id = u.message_id AND r.rcpt_no = u.rcpt_no AND r.lease_node = $8"
    " RETURNING r.message_id, r.rcpt_no, r.state),"
    " pending AS (SELECT message_id FROM applied WHERE state NOT IN ('delivered', 'bounced')"
    " UNION SELECT message_id FROM recipients WHERE message_id IN (SELECT message_id FROM applied)"
    " AND state NOT IN ('delivered', 'bounced')"
    " AND (message_id, rcpt_no) NOT IN (SELECT message_id, rcpt_no FROM applied)),"
    " gone AS (DELETE FROM messages WHERE id IN (SELECT message_id FROM applied)"
    " AND id NOT IN (SELECT message_id FROM pending) RETURNING id),"
    " written AS (INSERT INTO history (message_id, time, recipient, event, detail)"
    " SELECT * FROM unnest($9::text[], $10::float8[], $11::text[], $12::text[], $13::text[])"
    " AS h(message_id, time, recipient, event, detail) WHERE h.message_id IN (SELECT message_id FROM pending))"
    " SELECT array_agg(id) FROM gone")


@dataclass(frozen=True, slots=True)
class _PlainOutcome:
    message_id: str
    updates: Sequence[RecipientUpdate]
    now: float
    history: Sequence[HistoryEntry]


# A claim in one statement (one round trip instead of eight): lease up to $2 due recipients,
# fresh mail first, then deferred mail whose time has come, then other nodes' ended leases
# (each kind only for the room the ones before left; SKIP LOCKED: rows another node is
# claiming right now are skipped, not waited for), and return them in that order with what
# delivery needs of their messages. Every row also carries when the next recipient not
# claimed here is due (a deferral, or the end of another node's lease: both make a recipient
# claimable, so a survivor wakes up when a dead node's leases end; this node's own leases
# it renews itself); with nothing claimed, one row carries only that.
_CLAIM_FROM = (
    "SELECT message_id, rcpt_no, next_attempt FROM recipients WHERE {where}"
    " ORDER BY next_attempt, message_id, rcpt_no LIMIT {limit} FOR UPDATE SKIP LOCKED")
_CLAIM = (
    "WITH fresh AS (" + _CLAIM_FROM.format(where="state = 'queued' AND next_attempt <= $1", limit="$2") + "),"
    " retry AS (" + _CLAIM_FROM.format(where="state = 'deferred' AND next_attempt <= $1",
                                       limit="$2 - (SELECT count(*) FROM fresh)") + "),"
    # (or this node's own ended leases that its queue manager does not hold, $5/$6: a
    # claim whose reply was lost when the connection broke)
    " orphaned AS (" + _CLAIM_FROM.format(where="state = 'active' AND lease_until <= $1 AND (lease_node <> $3"
                                                " OR (message_id, rcpt_no) NOT IN"
                                                " (SELECT * FROM unnest($5::text[], $6::int[])))",
                                          limit="$2 - (SELECT count(*) FROM fresh) - (SELECT count(*) FROM retry)")
    + "),"
    " picked AS (SELECT *, 1 AS kind FROM fresh UNION ALL SELECT *, 2 FROM retry UNION ALL SELECT *, 3 FROM orphaned),"
    " claimed AS (UPDATE recipients r SET state = 'active', updated = $1, lease_node = $3, lease_until = $4"
    " FROM picked p WHERE r.message_id = p.message_id AND r.rcpt_no = p.rcpt_no"
    " RETURNING r.message_id, r.rcpt_no, r.address, r.attempts, r.last_error, r.notify, r.orcpt, p.kind,"
    " p.next_attempt),"
    " next AS (SELECT least("
    "(SELECT min(next_attempt) FROM recipients WHERE state = 'deferred'"
    " AND (message_id, rcpt_no) NOT IN (SELECT message_id, rcpt_no FROM picked)),"
    " (SELECT min(lease_until) FROM recipients WHERE state = 'active' AND lease_node <> $3"
    " AND (message_id, rcpt_no) NOT IN (SELECT message_id, rcpt_no FROM picked))) AS due)"
    " SELECT n.due, c.message_id, c.rcpt_no, c.address, c.attempts, c.last_error, m.sender, m.arrival,"
    " m.smtputf8, m.body_8bit, c.notify, c.orcpt, m.ret, m.envid, m.delay_warned, m.listener, m.size"
    " FROM next n LEFT JOIN (claimed c JOIN messages m ON m.id = c.message_id) ON true"
    " ORDER BY c.kind, c.next_attempt, c.message_id, c.rcpt_no")


class PostgreSQLQueue:
    """mta.store.api.Queue on PostgreSQL, for one node (``node``: its identity in leases)."""

    def __init__(self, engine: PgEngine, *, node: str | None = None, lease: float = DEFAULT_LEASE):
        self.engine = engine
        self.node = node or socket.gethostname()
        self.lease = lease
        self._listeners: list[NewMailListener] = []
        # What this node's queue manager was handed by claim() and has not yet recorded
        # or given back: the leases renew_leases() keeps. A claim whose COMMIT reached the
        # server while its reply was lost (the connection broke: StoreError) leased rows
        # the queue manager never saw; left out of here, their lease ends and a claim
        # (this node's too) takes them, instead of their being renewed for good.
        self._held: set[tuple[str, int]] = set()
        # Concurrent writes share commits (batches.py): new mail, and plain delivery outcomes.
        self._new_mail: Batches[NewMessage, None] = Batches(self._store_new_mail, size=lambda m: len(m.data))
        self._outcomes: Batches[_PlainOutcome, bool] = Batches(self._record_plain_outcomes,
                                                               key=lambda o: o.message_id)

    @property
    def health(self) -> Health:
        return self.engine.health

    @property
    def damaged(self) -> str | None:
        # A PostgreSQL database is not a file mta can find damaged: its errors are StoreErrors.
        return None

    def space_report(self) -> str:
        return "free space is the database server's (not measured by mta)"

    def add_listener(self, callback: NewMailListener) -> None:
        """Called after each commit of new messages on this node (wakes the queue manager)."""
        self._listeners.append(callback)

    def _notify(self, messages: Sequence[NewMessage]) -> None:
        for callback in self._listeners:
            callback(list(messages))

    def listen_to_other_nodes(self) -> None:
        """Wake this node's listeners when another node commits new mail too (LISTEN/NOTIFY:
        the queue managers of all nodes wake as one node's does). The messages themselves
        are not sent along: the listeners get an empty list, "look at the queue"."""

        def on_payload(node: str) -> None:
            if node != self.node:   # this node's own commits called the listeners already
                self._notify([])

        self.engine.listen(NEW_MAIL_CHANNEL, on_payload)

    # ----------------------------------------------------------------- inbound

    async def enqueue(self, message: NewMessage) -> None:
        """Store a message and its recipients in one transaction; return once committed.

        Enqueues arriving while another batch commits share the next commit (batches.py)."""
        await self._new_mail.add(message)
        self._notify([message])

    async def _store_new_mail(self, messages: Sequence[NewMessage]) -> list[None]:
        async def insert(conn: Any) -> None:
            await _insert_messages(conn, messages, self.node)

        await self.engine.run(insert, autocommit=True)
        return [None] * len(messages)

    # ----------------------------------------------------------------- queue manager

    async def recover_in_flight(self) -> int:
        """Recipients whose lease has ended, and this node's own from before a restart,
        are due again; leases other nodes still hold are left alone (those nodes live)."""

        async def recover(conn: Any) -> int:
            rows = await conn.fetch(
                "UPDATE recipients SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END,"
                " lease_node = NULL, lease_until = NULL"
                " WHERE state = 'active' AND (lease_until <= $1 OR lease_node = $2 OR lease_node IS NULL)"
                " RETURNING 1", time.time(), self.node)
            return len(rows)

        return await self.engine.run(recover)

    async def renew_leases(self, now: float | None = None) -> int:
        """Extend the leases of the recipients this node is delivering (claimed, not yet
        recorded or given back) to now + lease; returns how many. Called well within a
        lease while deliveries run."""
        until = (time.time() if now is None else now) + self.lease
        held = list(self._held)
        if not held:
            return 0

        async def renew(conn: Any) -> int:
            rows = await conn.fetch(
                "UPDATE recipients r SET lease_until = $1 FROM unnest($3::text[], $4::int[]) AS h(message_id, rcpt_no)"
                " WHERE r.message_id = h.message_id AND r.rcpt_no = h.rcpt_no"
                # 'held': put on hold (mta queue hold) while this node delivers it; the hold
                # keeps the lease, so a release before the delivery ends stays this delivery's.
                " AND r.lease_node = $2 AND r.state IN ('active', 'held') RETURNING 1",
                until, self.node, [h[0] for h in held], [h[1] for h in held])
            return len(rows)

        return await self.engine.run(renew)

    async def claim(self, now: float, limit: int, *, prefetch_bytes: int = 0) -> Claimed:
        """Lease up to ``limit`` due recipients: fresh mail first, then deferred mail whose
        time has come, then recipients whose lease ended (their node died or stalled).
        Rows another node is claiming right now are skipped, not waited for."""

        async def claim(conn: Any) -> Claimed:
            # One statement claims and reads the claimed rows (and when the next is due);
            # it commits by itself. The bodies are read after it: they never change.
            held = list(self._held)
            rows = await conn.fetch(_CLAIM, now, limit, self.node, now + self.lease,
                                    [h[0] for h in held], [h[1] for h in held])
            next_due = None if rows[0][0] is None else float(rows[0][0])
            if rows[0][1] is None:     # nothing claimed: the one row says when to look again
                return Claimed([], {}, next_due)
            due: list[DueRecipient] = []
            sizes: dict[str, int] = {}
            for _, a, b, c, d, e, f, g, h, i, j, k, l_, m, n, o, size in rows:
                due.append(DueRecipient(a, b, c, d, e, f, g, h, i, j, k, l_, m, n, o))
                sizes.setdefault(a, int(size))
            bodies: dict[str, bytes] = {}
            wanted: list[str] = []
            budget = prefetch_bytes
            for message_id, size in sizes.items():
                if size > budget:
                    break
                wanted.append(message_id)
                budget -= size
            if wanted:
                for row in await conn.fetch("SELECT message_id, data FROM bodies WHERE message_id = ANY($1)",
                                            wanted):
                    bodies[row[0]] = bytes(row[1])
            return Claimed(due, bodies, next_due)

        claimed = await self.engine.run(claim, autocommit=True)
        self._held.update((r.message_id, r.rcpt_no) for r in claimed.due)
        return claimed

    async def record_outcomes(self, message_id: str, updates: Sequence[RecipientUpdate], now: float,
                              *, history: Sequence[HistoryEntry] = (),
                              new_messages: Sequence[NewMessage] = (), delay_warned: bool = False,
                              mailbox_copies: Sequence[MailboxCopy] = ()) -> bool:
        """Write a delivery attempt's results in one transaction, for the recipients whose
        lease this node still holds. With them its bounces (``new_messages``), local
        delivery's ``mailbox_copies`` and history; when no recipient is left pending the
        message goes (returns True). If the node holds none of them any more, nothing is
        written: the node that took them over reports and bounces them itself. (Leases
        of one claim end together, so holding some but not all is rare; then everything
        is written for the ones still held.) An operator's hold while being tried stays.
        """
        # Outcomes are only ever written for claimed recipients (the queue manager's jobs):
        # "still held" is lease_node = this node, whether or not the lease ran out meanwhile
        # (if nobody took it over, the outcome is still the truth). An operator's hold
        # during the attempt keeps lease_node, so it is found too.
        if updates and not (mailbox_copies or new_messages or delay_warned) and all(
                h.event != "deferred" for h in history):
            # The common case (a delivery done, nothing else to store): shared commits.
            went = await self._outcomes.add(_PlainOutcome(message_id, updates, now, history))
            self._held.difference_update((message_id, u.rcpt_no) for u in updates)
            return went

        async def record(conn: Any) -> tuple[bool, bool]:
            applied = await conn.fetch(
                _UPDATE_OUTCOMES + " RETURNING r.rcpt_no", message_id, now, [u.rcpt_no for u in updates],
                [str(u.state) for u in updates], [u.attempts for u in updates], [u.next_attempt for u in updates],
                [u.last_error for u in updates], self.node)
            if updates and not applied:
                return False, False
            if mailbox_copies:
                await _insert_copies(conn, mailbox_copies, now)
            if new_messages:
                await _insert_messages(conn, new_messages, self.node)
            if delay_warned:
                await conn.execute("UPDATE messages SET delay_warned = true WHERE id = $1", message_id)
            pending = await conn.fetchval(
                "SELECT 1 FROM recipients WHERE message_id = $1 AND state NOT IN ('delivered', 'bounced') LIMIT 1",
                message_id)
            if pending is None:
                await conn.execute("DELETE FROM messages WHERE id = $1", message_id)
                return True, True
            rows = await _history_worth_writing(conn, message_id, history)
            if rows:
                await conn.executemany(
                    "INSERT INTO history (message_id, time, recipient, event, detail) VALUES ($1,$2,$3,$4,$5)",
                    [(message_id, h.time, h.recipient, h.event, h.detail) for h in rows])
            return False, True

        finished, written = await self.engine.run(record)
        self._held.difference_update((message_id, u.rcpt_no) for u in updates)
        if written and new_messages:
            self._notify(new_messages)
        return finished

    async def _record_plain_outcomes(self, batch: Sequence[_PlainOutcome]) -> list[bool]:
        """record_outcomes for several messages (one each) in one statement: whether each went."""
        rows = [(o.message_id, u, o.now) for o in batch for u in o.updates]
        entries = [(o.message_id, h) for o in batch for h in o.history]

        async def record(conn: Any) -> list[str] | None:
            gone: list[str] | None = await conn.fetchval(
                _RECORD_PLAIN_OUTCOMES, [m for m, _, _ in rows], [u.rcpt_no for _, u, _ in rows],
                [str(u.state) for _, u, _ in rows], [u.attempts for _, u, _ in rows],
                [u.next_attempt for _, u, _ in rows], [u.last_error for _, u, _ in rows],
                [now for _, _, now in rows], self.node, [m for m, _ in entries], [h.time for _, h in entries],
                [h.recipient for _, h in entries], [h.event for _, h in entries], [h.detail for _, h in entries])
            return gone

        went = set(await self.engine.run(record, autocommit=True) or ())
        return [o.message_id in went for o in batch]

    async def give_back(self, message_id: str, rcpt_nos: Sequence[int]) -> None:
        """Return claimed recipients untried (only those this node still holds)."""

        async def give(conn: Any) -> None:
            await conn.execute(
                "UPDATE recipients SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END,"
                " lease_node = NULL, lease_until = NULL"
                " WHERE message_id = $1 AND rcpt_no = ANY($2::int[]) AND state = 'active' AND lease_node = $3",
                message_id, list(rcpt_nos), self.node)

        await self.engine.run(give)
        self._held.difference_update((message_id, n) for n in rcpt_nos)

    async def next_due_time(self) -> float | None:
        """When the earliest deferred recipient is due, or another node's lease ends."""

        async def next_due(conn: Any) -> float | None:
            return await _next_due(conn, self.node)

        return await self.engine.run(next_due)

    async def message_data(self, message_id: str) -> bytes | None:
        async def read(conn: Any) -> bytes | None:
            data = await conn.fetchval("SELECT data FROM bodies WHERE message_id = $1", message_id)
            return None if data is None else bytes(data)

        return await self.engine.run(read)


async def _tell_other_nodes(conn: Any, payload: str) -> None:
    """NOTIFY inside the transaction: PostgreSQL sends it to the listeners at COMMIT, and
    not at all if the transaction rolls back. (New mail's own statement sends it itself.)"""
    await conn.execute("SELECT pg_notify($1, $2)", NEW_MAIL_CHANNEL, payload)


async def _next_due(conn: Any, node: str) -> float | None:
    """The earliest deferred next_attempt, or the earliest end of another node's lease:
    both make a recipient claimable, so a survivor wakes up when a dead node's leases
    end. (This node's own leases it renews itself.) Range scans of recipients_due."""
    value = await conn.fetchval(
        "SELECT least((SELECT min(next_attempt) FROM recipients WHERE state = 'deferred'),"
        " (SELECT min(lease_until) FROM recipients WHERE state = 'active' AND lease_node <> $1))", node)
    return None if value is None else float(value)


async def _history_worth_writing(conn: Any, message_id: str,
                                 history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """Deferrals only when they say something new and the message has few rows; others always."""
    if all(h.event != "deferred" for h in history):
        return list(history)
    rows = int(await conn.fetchval("SELECT count(*) FROM history WHERE message_id = $1", message_id))
    keep: list[HistoryEntry] = []
    for h in history:
        if h.event == "deferred":
            if rows >= HISTORY_ROWS_PER_MESSAGE:
                continue
            last = await conn.fetchrow(
                "SELECT event, detail FROM history WHERE message_id = $1 AND recipient IS NOT DISTINCT FROM $2"
                " ORDER BY time DESC, no DESC LIMIT 1", message_id, h.recipient)
            if last is not None and (last[0], last[1]) == ("deferred", h.detail):
                continue
            rows += 1
        keep.append(h)
    return keep


# Messages, bodies and recipients in one statement (one round trip, rows passed as arrays),
# and the NOTIFY that wakes the other nodes' queue managers: PostgreSQL sends it at COMMIT,
# and not at all if the transaction rolls back. The foreign keys of bodies and recipients
# are checked at the statement's end, when the messages are in.
_INSERT_MESSAGES = (
    "WITH m AS (INSERT INTO messages (id, sender, arrival, size, client, listener, helo, auth_user, smtputf8,"
    " body_8bit, ret, envid) SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::bigint[],"
    " $5::text[], $6::text[], $7::text[], $8::text[], $9::bool[], $10::bool[], $11::text[], $12::text[])),"
    " b AS (INSERT INTO bodies (message_id, data) SELECT * FROM unnest($1::text[], $13::bytea[])),"
    " r AS (INSERT INTO recipients (message_id, rcpt_no, address, state, next_attempt, notify, orcpt, updated)"
    " SELECT * FROM unnest($14::text[], $15::int[], $16::text[], $17::text[], $18::float8[], $19::text[],"
    " $20::text[], $21::float8[]))"
    " SELECT pg_notify($22, $23)")


async def _insert_messages(conn: Any, messages: Sequence[NewMessage], node: str) -> None:
    """Store new messages (in one statement) and tell the other nodes, as ``node``."""
    if not messages:
        return
    # next_attempt = arrival: fresh mail is due at once, oldest first.
    recipients = [(m.id, i, r.address, str(r.state), r.next_attempt or m.arrival, r.notify, r.orcpt, m.arrival)
                  for m in messages for i, r in enumerate(m.recipients)]
    await conn.execute(
        _INSERT_MESSAGES,
        [m.id for m in messages], [m.sender for m in messages], [m.arrival for m in messages],
        [len(m.data) for m in messages], [m.client for m in messages], [m.listener for m in messages],
        [m.helo for m in messages], [m.auth_user for m in messages], [m.smtputf8 for m in messages],
        [m.body_8bit for m in messages], [m.ret for m in messages], [m.envid for m in messages],
        [m.data for m in messages], *([list(column) for column in zip(*recipients, strict=True)] or [[]] * 8),
        NEW_MAIL_CHANNEL, node)


async def _insert_copies(conn: Any, copies: Sequence[MailboxCopy], now: float) -> None:
    """Store local delivery's copies (in the caller's transaction), each pointing at its
    message's lab inbox entry (made with the message's first copy: entries.py), and keep
    each mailbox touched to its newest ``max_messages``, as the SQLite backend does
    (mailboxes.py insert_copies; an entry goes with its last copy: the schema's triggers)."""
    entries: dict[tuple[str, float], int] = {}
    rows = []
    for c in copies:
        arrival = now if c.arrival is None else c.arrival
        message = (c.queue_id, arrival)
        if message not in entries:
            entries[message] = await entry_for(conn, c.queue_id, arrival, c.data, c.summary)
        rows.append((mailbox_key(c.mailbox), c.queue_id, arrival, c.sender, c.subject, len(c.data), c.data,
                     entries[message]))
    await conn.executemany(
        "INSERT INTO mailbox_messages (mailbox, queue_id, received, sender, subject, size, data, inbox_id)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8)", rows)
    keep: dict[str, int] = {}
    for c in copies:
        key = mailbox_key(c.mailbox)
        keep[key] = min(keep.get(key, c.max_messages), c.max_messages)
    for mailbox, max_messages in keep.items():
        await conn.execute(
            "DELETE FROM mailbox_messages WHERE id IN (SELECT id FROM mailbox_messages WHERE mailbox = $1"
            " ORDER BY received DESC, id DESC OFFSET $2)", mailbox, max_messages)
