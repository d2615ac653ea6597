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

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from mta.inbox.model import Address, InboxEntry, InboxSummary
from mta.inbox.raw import entry_raw
from mta.inbox.search import clean_text
from mta.inbox.summary import summarize

# Columns of an entry as the list needs them, in the order row_to_entry reads them.
ENTRY_COLUMNS = ("e.no, e.id, e.queue_id, e.created, e.size, e.read, e.message_id, e.from_name, e.from_address,"
                 " e.to_list, e.cc_list, e.bcc_list, e.reply_to_list, e.subject, e.date, e.attachments, e.snippet")


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
    from_ = s.from_
    cur = conn.execute(
        "INSERT INTO inbox (id, queue_id, created, size, message_id, from_name, from_address, to_list, cc_list,"
        " bcc_list, reply_to_list, subject, date, attachments, snippet, find_from, find_to, find_cc, find_bcc,"
        " find_reply_to, find_subject, find_message_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (entry_id, queue_id, created, size, s.message_id, from_.name if from_ else None,
         from_.address if from_ else None, _json(s.to), _json(s.cc), _json(s.bcc), _json(s.reply_to), s.subject,
         s.date, s.attachments, s.snippet, _find(() if from_ is None else (from_,)), _find(s.to), _find(s.cc),
         _find(s.bcc), _find(s.reply_to), s.subject.lower(), clean_text(s.message_id)))
    no = int(cur.lastrowid or 0)
    conn.execute("INSERT INTO inbox_text (no, text) VALUES (?, ?)", (no, clean_text(s.search_text)))
    return no


def _json(addresses: Sequence[Address]) -> str:
    if not addresses:   # most Cc, Bcc and Reply-To
        return "[]"
    return json.dumps([[a.name, a.address] for a in addresses], ensure_ascii=False, separators=(",", ":"))


def _find(addresses: Sequence[Address]) -> str:
    # " ; " between addresses: a cleaned needle has no ';', so it never spans two of them.
    return " ; ".join(clean_text(f"{a.name} {a.address}") for a in addresses)


def _addresses(text: str) -> tuple[Address, ...]:
    return tuple(Address(str(name), str(address)) for name, address in json.loads(text))


def row_to_entry(row: Sequence[Any], tags: Iterable[str], mailboxes: Iterable[str]) -> InboxEntry:
    """An InboxEntry from a row of ENTRY_COLUMNS."""
    (_no, entry_id, queue_id, created, size, read, message_id, from_name, from_address, to, cc, bcc, reply_to,
     subject, date, attachments, snippet) = row
    summary = InboxSummary(
        message_id=str(message_id),
        from_=None if from_address is None else Address(str(from_name or ""), str(from_address)),
        to=_addresses(to), cc=_addresses(cc), bcc=_addresses(bcc), reply_to=_addresses(reply_to),
        subject=str(subject), date=None if date is None else float(date), attachments=int(attachments),
        snippet=str(snippet))
    return InboxEntry(id=str(entry_id), queue_id=str(queue_id), created=float(created), size=int(size),
                      read=bool(read), summary=summary, tags=tuple(sorted(tags)),
                      mailboxes=tuple(sorted(mailboxes)))


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
