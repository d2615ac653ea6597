"""A SQLite queue file as `mta queue export` reads it and `mta queue import` writes it
(mta/store/transfer.py has the records and the file).

Export reads the tables directly, a batch of messages per read transaction, and only
while no daemon serves the file (lock.py): mail still arriving or being delivered
would otherwise be missed by the dump or delivered twice after the move. Import may
run beside a daemon: each batch is one write transaction through the engine, and the
daemon finds the new mail at its next look at the queue (within a second).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from mta.errors import StartupError
from mta.store.api import HistoryEntry, mailbox_key, new_queue_id
from mta.store.sqlite.engine import Engine
from mta.store.sqlite.entries import entry_for
from mta.store.sqlite.lock import QueueLock, acquire, holder
from mta.store.transfer import (
    BATCH_MESSAGES,
    Added,
    CopyRecord,
    MessageRecord,
    RecipientRecord,
    TransferError,
    due_again,
    in_pages,
    within_batch_bytes,
)


class SQLiteTransfer:
    """mta.store.transfer.TransferStore on one SQLite queue file."""

    name = "sqlite"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.engine = Engine(self.path)
        self._lock: QueueLock | None = None

    async def open(self) -> None:
        await self.engine.open()

    async def close(self) -> None:
        await self.engine.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def check_quiet(self) -> None:
        """Take the daemon's lock (lock.py) for the export: refused while a daemon serves
        the file, and no daemon starts on it until the export is done."""
        try:
            self._lock = acquire(self.path)
        except StartupError:
            pid = holder(self.path)
            raise TransferError(
                f"{self.path} is in use by mta pid {pid or '?'}: stop it first (mail arriving or being"
                " delivered during the export would be missed or delivered twice)") from None

    # ----------------------------------------------------------------- export

    async def max_copy_id(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT coalesce(max(id), 0) FROM mailbox_messages").fetchone()[0])

        return await self.engine.read(read)

    def messages(self) -> AsyncIterator[list[MessageRecord]]:
        return in_pages(lambda after: self.engine.read_snapshot(partial(_read_messages, after=after)), "")

    def copies(self) -> AsyncIterator[list[CopyRecord]]:
        return in_pages(lambda after: self.engine.read_snapshot(partial(_read_copies, after=after)), 0)

    # ----------------------------------------------------------------- import

    async def reserve_copy_ids(self, up_to: int) -> None:
        """AUTOINCREMENT takes the next id above sqlite_sequence's (and above every row)."""

        def reserve(conn: sqlite3.Connection) -> None:
            if conn.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'mailbox_messages'",
                            (up_to,)).rowcount == 0:
                conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('mailbox_messages', ?)", (up_to,))

        await self.engine.write(reserve)

    async def add_messages(self, records: Sequence[MessageRecord]) -> Added:
        return await self.engine.write(lambda conn: _add_messages(conn, records))

    async def add_copies(self, records: Sequence[tuple[CopyRecord, int]]) -> Added:
        return await self.engine.write(lambda conn: _add_copies(conn, records))


def _read_messages(conn: sqlite3.Connection, after: str) -> list[MessageRecord]:
    """The next batch of messages after queue id ``after``, whole."""
    rows = conn.execute(
        "SELECT id, sender, arrival, client, listener, helo, auth_user, smtputf8, body_8bit, ret, envid,"
        " delay_warned, size FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after, BATCH_MESSAGES)).fetchall()
    kept = within_batch_bytes(rows, lambda row: int(row[-1]))
    found = []
    for (queue_id, sender, arrival, client, listener, helo, auth_user, smtputf8, body_8bit, ret, envid,
         delay_warned, _size) in kept:
        recipients = tuple(
            RecipientRecord(str(a), due_again(str(s), int(n)), int(n), float(t), e, nt, o, float(u))
            for a, s, n, t, e, nt, o, u in conn.execute(
                "SELECT address, state, attempts, next_attempt, last_error, notify, orcpt, updated"
                " FROM recipients WHERE message_id = ? ORDER BY rcpt_no", (queue_id,)))
        history = tuple(HistoryEntry(float(t), r, str(ev), d) for t, r, ev, d in conn.execute(
            "SELECT time, recipient, event, detail FROM history WHERE message_id = ? ORDER BY time, rowid",
            (queue_id,)))
        body = conn.execute("SELECT data FROM bodies WHERE message_id = ?", (queue_id,)).fetchone()
        found.append(MessageRecord(
            id=str(queue_id), sender=str(sender), arrival=float(arrival), recipients=recipients,
            data=bytes(body[0]) if body else b"", client=str(client), listener=str(listener), helo=str(helo),
            auth_user=auth_user, smtputf8=bool(smtputf8), body_8bit=bool(body_8bit), ret=ret, envid=envid,
            delay_warned=bool(delay_warned), history=history))
    return found


def _read_copies(conn: sqlite3.Connection, after: int) -> list[CopyRecord]:
    rows = conn.execute(
        "SELECT m.id, m.mailbox, m.queue_id, m.received, m.sender, m.subject, m.size, e.no, e.read"
        " FROM mailbox_messages m LEFT JOIN inbox e ON e.no = m.inbox_id WHERE m.id > ? ORDER BY m.id LIMIT ?",
        (after, BATCH_MESSAGES)).fetchall()
    found: list[CopyRecord] = []
    for message_id, mailbox, queue_id, received, sender, subject, _size, no, read in within_batch_bytes(
            rows, lambda row: int(row[6])):
        tags: tuple[str, ...] = ()
        if no is not None:
            tags = tuple(str(t) for (t,) in conn.execute(
                "SELECT tag FROM inbox_tags WHERE no = ? ORDER BY tag", (no,)))
        data = conn.execute("SELECT data FROM mailbox_messages WHERE id = ?", (message_id,)).fetchone()[0]
        found.append(CopyRecord(mailbox=str(mailbox), id=int(message_id), queue_id=str(queue_id),
                                received=float(received), sender=str(sender), subject=str(subject),
                                data=bytes(data), read=bool(read), tags=tags))
    return found


def _add_messages(conn: sqlite3.Connection, records: Sequence[MessageRecord]) -> Added:
    added = recipients = skipped = 0
    renamed: list[tuple[str, str]] = []
    for m in records:
        queue_id = m.id
        row = conn.execute("SELECT arrival FROM messages WHERE id = ?", (queue_id,)).fetchone()
        if row is not None:
            if float(row[0]) == m.arrival:
                skipped += 1   # imported before (a second run after an interruption)
                continue
            # Another message has this id (ids wrap after ~12 days, or came from another node):
            # the mail must not be lost, so it gets an id of its own here.
            queue_id = _free_id(conn)
            renamed.append((m.id, queue_id))
        _insert(conn, queue_id, m)
        added += 1
        recipients += len(m.recipients)
    return Added(added, recipients, skipped, tuple(renamed))


def _free_id(conn: sqlite3.Connection) -> str:
    while True:
        queue_id = new_queue_id()
        if conn.execute("SELECT 1 FROM messages WHERE id = ?", (queue_id,)).fetchone() is None:
            return queue_id


def _insert(conn: sqlite3.Connection, queue_id: str, m: MessageRecord) -> None:
    conn.execute(
        "INSERT INTO messages (id, sender, arrival, size, client, listener, helo, auth_user, smtputf8, body_8bit,"
        " ret, envid, delay_warned) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (queue_id, m.sender, m.arrival, len(m.data), m.client, m.listener, m.helo, m.auth_user, int(m.smtputf8),
         int(m.body_8bit), m.ret, m.envid, int(m.delay_warned)))
    conn.execute("INSERT INTO bodies (message_id, data) VALUES (?, ?)", (queue_id, m.data))
    conn.executemany(
        "INSERT INTO recipients (message_id, rcpt_no, address, state, attempts, next_attempt, last_error, notify,"
        " orcpt, updated) VALUES (?,?,?,?,?,?,?,?,?,?)",
        [(queue_id, n, r.address, due_again(r.state, r.attempts), r.attempts, r.next_attempt, r.last_error,
          r.notify, r.orcpt, r.updated) for n, r in enumerate(m.recipients)])
    conn.executemany("INSERT INTO history (message_id, time, recipient, event, detail) VALUES (?,?,?,?,?)",
                     [(queue_id, h.time, h.recipient, h.event, h.detail) for h in m.history])


def _add_copies(conn: sqlite3.Connection, records: Sequence[tuple[CopyRecord, int]]) -> Added:
    """Like mailboxes.insert_copies (an entry per message, made with its first copy), but
    keeping each copy's id where it is free, so its POP3 UIDL stays what clients know
    (AUTOINCREMENT moves past it; one whose id is taken gets a new one above every id
    of the file: reserve_copy_ids), and without pruning: an import removes no mail."""
    added = skipped = 0
    for c, nth in records:
        mailbox = mailbox_key(c.mailbox)
        present = conn.execute(
            "SELECT count(*) FROM mailbox_messages WHERE mailbox = ? AND queue_id = ? AND received = ?",
            (mailbox, c.queue_id, c.received)).fetchone()[0]
        if int(present) >= nth:
            skipped += 1
            continue
        no = entry_for(conn, c.queue_id, c.received, c.data, None)
        taken = conn.execute("SELECT 1 FROM mailbox_messages WHERE id = ?", (c.id,)).fetchone() is not None
        row: tuple[Any, ...] = (mailbox, c.queue_id, c.received, c.sender, c.subject, len(c.data), c.data, no)
        if taken:
            conn.execute("INSERT INTO mailbox_messages (mailbox, queue_id, received, sender, subject, size, data,"
                         " inbox_id) VALUES (?,?,?,?,?,?,?,?)", row)
        else:
            conn.execute("INSERT INTO mailbox_messages (id, mailbox, queue_id, received, sender, subject, size,"
                         " data, inbox_id) VALUES (?,?,?,?,?,?,?,?,?)", (c.id, *row))
        if c.read:
            conn.execute("UPDATE inbox SET read = 1 WHERE no = ? AND read = 0", (no,))
        conn.executemany("INSERT OR IGNORE INTO inbox_tags (no, tag) VALUES (?, ?)", [(no, t) for t in c.tags])
        added += 1
    return Added(added, 0, skipped)
