"""The queue: what the inbound handler and the queue manager do to it, in SQL.

Enqueue is one durable write (the 250 follows its commit, group-committed
with other sessions'); a claim is one hand-off that also reads the first
bodies and the next due time; an attempt's outcomes, its bounces and local
delivery's mailbox copies are one non-durable commit. Only the engine's public
API is used (engine.py); mailbox copies are inserted with mailboxes.py's SQL,
inside the same transaction.

A message row holds the envelope, its bytes are in ``bodies``; one recipient
row per RCPT carries its own state, attempts, next attempt time and last error
(chasquid keeps per-recipient state the same way), so only pending recipients
are ever retried.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from mta.health import Health
from mta.model import MailboxCopy, NewMessage, RcptState
from mta.store.api import Claimed, DueRecipient, HistoryEntry, NewMailListener, RecipientUpdate
from mta.store.sqlite.engine import Engine
from mta.store.sqlite.mailboxes import insert_copies

# Deferral history stays small: a deferral with the same reason as the recipient's last
# history row is not written again (the recipient row keeps the attempt count, the time
# and the last error), and none is written once the message has this many history rows.
# History rows lie in time order, so a message's rows are scattered over as many pages:
# removing a message deferred 28 times rewrote 28 pages (the captured full queue). Fewer
# rows rather than a new layout: a schema migration needs room a full disk has not got.
HISTORY_ROWS_PER_MESSAGE = 32


class SQLiteQueue:
    """mta.store.api.Queue on the SQLite engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._listeners: list[NewMailListener] = []

    @property
    def health(self) -> Health:
        return self.engine.health

    @property
    def damaged(self) -> str | None:
        return self.engine.damaged

    def space_report(self) -> str:
        return self.engine.space_report()

    def add_listener(self, callback: NewMailListener) -> None:
        """Called after each commit of new messages (wakes the queue manager)."""
        self._listeners.append(callback)

    # ----------------------------------------------------------------- inbound

    async def enqueue(self, message: NewMessage) -> None:
        """Store a message and its recipients; return once committed.

        Refused (StoreError, disk full) when it would eat into the reserve, and at once
        (QueueDamagedError) while the queue file is known to be damaged (Engine.write_new_mail)."""
        await self.engine.write_new_mail(lambda conn: _insert_message(conn, message), len(message.data))
        for callback in self._listeners:
            callback([message])

    # ----------------------------------------------------------------- queue manager

    async def recover_in_flight(self) -> int:
        """Recipients left 'active' by a crash are due again (delivery is at least once)."""

        def recover(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE recipients SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END"
                " WHERE state = 'active'")
            return cur.rowcount

        return await self.engine.write(recover)

    async def claim(self, now: float, limit: int, *, prefetch_bytes: int = 0) -> Claimed:
        """Mark up to ``limit`` due recipients active and return them: fresh mail
        first, then deferred mail whose time has come. Both are range scans of
        the (state, next_attempt) index, so a large deferred backlog that is not
        yet due costs nothing here.

        The same database round trip also reads the bodies of the first claimed
        messages (up to ``prefetch_bytes`` in all) and when the next deferred
        recipient is due: on a serial stream of mail that is one hand-off to the
        database thread per claim instead of three."""

        def claim(conn: sqlite3.Connection) -> Claimed:
            due: list[DueRecipient] = []
            sizes: dict[str, int] = {}
            for state in (RcptState.QUEUED, RcptState.DEFERRED):
                if len(due) >= limit:
                    break
                rows = conn.execute(
                    "SELECT r.message_id, r.rcpt_no, r.address, r.attempts, r.last_error, m.sender,"
                    " m.arrival, m.smtputf8, m.body_8bit, r.notify, r.orcpt, m.ret, m.envid, m.delay_warned,"
                    " m.listener, m.size FROM recipients r"
                    " JOIN messages m ON m.id = r.message_id"
                    " WHERE r.state = ? AND r.next_attempt <= ? ORDER BY r.next_attempt LIMIT ?",
                    (str(state), now, limit - len(due)),
                ).fetchall()
                for a, b, c, d, e, f, g, h, i, j, k, l_, m, n, o, size in rows:
                    due.append(DueRecipient(str(a), int(b), str(c), int(d), e, str(f), float(g), bool(h),
                                            bool(i), j, k, l_, m, bool(n), str(o)))
                    sizes.setdefault(str(a), int(size))
            conn.executemany(
                "UPDATE recipients SET state = 'active', updated = ? WHERE message_id = ? AND rcpt_no = ?",
                [(now, d.message_id, d.rcpt_no) for d in due])
            bodies: dict[str, bytes] = {}
            budget = prefetch_bytes
            for message_id, size in sizes.items():
                if size > budget:
                    break
                row = conn.execute("SELECT data FROM bodies WHERE message_id = ?", (message_id,)).fetchone()
                if row is not None:
                    bodies[message_id] = bytes(row[0])
                budget -= size
            return Claimed(due, bodies, _next_due(conn))

        return await self.engine.write(claim, durable=False)

    async def record_outcomes(self, message_id: str, updates: Sequence[RecipientUpdate], now: float,
                              *, history: Sequence[HistoryEntry] = (),
                              new_messages: Sequence[NewMessage] = (), delay_warned: bool = False,
                              mailbox_copies: Sequence[MailboxCopy] = ()) -> bool:
        """Write a delivery attempt's per-recipient results in one commit.

        ``new_messages`` (bounces) are enqueued in the same commit, so a crash
        can neither lose a bounce nor send it twice. When no recipient of the
        message is left pending, the message is removed in that commit too (as
        Postfix removes a queue file); returns True then. A recipient an
        operator put on hold while it was being tried stays held if deferred.
        ``mailbox_copies`` (local delivery) are stored in the same commit that
        marks their recipients delivered.
        """

        def record(conn: sqlite3.Connection) -> bool:
            if mailbox_copies:
                insert_copies(conn, mailbox_copies, now)
            conn.executemany(
                "UPDATE recipients SET state = CASE WHEN state = 'held' AND ? = 'deferred' THEN 'held' ELSE ? END,"
                " attempts = ?, next_attempt = ?, last_error = ?, updated = ? WHERE message_id = ? AND rcpt_no = ?",
                [(str(u.state), str(u.state), u.attempts, u.next_attempt, u.last_error, now, message_id, u.rcpt_no)
                 for u in updates])
            for message in new_messages:
                _insert_message(conn, message)
            if delay_warned:
                conn.execute("UPDATE messages SET delay_warned = 1 WHERE id = ?", (message_id,))
            pending = conn.execute(
                "SELECT 1 FROM recipients WHERE message_id = ? AND state NOT IN ('delivered', 'bounced') LIMIT 1",
                (message_id,),
            ).fetchone()
            if pending is None:
                conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))
                return True
            rows = _history_worth_writing(conn, message_id, history, short_of_space)
            if rows:
                conn.executemany(
                    "INSERT INTO history (message_id, time, recipient, event, detail) VALUES (?,?,?,?,?)",
                    [(message_id, h.time, h.recipient, h.event, h.detail) for h in rows])
            return False

        # Below the reserve (new mail is refused) the queue manager's own writes must fit
        # in it: deferral history is left out, the recipient row says the same.
        short_of_space = self.engine.free_space() < self.engine.reserve
        finished = await self.engine.write(record, urgent=False, durable=False)
        if new_messages:
            for callback in self._listeners:
                callback(list(new_messages))
        return finished

    async def give_back(self, message_id: str, rcpt_nos: Sequence[int]) -> None:
        """Return claimed recipients untouched (the daemon stopped before trying them)."""

        def give(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE recipients SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END"
                " WHERE message_id = ? AND rcpt_no = ? AND state = 'active'",
                [(message_id, n) for n in rcpt_nos])

        await self.engine.write(give, durable=False)

    async def next_due_time(self) -> float | None:
        """When the earliest deferred recipient is due (one index lookup)."""
        return await self.engine.read(_next_due)

    async def message_data(self, message_id: str) -> bytes | None:
        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT data FROM bodies WHERE message_id = ?", (message_id,)).fetchone()
            return bytes(row[0]) if row else None

        return await self.engine.read(read)



def _next_due(conn: sqlite3.Connection) -> float | None:
    """When the earliest deferred recipient is due (one index lookup)."""
    row = conn.execute("SELECT min(next_attempt) FROM recipients WHERE state = 'deferred'").fetchone()
    return float(row[0]) if row and row[0] is not None else None


def _history_worth_writing(conn: sqlite3.Connection, message_id: str, history: Sequence[HistoryEntry],
                           short_of_space: bool) -> list[HistoryEntry]:
    """The entries of one attempt worth a row: deferrals only when the disk is not short
    of space and they say something new (see HISTORY_ROWS_PER_MESSAGE); others always."""
    if all(h.event != "deferred" for h in history):
        return list(history)
    rows = HISTORY_ROWS_PER_MESSAGE
    if not short_of_space:   # reads only (the history_message index): they cost no room
        rows = int(conn.execute("SELECT count(*) FROM history WHERE message_id = ?",
                                (message_id,)).fetchone()[0])
    keep: list[HistoryEntry] = []
    for h in history:
        if h.event == "deferred":
            if rows >= HISTORY_ROWS_PER_MESSAGE:
                continue
            last = conn.execute(
                "SELECT event, detail FROM history WHERE message_id = ? AND recipient IS ?"
                " ORDER BY time DESC, rowid DESC LIMIT 1", (message_id, h.recipient)).fetchone()
            if last == ("deferred", h.detail):
                continue
            rows += 1
        keep.append(h)
    return keep


def _insert_message(conn: sqlite3.Connection, m: NewMessage) -> None:
    conn.execute(
        "INSERT INTO messages (id, sender, arrival, size, client, listener, helo, auth_user,"
        " smtputf8, body_8bit, ret, envid) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (m.id, m.sender, m.arrival, len(m.data), m.client, m.listener, m.helo, m.auth_user,
         int(m.smtputf8), int(m.body_8bit), m.ret, m.envid))
    conn.execute("INSERT INTO bodies (message_id, data) VALUES (?, ?)", (m.id, m.data))
    # next_attempt = arrival: fresh mail is due at once, oldest first.
    conn.executemany(
        "INSERT INTO recipients (message_id, rcpt_no, address, state, next_attempt, notify,"
        " orcpt, updated) VALUES (?,?,?,?,?,?,?,?)",
        [(m.id, i, r.address, str(r.state), r.next_attempt or m.arrival, r.notify, r.orcpt, m.arrival)
         for i, r in enumerate(m.recipients)])
