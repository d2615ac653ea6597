"""The lab inbox's rows (tables ``inbox``, ``inbox_text``, ``inbox_tags``; schema
version 6): making an entry for a message's copies, and reading entries back.

Plain functions on a sqlite3 connection inside the caller's transaction, shared
by local delivery's commit (mailboxes.py insert_copies), the 5 -> 6 back-fill
(schema.py) and the inbox itself (inbox.py). Removing entries is the schema's
triggers' job (see schema.py): whatever removes a message's last copy removes
its entry and logs the change, in the same commit.

Each entry row keeps what the list shows (addresses as JSON ``[[name, address],
...]``) and, lower-cased and cleaned as Mailpit cleans search text, what the
field searches match (``find_*``); the free text lives in ``inbox_text``, so
list rows stay small.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from mta.inbox.model import InboxEntry, InboxSummary
from mta.inbox.raw import entry_raw
from mta.inbox.search import clean_text
from mta.inbox.summary import summarize
from mta.store.inbox_rows import ENTRY_COLUMNS, row_to_entry, summary_columns

__all__ = ["ENTRY_COLUMNS", "entry_for", "insert_entry", "load_entries", "with_details"]


def entry_for(conn: sqlite3.Connection, queue_id: str, created: float, data: bytes,
              summary: InboxSummary | None) -> int:
    """The row number (``inbox.no``) of the entry of the message that arrived as
    ``queue_id`` at ``created``, made from ``data`` (one copy's bytes) if it has none yet."""
    row = conn.execute("SELECT no FROM inbox WHERE queue_id = ? AND created = ?", (queue_id, created)).fetchone()
    if row is not None:
        return int(row[0])
    raw = entry_raw(data)
    if summary is None:
        summary = summarize(raw)
    return insert_entry(conn, queue_id, created, len(raw), summary)


def insert_entry(conn: sqlite3.Connection, queue_id: str, created: float, size: int, s: InboxSummary) -> int:
    """A new entry (the schema's trigger logs it as 'new'); its ID is the queue id, with
    "-2", "-3"... only while an entry of that ID is still there (queue ids wrap)."""
    entry_id, n = queue_id, 1
    while conn.execute("SELECT 1 FROM inbox WHERE id = ?", (entry_id,)).fetchone() is not None:
        n += 1
        entry_id = f"{queue_id}-{n}"
    cur = conn.execute(
        "INSERT INTO inbox (id, queue_id, created, size, message_id, from_name, from_address, to_list, cc_list,"
        " bcc_list, reply_to_list, subject, date, attachments, snippet, find_from, find_to, find_cc, find_bcc,"
        " find_reply_to, find_subject, find_message_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (entry_id, queue_id, created, size, *summary_columns(s)))
    no = int(cur.lastrowid or 0)
    conn.execute("INSERT INTO inbox_text (no, text) VALUES (?, ?)", (no, clean_text(s.search_text)))
    return no


def load_entries(conn: sqlite3.Connection, where: str, args: Sequence[Any], order: str = "") -> list[InboxEntry]:
    """Entries of ``SELECT ... FROM inbox e WHERE <where> <order>``, with their tags and mailboxes."""
    rows = conn.execute(f"SELECT {ENTRY_COLUMNS} FROM inbox e WHERE {where} {order}", args).fetchall()
    return with_details(conn, rows)


def with_details(conn: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> list[InboxEntry]:
    """InboxEntries for rows of ENTRY_COLUMNS, in their order, with tags and mailboxes
    (two index look-ups for all of them)."""
    if not rows:
        return []
    nos = [int(r[0]) for r in rows]
    tags: dict[int, list[str]] = {n: [] for n in nos}
    boxes: dict[int, set[str]] = {n: set() for n in nos}
    for chunk in _chunks(nos):
        marks = ",".join("?" * len(chunk))
        for no, tag in conn.execute(f"SELECT no, tag FROM inbox_tags WHERE no IN ({marks})", chunk):
            tags[int(no)].append(str(tag))
        for no, mailbox in conn.execute(
                f"SELECT inbox_id, mailbox FROM mailbox_messages WHERE inbox_id IN ({marks})", chunk):
            boxes[int(no)].add(str(mailbox))
    return [row_to_entry(r, tags[int(r[0])], boxes[int(r[0])]) for r in rows]


def _chunks(values: Sequence[int], size: int = 500) -> Iterable[Sequence[int]]:
    for i in range(0, len(values), size):
        yield values[i:i + size]
