"""The lab inbox's rows on PostgreSQL (tables ``inbox``, ``inbox_text``; schema
version 2): making an entry for a message's copies, and reading entries back.

Plain async functions on an asyncpg connection inside the caller's transaction,
shared by local delivery's commit (queue.py _insert_copies), the 1 -> 2 back-fill
(schema.py) and the inbox itself (inbox.py); the SQLite twin is
mta/store/sqlite/entries.py, with the same columns (mta/store/inbox_rows.py).
Removing entries is the schema's triggers' job (see schema.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mta.inbox.model import InboxEntry, InboxSummary
from mta.inbox.raw import entry_raw
from mta.inbox.search import clean_text
from mta.inbox.summary import summarize
from mta.store.inbox_rows import ENTRY_COLUMNS, row_to_entry, summary_columns

_INSERT = (
    "INSERT INTO inbox (id, queue_id, created, size, message_id, from_name, from_address, to_list, cc_list,"
    " bcc_list, reply_to_list, subject, date, attachments, snippet, find_from, find_to, find_cc, find_bcc,"
    " find_reply_to, find_subject, find_message_id)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22)"
    " ON CONFLICT (queue_id, created) DO NOTHING RETURNING no")


async def entry_for(conn: Any, queue_id: str, created: float, data: bytes, summary: InboxSummary | None) -> int:
    """The row number (``inbox.no``) of the entry of the message that arrived as
    ``queue_id`` at ``created``, made from ``data`` (one copy's bytes) if it has none yet.

    The entry is locked (FOR KEY SHARE) until the caller's COMMIT, so that a
    transaction removing it meanwhile (its last copy deleted on another node) waits
    for ours and then finds the copy we add. Two nodes storing the first copies of
    one message at once both try the INSERT; the second waits for the first's
    COMMIT (the unique index on queue id and arrival) and then uses its entry."""
    while True:
        no = await conn.fetchval("SELECT no FROM inbox WHERE queue_id = $1 AND created = $2 FOR KEY SHARE",
                                 queue_id, created)
        if no is not None:
            return int(no)
        raw = entry_raw(data)
        if summary is None:
            summary = summarize(raw)
        made = await insert_entry(conn, queue_id, created, len(raw), summary)
        if made is not None:
            return made


async def insert_entry(conn: Any, queue_id: str, created: float, size: int, s: InboxSummary) -> int | None:
    """A new entry (the schema's trigger logs it as 'new'); its ID is the queue id, with
    "-2", "-3"... only while an entry of that ID is still there (queue ids wrap). None
    if another transaction made this message's entry first."""
    entry_id, n = queue_id, 1
    while await conn.fetchval("SELECT 1 FROM inbox WHERE id = $1", entry_id) is not None:
        n += 1
        entry_id = f"{queue_id}-{n}"
    no = await conn.fetchval(_INSERT, entry_id, queue_id, created, size, *summary_columns(s))
    if no is None:
        return None
    await conn.execute("INSERT INTO inbox_text (no, text) VALUES ($1, $2)", no, clean_text(s.search_text))
    return int(no)


async def load_entries(conn: Any, where: str, args: Sequence[Any], order: str = "") -> list[InboxEntry]:
    """Entries of ``SELECT ... FROM inbox e WHERE <where> <order>``, with their tags and mailboxes."""
    rows = await conn.fetch(f"SELECT {ENTRY_COLUMNS} FROM inbox e WHERE {where} {order}", *args)
    return await with_details(conn, rows)


async def with_details(conn: Any, rows: Sequence[Sequence[Any]]) -> list[InboxEntry]:
    """InboxEntries for rows of ENTRY_COLUMNS, in their order, with tags and mailboxes
    (two index look-ups for all of them)."""
    if not rows:
        return []
    nos = [int(r[0]) for r in rows]
    tags: dict[int, list[str]] = {n: [] for n in nos}
    boxes: dict[int, set[str]] = {n: set() for n in nos}
    for no, tag in await conn.fetch("SELECT no, tag FROM inbox_tags WHERE no = ANY($1::bigint[])", nos):
        tags[int(no)].append(str(tag))
    for no, mailbox in await conn.fetch(
            "SELECT inbox_id, mailbox FROM mailbox_messages WHERE inbox_id = ANY($1::bigint[])", nos):
        boxes[int(no)].add(str(mailbox))
    return [row_to_entry(r, tags[int(r[0])], boxes[int(r[0])]) for r in rows]
