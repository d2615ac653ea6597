"""The queue on PostgreSQL: what the inbound handler and the queue manager do to it.

The same semantics as the SQLite queue (mta/store/sqlite/queue.py): enqueue is one
transaction (message, body, recipients) and returns after its COMMIT; a claim also
reads the first bodies and the next due time; an attempt's outcomes, its bounces
and local delivery's mailbox copies are one transaction.

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
from typing import Any

from mta.health import Health
from mta.model import MailboxCopy, NewMessage
from mta.store.api import Claimed, DueRecipient, HistoryEntry, NewMailListener, RecipientUpdate, mailbox_key
from mta.store.postgresql.engine import PgEngine
from mta.store.postgresql.entries import entry_for

# As in the SQLite queue: a repeated deferral is not written again, and no deferral once
# a message has this many history rows.
HISTORY_ROWS_PER_MESSAGE = 32

DEFAULT_LEASE = 60.0

# NOTIFY channel for new mail committed by any node (payload: the committing node's identity).
NEW_MAIL_CHANNEL = "mta_new_mail"

_DUE_COLUMNS = (
    "r.message_id, r.rcpt_no, r.address, r.attempts, r.last_error, m.sender, m.arrival, m.smtputf8,"
    " m.body_8bit, r.notify, r.orcpt, m.ret, m.envid, m.delay_warned, m.listener, m.size")


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
        """Store a message and its recipients in one transaction; return once committed."""

        async def insert(conn: Any) -> None:
            await _insert_messages(conn, [message])
            await _tell_other_nodes(conn, self.node)

        await self.engine.run(insert)
        self._notify([message])

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
                " AND r.lease_node = $2 AND r.state = 'active' RETURNING 1",
                until, self.node, [h[0] for h in held], [h[1] for h in held])
            return len(rows)

        return await self.engine.run(renew)

    async def claim(self, now: float, limit: int, *, prefetch_bytes: int = 0) -> Claimed:
        """Lease up to ``limit`` due recipients: fresh mail first, then deferred mail whose
        time has come, then recipients whose lease ended (their node died or stalled).
        Rows another node is claiming right now are skipped, not waited for."""

        async def claim(conn: Any) -> Claimed:
            picked: list[tuple[str, int]] = []
            for where in ("r.state = 'queued' AND r.next_attempt <= $1",
                          "r.state = 'deferred' AND r.next_attempt <= $1",
                          # an ended lease: another node's, or one of this node's that its
                          # queue manager does not hold (a claim whose reply was lost);
                          # those it holds are being delivered (filtered out below)
                          "r.state = 'active' AND r.lease_until <= $1"):
                if len(picked) >= limit:
                    break
                rows = await conn.fetch(
                    f"SELECT r.message_id, r.rcpt_no, r.lease_node FROM recipients r WHERE {where}"
                    " ORDER BY r.next_attempt, r.message_id, r.rcpt_no LIMIT $2 FOR UPDATE SKIP LOCKED",
                    now, limit - len(picked))
                picked.extend((str(row[0]), int(row[1])) for row in rows
                              if row[2] != self.node or (str(row[0]), int(row[1])) not in self._held)
            if not picked:
                return Claimed([], {}, await _next_due(conn, self.node))
            await conn.execute(
                "UPDATE recipients r SET state = 'active', updated = $1, lease_node = $2, lease_until = $3"
                " FROM unnest($4::text[], $5::int[]) AS c(message_id, rcpt_no)"
                " WHERE r.message_id = c.message_id AND r.rcpt_no = c.rcpt_no",
                now, self.node, now + self.lease, [p[0] for p in picked], [p[1] for p in picked])
            rows = await conn.fetch(
                f"SELECT {_DUE_COLUMNS} FROM unnest($1::text[], $2::int[]) WITH ORDINALITY AS c(message_id,"
                " rcpt_no, n) JOIN recipients r USING (message_id, rcpt_no)"
                " JOIN messages m ON m.id = r.message_id ORDER BY c.n",
                [p[0] for p in picked], [p[1] for p in picked])
            due: list[DueRecipient] = []
            sizes: dict[str, int] = {}
            for a, b, c, d, e, f, g, h, i, j, k, l_, m, n, o, size in rows:
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
            return Claimed(due, bodies, await _next_due(conn, self.node))

        claimed = await self.engine.run(claim)
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
        async def record(conn: Any) -> tuple[bool, bool]:
            applied = await conn.fetch(
                "UPDATE recipients r SET state = CASE WHEN r.state = 'held' AND u.state = 'deferred' THEN 'held'"
                " ELSE u.state END, attempts = u.attempts, next_attempt = u.next_attempt,"
                " last_error = u.last_error, updated = $2, lease_node = NULL, lease_until = NULL"
                " FROM unnest($3::int[], $4::text[], $5::int[], $6::float8[], $7::text[])"
                " AS u(rcpt_no, state, attempts, next_attempt, last_error)"
                " WHERE r.message_id = $1 AND r.rcpt_no = u.rcpt_no"
                " AND r.lease_node = $8"
                " RETURNING r.rcpt_no",
                message_id, now, [u.rcpt_no for u in updates], [str(u.state) for u in updates],
                [u.attempts for u in updates], [u.next_attempt for u in updates],
                [u.last_error for u in updates], self.node)
            if updates and not applied:
                return False, False
            if mailbox_copies:
                await _insert_copies(conn, mailbox_copies, now)
            if new_messages:
                await _insert_messages(conn, new_messages)
                await _tell_other_nodes(conn, self.node)
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


async def _tell_other_nodes(conn: Any, node: str) -> None:
    """NOTIFY inside the transaction: PostgreSQL sends it to the listeners at COMMIT, and
    not at all if the transaction rolls back."""
    await conn.execute("SELECT pg_notify($1, $2)", NEW_MAIL_CHANNEL, node)


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


async def _insert_messages(conn: Any, messages: Sequence[NewMessage]) -> None:
    if not messages:
        return
    await conn.executemany(
        "INSERT INTO messages (id, sender, arrival, size, client, listener, helo, auth_user,"
        " smtputf8, body_8bit, ret, envid) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
        [(m.id, m.sender, m.arrival, len(m.data), m.client, m.listener, m.helo, m.auth_user,
          m.smtputf8, m.body_8bit, m.ret, m.envid) for m in messages])
    await conn.executemany("INSERT INTO bodies (message_id, data) VALUES ($1, $2)",
                           [(m.id, m.data) for m in messages])
    # next_attempt = arrival: fresh mail is due at once, oldest first.
    await conn.executemany(
        "INSERT INTO recipients (message_id, rcpt_no, address, state, next_attempt, notify, orcpt, updated)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
        [(m.id, i, r.address, str(r.state), r.next_attempt or m.arrival, r.notify, r.orcpt, m.arrival)
         for m in messages for i, r in enumerate(m.recipients)])


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
