"""Mailbox SQL: the copies local delivery keeps, and what POP3 and the CLI read.

Mailboxes live in the queue's own SQLite file (table ``mailbox_messages``,
schema version 5; its ``inbox_id``, the lab inbox entry, since 6), so a local
delivery and the recipient's 'delivered' state are one commit: the queue's
record_outcomes runs :func:`insert_copies` inside its transaction. A message is stored exactly as POP3 sends it before
byte-stuffing: CRLF line ends, so ``size`` is the octet count STAT and LIST
report (RFC 1939 §5). The row id, never reused (AUTOINCREMENT), is the
message id of the interface, part of the UIDL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence

from mta.model import MailboxCopy
from mta.store.api import MailboxLock, MailboxSummary, MessageSummary, StoredMessage, mailbox_key
from mta.store.sqlite.engine import Engine
from mta.store.sqlite.entries import entry_for


def insert_copies(conn: sqlite3.Connection, copies: Sequence[MailboxCopy], now: float) -> int:
    """Store ``copies`` (inside the caller's transaction), each pointing at its message's
    lab inbox entry (made with the first copy of a message: entries.py); prune each
    mailbox touched to its newest ``max_messages`` (of its copies). Returns how many old
    messages were pruned (an entry goes with its last copy: the schema's triggers).

    Mailboxes are in arrival order, not delivery order: messages delivered in
    parallel still read back in the order they were sent."""
    entries: dict[tuple[str, float], int] = {}
    rows = []
    for c in copies:
        arrival = now if c.arrival is None else c.arrival
        message = (c.queue_id, arrival)
        if message not in entries:
            entries[message] = entry_for(conn, c.queue_id, arrival, c.data, c.summary)
        rows.append((mailbox_key(c.mailbox), c.queue_id, arrival, c.sender, c.subject, len(c.data), c.data,
                     entries[message]))
    conn.executemany(
        "INSERT INTO mailbox_messages (mailbox, queue_id, received, sender, subject, size, data, inbox_id)"
        " VALUES (?,?,?,?,?,?,?,?)", rows)
    keep: dict[str, int] = {}
    for c in copies:
        key = mailbox_key(c.mailbox)
        keep[key] = min(keep.get(key, c.max_messages), c.max_messages)
    pruned = 0
    for mailbox, max_messages in keep.items():
        pruned += conn.execute(
            "DELETE FROM mailbox_messages WHERE id IN (SELECT id FROM mailbox_messages WHERE mailbox = ?"
            " ORDER BY received DESC, id DESC LIMIT -1 OFFSET ?)", (mailbox, max_messages)).rowcount
    return pruned


class SQLiteMailboxes:
    """mta.store.api.Mailboxes on the SQLite engine: one thread hand-off per call,
    writes group-committed with the queue's."""

    def __init__(self, engine: Engine):
        self.engine = engine
        # One daemon per SQLite queue (mta/store/sqlite/lock.py), so the maildrop locks
        # of its POP3 sessions live in this process.
        self._locked: set[str] = set()

    async def lock(self, mailbox: str) -> MailboxLock | None:
        key = mailbox_key(mailbox)
        if key in self._locked:
            return None
        self._locked.add(key)
        return _ProcessLock(self._locked, key)

    async def messages(self, mailbox: str) -> list[StoredMessage]:
        """The maildrop in arrival order (POP3 message numbers follow it)."""

        def read(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute(
                "SELECT id, queue_id, size, received FROM mailbox_messages WHERE mailbox = ?"
                " ORDER BY received, id",
                (mailbox_key(mailbox),)).fetchall()
            return [StoredMessage(int(i), str(q), int(s), float(r)) for i, q, s, r in rows]

        return await self.engine.read(read)

    async def read(self, mailbox: str, message_id: int) -> bytes | None:
        """A message's bytes (CRLF line ends, not byte-stuffed); None if it is gone."""

        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT data FROM mailbox_messages WHERE mailbox = ? AND id = ?",
                               (mailbox_key(mailbox), message_id)).fetchone()
            return bytes(row[0]) if row else None

        return await self.engine.read(read)

    async def delete(self, mailbox: str, message_ids: Sequence[int]) -> int:
        """Remove messages in one commit (POP3's UPDATE state); returns how many were there."""
        ids = list(message_ids)

        def delete(conn: sqlite3.Connection) -> int:
            return sum(conn.execute("DELETE FROM mailbox_messages WHERE mailbox = ? AND id = ?",
                                    (mailbox_key(mailbox), i)).rowcount for i in ids)

        return await self.engine.write(delete) if ids else 0

    async def purge(self, mailbox: str) -> int:
        """Remove every message of ``mailbox``."""

        def purge(conn: sqlite3.Connection) -> int:
            return int(conn.execute("DELETE FROM mailbox_messages WHERE mailbox = ?",
                                    (mailbox_key(mailbox),)).rowcount)

        return await self.engine.write(purge)

    async def prune_older_than(self, cutoff: float, *, skip: Collection[str] = ()) -> int:
        """Remove messages received before ``cutoff`` (mailboxes.max_age), except in
        the mailboxes in ``skip`` (held by a POP3 session: RFC 1939 8 gives the
        session exclusive access to its maildrop; the next round takes them)."""
        held = tuple(skip)

        def prune(conn: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(held))
            return int(conn.execute(f"DELETE FROM mailbox_messages WHERE received < ? AND mailbox NOT IN ({marks})",
                                    (cutoff, *held)).rowcount)

        return await self.engine.write(prune)

    async def summaries(self) -> list[MailboxSummary]:
        """Every mailbox that holds mail, by name."""

        def read(conn: sqlite3.Connection) -> list[MailboxSummary]:
            rows = conn.execute(
                "SELECT mailbox, COUNT(*), SUM(size), MIN(received), MAX(received) FROM mailbox_messages"
                " GROUP BY mailbox ORDER BY mailbox").fetchall()
            return [MailboxSummary(str(m), int(n), int(s), float(lo), float(hi)) for m, n, s, lo, hi in rows]

        return await self.engine.read(read)

    async def listing(self, mailbox: str) -> list[MessageSummary]:
        """One mailbox's messages with sender and subject, in arrival order (as POP3 numbers them)."""

        def read(conn: sqlite3.Connection) -> list[MessageSummary]:
            rows = conn.execute(
                "SELECT id, queue_id, size, received, sender, subject FROM mailbox_messages"
                " WHERE mailbox = ? ORDER BY received, id", (mailbox_key(mailbox),)).fetchall()
            return [MessageSummary(int(i), str(q), int(s), float(r), str(f), str(t)) for i, q, s, r, f, t in rows]

        return await self.engine.read(read)


class _ProcessLock:
    def __init__(self, locked: set[str], key: str):
        self._locked = locked
        self._key: str | None = key

    async def release(self) -> None:
        if self._key is not None:
            self._locked.discard(self._key)
            self._key = None
