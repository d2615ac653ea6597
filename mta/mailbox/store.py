"""Mailbox SQL: the copies local delivery keeps, and what POP3 and the CLI read.

Mailboxes live in the queue's own SQLite file (table ``mailbox_messages``,
schema version 5), so a local delivery and the recipient's 'delivered' state
are one commit: :func:`insert_copies` runs inside the queue store's
transaction. A message is stored exactly as POP3 sends it before
byte-stuffing: CRLF line ends, so ``size`` is the octet count STAT and LIST
report (RFC 1939 §5).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mta.queue.store import QueueStore

MIGRATION = """
    CREATE TABLE mailbox_messages (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: never reused, part of the UIDL
        mailbox  TEXT NOT NULL,                      -- the full address, lower-cased
        queue_id TEXT NOT NULL,
        received REAL NOT NULL,                      -- when the message arrived in the queue
        sender   TEXT NOT NULL,
        subject  TEXT NOT NULL DEFAULT '',
        size     INTEGER NOT NULL,
        data     BLOB NOT NULL                       -- last, so listing never reads it
    );
    -- Covers POP3's maildrop scan (STAT, LIST, UIDL) in arrival order without touching message bytes.
    CREATE INDEX mailbox_messages_box ON mailbox_messages(mailbox, received, id, size, queue_id);
    CREATE INDEX mailbox_messages_received ON mailbox_messages(received);
"""


@dataclass(frozen=True, slots=True)
class MailboxCopy:
    """One recipient's copy, headers added, to be stored by local delivery."""

    mailbox: str
    queue_id: str
    sender: str
    subject: str
    data: bytes
    arrival: float | None = None   # the message's arrival in the queue (else now): mailboxes are in this order


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message in a mailbox, without its bytes."""

    id: int
    queue_id: str
    size: int
    received: float

    @property
    def uid(self) -> str:
        return uidl(self.queue_id, self.id)


@dataclass(frozen=True, slots=True)
class MailboxSummary:
    mailbox: str
    messages: int
    size: int
    oldest: float
    newest: float


@dataclass(frozen=True, slots=True)
class MessageSummary:
    id: int
    queue_id: str
    size: int
    received: float
    sender: str
    subject: str

    @property
    def uid(self) -> str:
        return uidl(self.queue_id, self.id)


def uidl(queue_id: str, row_id: int) -> str:
    """RFC 1939 §7 UIDL: 1-70 characters in 0x21-0x7E, never reused for another
    message. The row id is never reused (AUTOINCREMENT); the queue id keeps it
    unique even if the database is ever recreated and ids start again."""
    return f"{queue_id}.{row_id}"


def mailbox_key(address: str) -> str:
    """Mailboxes are looked up without regard to case (as Postfix's local(8) does)."""
    return address.lower()


def insert_copies(conn: sqlite3.Connection, copies: Sequence[MailboxCopy], now: float, max_messages: int) -> int:
    """Store ``copies`` (inside the caller's transaction); prune each mailbox touched
    to its newest ``max_messages``. Returns how many old messages were pruned.

    Mailboxes are in arrival order, not delivery order: messages delivered in
    parallel still read back in the order they were sent."""
    conn.executemany(
        "INSERT INTO mailbox_messages (mailbox, queue_id, received, sender, subject, size, data)"
        " VALUES (?,?,?,?,?,?,?)",
        [(mailbox_key(c.mailbox), c.queue_id, now if c.arrival is None else c.arrival, c.sender, c.subject, len(c.data), c.data)
         for c in copies])
    pruned = 0
    for mailbox in {mailbox_key(c.mailbox) for c in copies}:
        pruned += conn.execute(
            "DELETE FROM mailbox_messages WHERE id IN (SELECT id FROM mailbox_messages WHERE mailbox = ?"
            " ORDER BY received DESC, id DESC LIMIT -1 OFFSET ?)", (mailbox, max_messages)).rowcount
    return pruned


class MailboxStore:
    """Reads and deletions for POP3 and ``mta mailbox``; runs on the queue store's
    connection (one thread hand-off per call, writes group-committed with the queue's)."""

    def __init__(self, queue: "QueueStore"):
        self.queue = queue

    async def messages(self, mailbox: str) -> list[StoredMessage]:
        """The maildrop in arrival order (POP3 message numbers follow it)."""

        def read(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute(
                "SELECT id, queue_id, size, received FROM mailbox_messages WHERE mailbox = ?"
                " ORDER BY received, id",
                (mailbox_key(mailbox),)).fetchall()
            return [StoredMessage(int(i), str(q), int(s), float(r)) for i, q, s, r in rows]

        return await self.queue._in_thread(read)

    async def read(self, mailbox: str, message_id: int) -> bytes | None:
        """A message's bytes (CRLF line ends, not byte-stuffed); None if it is gone."""

        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT data FROM mailbox_messages WHERE mailbox = ? AND id = ?",
                               (mailbox_key(mailbox), message_id)).fetchone()
            return bytes(row[0]) if row else None

        return await self.queue._in_thread(read)

    async def delete(self, mailbox: str, message_ids: Sequence[int]) -> int:
        """Remove messages in one commit (POP3's UPDATE state); returns how many were there."""
        ids = list(message_ids)

        def delete(conn: sqlite3.Connection) -> int:
            return sum(conn.execute("DELETE FROM mailbox_messages WHERE mailbox = ? AND id = ?",
                                    (mailbox_key(mailbox), i)).rowcount for i in ids)

        return await self.queue._write(delete) if ids else 0

    async def purge(self, mailbox: str) -> int:
        """Remove every message of ``mailbox``."""

        def purge(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM mailbox_messages WHERE mailbox = ?",
                                (mailbox_key(mailbox),)).rowcount

        return await self.queue._write(purge)

    async def prune_older_than(self, cutoff: float, *, skip: Collection[str] = ()) -> int:
        """Remove messages received before ``cutoff`` (mailboxes.max_age), except in
        the mailboxes in ``skip`` (held by a POP3 session: RFC 1939 8 gives the
        session exclusive access to its maildrop; the next round takes them)."""
        held = tuple(skip)

        def prune(conn: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(held))
            return conn.execute(f"DELETE FROM mailbox_messages WHERE received < ? AND mailbox NOT IN ({marks})",
                                (cutoff, *held)).rowcount

        return await self.queue._write(prune)

    async def summaries(self) -> list[MailboxSummary]:
        """Every mailbox that holds mail, by name."""

        def read(conn: sqlite3.Connection) -> list[MailboxSummary]:
            rows = conn.execute(
                "SELECT mailbox, COUNT(*), SUM(size), MIN(received), MAX(received) FROM mailbox_messages"
                " GROUP BY mailbox ORDER BY mailbox").fetchall()
            return [MailboxSummary(str(m), int(n), int(s), float(lo), float(hi)) for m, n, s, lo, hi in rows]

        return await self.queue._in_thread(read)

    async def listing(self, mailbox: str) -> list[MessageSummary]:
        """One mailbox's messages with sender and subject, in arrival order (as POP3 numbers them)."""

        def read(conn: sqlite3.Connection) -> list[MessageSummary]:
            rows = conn.execute(
                "SELECT id, queue_id, size, received, sender, subject FROM mailbox_messages"
                " WHERE mailbox = ? ORDER BY received, id", (mailbox_key(mailbox),)).fetchall()
            return [MessageSummary(int(i), str(q), int(s), float(r), str(f), str(t)) for i, q, s, r, f, t in rows]

        return await self.queue._in_thread(read)
