"""The lab inbox on SQLite: mta.store.api.Inbox over the tables of schema version 6.

Entries are made by local delivery's commit (mailboxes.py insert_copies, with
entries.py) and removed by the schema's triggers with their last copy; this
module lists, searches, marks and deletes them. Reads run on the engine's
aside connection (Engine.read_aside): a search over 100,000 entries takes a
good part of a second, and must not hold up the queue's commits meanwhile.

A search is compiled to one WHERE clause: every term a condition on the entry
row (case-insensitive substring matches are LIKE on the lower-cased ``find_*``
columns and on ``inbox_text``), ANDed, as Mailpit's search does.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from mta.inbox.model import InboxChange, InboxEntry, InboxPage, SearchTerm
from mta.inbox.search import needle, parse_date, parse_size
from mta.store.api import mailbox_key
from mta.store.inbox_rows import like_pattern
from mta.store.sqlite.engine import Engine
from mta.store.sqlite.entries import ENTRY_COLUMNS, load_entries, with_details

NEWEST_FIRST = "ORDER BY e.created DESC, e.no DESC"
# For a search: "+" keeps SQLite from walking the created index with a row look-up
# per entry; a plain scan of the table and a sort of the matches is faster for the
# searches people make, which match few entries (at 100,000: 77 ms instead of 118).
SCAN_NEWEST_FIRST = "ORDER BY +e.created DESC, +e.no DESC"

# The lower-cased columns each text field matches.
_TEXT_COLUMNS = {
    "to": ("e.find_to",), "from": ("e.find_from",), "cc": ("e.find_cc",), "bcc": ("e.find_bcc",),
    "reply-to": ("e.find_reply_to",), "subject": ("e.find_subject",), "message-id": ("e.find_message_id",),
    "addressed": ("e.find_from", "e.find_to", "e.find_cc", "e.find_bcc", "e.find_reply_to"),
}
# One scan of inbox_text for all entries, not a look-up per entry: 4x faster at 100,000.
_FREE_TEXT = "e.no IN (SELECT t.no FROM inbox_text t WHERE t.text LIKE ? ESCAPE '\\')"
_IN_MAILBOX = "e.no IN (SELECT inbox_id FROM mailbox_messages WHERE mailbox = ?)"


def compile_terms(terms: Sequence[SearchTerm]) -> tuple[str, list[Any]]:
    """One SQL condition on ``inbox e`` matching every term ("1" for none), and its arguments."""
    conditions, args = [], []
    for term in terms:
        condition, term_args = _condition(term)
        conditions.append(f"NOT ({condition})" if term.negated else condition)
        args.extend(term_args)
    return (" AND ".join(conditions) or "1"), args


def _condition(term: SearchTerm) -> tuple[str, list[Any]]:
    field = term.field
    if field is None:
        return _FREE_TEXT, [like_pattern(needle(term))]
    if field in _TEXT_COLUMNS:
        columns = _TEXT_COLUMNS[field]
        pattern = like_pattern(needle(term))
        return "(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in columns) + ")", [pattern] * len(columns)
    if field == "tag":
        return "EXISTS (SELECT 1 FROM inbox_tags g WHERE g.no = e.no AND g.tag = ? COLLATE NOCASE)", [term.value]
    if field == "is":
        if term.value == "tagged":
            return "EXISTS (SELECT 1 FROM inbox_tags g WHERE g.no = e.no)", []
        return "e.read = ?", [1 if term.value == "read" else 0]
    if field == "has":
        return "e.attachments > 0", []
    if field == "before":
        return "e.created <= ?", [parse_date(term.value)]
    if field == "after":
        return "e.created >= ?", [parse_date(term.value)]
    if field == "larger":
        return "e.size > ?", [parse_size(term.value)]
    if field == "smaller":
        return "e.size < ?", [parse_size(term.value)]
    if field == "mailbox":
        return "EXISTS (SELECT 1 FROM mailbox_messages m WHERE m.inbox_id = e.no AND m.mailbox = ?)", [
            mailbox_key(term.value)]
    raise ValueError(f"unknown search field {field!r}")


def _rows(conn: sqlite3.Connection, nos: Sequence[int]) -> list[Any]:
    """The ENTRY_COLUMNS rows of these row numbers, in their order (gone ones left out)."""
    if not nos:
        return []
    found = {int(r[0]): r for r in conn.execute(
        f"SELECT {ENTRY_COLUMNS} FROM inbox e WHERE e.no IN ({','.join('?' * len(nos))})", list(nos))}
    return [found[no] for no in nos if no in found]


def _ids_where(entry_ids: Sequence[str]) -> tuple[str, list[Any]]:
    return f"e.id IN ({','.join('?' * len(entry_ids))})", list(entry_ids)


class SQLiteInbox:
    """mta.store.api.Inbox on the SQLite engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def page(self, terms: Sequence[SearchTerm] = (), *, start: int = 0, limit: int = 50,
                   mailbox: str | None = None) -> InboxPage:
        """Newest first, with Mailpit's counts, from one snapshot. Without terms the
        page is read straight off the ``created`` index; a search reads the row
        numbers of every match in order once (for its counts) and then the page's rows."""
        start, limit = max(start, 0), max(limit, 0)
        where, args = compile_terms(terms)

        def read(conn: sqlite3.Connection) -> InboxPage:
            if mailbox is None:
                base, base_args = "1", []
                total = int(conn.execute("SELECT count(*) FROM inbox").fetchone()[0])
                unread = int(conn.execute("SELECT count(*) FROM inbox WHERE read = 0").fetchone()[0])
            else:
                base, base_args = _IN_MAILBOX, [mailbox_key(mailbox)]
                total = int(conn.execute("SELECT count(DISTINCT inbox_id) FROM mailbox_messages WHERE mailbox = ?",
                                         base_args).fetchone()[0])
                unread = int(conn.execute(f"SELECT count(*) FROM inbox e WHERE e.read = 0 AND {base}",
                                          base_args).fetchone()[0])
            tags = [str(t) for (t,) in conn.execute("SELECT DISTINCT tag FROM inbox_tags ORDER BY tag")]
            if not terms:
                if mailbox is None:
                    rows = conn.execute(f"SELECT {ENTRY_COLUMNS} FROM inbox e {NEWEST_FIRST} LIMIT ? OFFSET ?",
                                        (limit, start)).fetchall()
                    return InboxPage(with_details(conn, rows), total, unread, total, unread, tags)
                # Off the mailbox's own index, where received is the entry's created.
                wanted = [int(no) for _, no in conn.execute(
                    "SELECT DISTINCT received, inbox_id FROM mailbox_messages WHERE mailbox = ?"
                    " ORDER BY received DESC, inbox_id DESC LIMIT ? OFFSET ?", (*base_args, limit, start))]
                return InboxPage(with_details(conn, _rows(conn, wanted)), total, unread, total, unread, tags)
            matches = conn.execute(f"SELECT e.no, e.read FROM inbox e WHERE {base} AND {where} {SCAN_NEWEST_FIRST}",
                                   (*base_args, *args)).fetchall()
            wanted = [int(no) for no, _ in matches[start:start + limit]]
            matched_unread = sum(1 for _, read_ in matches if not read_)
            return InboxPage(with_details(conn, _rows(conn, wanted)), total, unread, len(matches), matched_unread,
                             tags)

        return await self.engine.read_aside(read)

    async def entry(self, entry_id: str) -> InboxEntry | None:
        found = await self.entries([entry_id])
        return found[0] if found else None

    async def entries(self, entry_ids: Sequence[str]) -> list[InboxEntry]:
        ids = list(dict.fromkeys(entry_ids))
        if not ids:
            return []
        where, args = _ids_where(ids)
        return await self.engine.read_aside(lambda conn: load_entries(conn, where, args, NEWEST_FIRST))

    async def raw(self, entry_id: str) -> bytes | None:
        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT m.data FROM inbox e JOIN mailbox_messages m ON m.inbox_id = e.no"
                               " WHERE e.id = ? ORDER BY m.id LIMIT 1", (entry_id,)).fetchone()
            return bytes(row[0]) if row else None

        return await self.engine.read_aside(read)

    async def set_read(self, entry_ids: Sequence[str] | None, read: bool, terms: Sequence[SearchTerm] = ()) -> int:
        """Mark entries read or unread (the schema's trigger logs each change); returns how many changed."""
        if entry_ids is not None:
            if not entry_ids:
                return 0
            where, args = _ids_where(list(entry_ids))
        else:
            where, args = compile_terms(terms)
        flag = int(read)

        def mark(conn: sqlite3.Connection) -> int:
            return int(conn.execute(f"UPDATE inbox AS e SET read = ? WHERE e.read != ? AND {where}",
                                    (flag, flag, *args)).rowcount)

        return await self.engine.write(mark)

    async def set_tags(self, entry_ids: Sequence[str], tags: Sequence[str]) -> int:
        """Replace the tags of these entries (duplicates dropped); returns how many exist."""
        ids = list(dict.fromkeys(entry_ids))
        wanted = list(dict.fromkeys(t for t in tags if t))
        if not ids:
            return 0
        where, args = _ids_where(ids)

        def tag(conn: sqlite3.Connection) -> int:
            nos = [int(no) for (no,) in conn.execute(f"SELECT e.no FROM inbox e WHERE {where}", args)]
            conn.executemany("DELETE FROM inbox_tags WHERE no = ?", [(no,) for no in nos])
            conn.executemany("INSERT INTO inbox_tags (no, tag) VALUES (?, ?)", [(no, t) for no in nos for t in wanted])
            return len(nos)

        return await self.engine.write(tag)

    async def delete(self, entry_ids: Sequence[str] | None, terms: Sequence[SearchTerm] = ()) -> list[str]:
        """Remove entries and every mailbox copy of them in one commit (the schema's
        trigger removes the copies and logs each deletion); returns the IDs removed."""
        if entry_ids is not None:
            if not entry_ids:
                return []
            where, args = _ids_where(list(entry_ids))
        else:
            where, args = compile_terms(terms)

        def delete(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(f"DELETE FROM inbox WHERE no IN (SELECT e.no FROM inbox e WHERE {where})"
                                " RETURNING id", args).fetchall()
            return [str(r[0]) for r in rows]

        return await self.engine.write(delete)

    async def changes_since(self, seq: int, *, limit: int = 500) -> list[InboxChange]:
        def read(conn: sqlite3.Connection) -> list[InboxChange]:
            rows = conn.execute("SELECT seq, kind, id FROM inbox_changes WHERE seq > ? ORDER BY seq LIMIT ?",
                                (seq, limit)).fetchall()
            return [InboxChange(int(s), str(k), str(i)) for s, k, i in rows]

        return await self.engine.read_aside(read)

    async def last_change(self) -> int:
        """The newest change's seq, from the AUTOINCREMENT high-water mark (the log itself is pruned)."""
        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'inbox_changes'").fetchone()
            return int(row[0]) if row else 0

        return await self.engine.read_aside(read)
