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

# One statement, one round trip (local delivery's commit runs it for each new message):
# the entry with its search text, or the entry already made for this message (queue id and
# arrival: an earlier attempt's copies, or another node's storing the same message right
# now, which the unique index makes us wait for). The no-op DO UPDATE returns that row and
# locks it until our COMMIT: a transaction removing it (its last copy deleted on another
# node) waits for ours and then finds the copy we add. Its ID is the queue id, with "-2",
# "-3"... only while an entry of that ID is still there (queue ids wrap).
ENTRY_LOCK_CLASS = 0x6D746165   # "mtae": the first key of the per-message entry lock

_UPSERT = (
    "WITH RECURSIVE taken(n) AS (SELECT 1 WHERE EXISTS (SELECT 1 FROM inbox WHERE id = $1)"
    " UNION ALL SELECT n + 1 FROM taken WHERE EXISTS (SELECT 1 FROM inbox WHERE id = $1 || '-' || (n + 1))),"
    " entry AS (INSERT INTO inbox (id, queue_id, created, size, message_id, from_name, from_address, to_list,"
    " cc_list, bcc_list, reply_to_list, subject, date, attachments, snippet, find_from, find_to, find_cc, find_bcc,"
    " find_reply_to, find_subject, find_message_id)"
    " SELECT coalesce((SELECT $1 || '-' || (max(n) + 1) FROM taken HAVING count(*) > 0), $1),"
    " $1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21"
    " ON CONFLICT (queue_id, created) DO UPDATE SET queue_id = EXCLUDED.queue_id RETURNING no),"
    " text AS (INSERT INTO inbox_text (no, text) SELECT no, $22 FROM entry ON CONFLICT (no) DO NOTHING)"
    " SELECT no FROM entry")


async def entry_for(conn: Any, queue_id: str, created: float, data: bytes, summary: InboxSummary | None) -> int:
    """The row number (``inbox.no``) of the entry of the message that arrived as
    ``queue_id`` at ``created``, made from ``data`` (one copy's bytes) if it has none yet;
    locked until the caller's COMMIT (see _UPSERT). Without a summary (the back-fill, or
    a store that was not given one) an existing entry is looked for first, so that the
    copy is parsed only for a new one."""
    raw = entry_raw(data)
    # Two nodes storing the first copies of one message at once: both would pick the same
    # ID, and a conflict on the ID's unique index (not ON CONFLICT's) failed one of them.
    # One at a time per queue id; the second's next statement (a new snapshot, READ
    # COMMITTED) then finds the first one's entry. The two-key form is a key space of its
    # own, apart from every one-key advisory lock (migrations, names, maildrops, pruning).
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", ENTRY_LOCK_CLASS, queue_id)
    if summary is None:
        no = await conn.fetchval("SELECT no FROM inbox WHERE queue_id = $1 AND created = $2 FOR NO KEY UPDATE",
                                 queue_id, created)
        if no is not None:
            return int(no)
        summary = summarize(raw)
    return int(await conn.fetchval(_UPSERT, queue_id, created, len(raw), *summary_columns(summary),
                                   clean_text(summary.search_text)))


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
