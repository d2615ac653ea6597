"""The lab inbox on PostgreSQL: mta.store.api.Inbox over the tables of schema version 2.

The same semantics as the SQLite inbox (mta/store/sqlite/inbox.py), shared by every
node on the database. Entries are made by local delivery's commit (queue.py
_insert_copies, with entries.py) and removed by the schema's triggers with their
last copy; this module lists, searches, marks and deletes them.

A search is compiled to one WHERE clause: every term a condition on the entry row
(case-insensitive substring matches are LIKE on the lower-cased ``find_*`` columns
and on ``inbox_text``), ANDed, as Mailpit's search does. A page is read in one
REPEATABLE READ snapshot, so its counts and its entries agree.

The change log is read under its exclusive advisory lock (schema.py, migration 2):
every change numbered below what a read sees is then committed, so an events poller
that goes on from the last seq it saw never skips one that commits later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mta.inbox.model import InboxChange, InboxEntry, InboxPage, SearchTerm
from mta.inbox.search import needle, parse_date, parse_size
from mta.store.api import mailbox_key
from mta.store.inbox_rows import ENTRY_COLUMNS, like_pattern
from mta.store.postgresql.engine import PgEngine
from mta.store.postgresql.entries import load_entries, with_details
from mta.store.postgresql.schema import CHANGES_LOCK

NEWEST_FIRST = "ORDER BY e.created DESC, e.no DESC"

# The lower-cased columns each text field matches.
_TEXT_COLUMNS = {
    "to": ("e.find_to",), "from": ("e.find_from",), "cc": ("e.find_cc",), "bcc": ("e.find_bcc",),
    "reply-to": ("e.find_reply_to",), "subject": ("e.find_subject",), "message-id": ("e.find_message_id",),
    "addressed": ("e.find_from", "e.find_to", "e.find_cc", "e.find_bcc", "e.find_reply_to"),
}


class _Args:
    """Query arguments, numbered $1, $2, ... as conditions add them."""

    def __init__(self, *values: Any):
        self.values = list(values)

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def compile_terms(terms: Sequence[SearchTerm], args: _Args) -> str:
    """One SQL condition on ``inbox e`` matching every term ("true" for none); its values go to ``args``."""
    conditions = []
    for term in terms:
        condition = _condition(term, args)
        conditions.append(f"NOT ({condition})" if term.negated else condition)
    return " AND ".join(conditions) or "true"


def _condition(term: SearchTerm, args: _Args) -> str:
    field = term.field
    if field is None:
        # One scan of inbox_text for all entries, not a look-up per entry.
        return f"e.no IN (SELECT t.no FROM inbox_text t WHERE t.text LIKE {args.add(like_pattern(needle(term)))})"
    if field in _TEXT_COLUMNS:
        pattern = args.add(like_pattern(needle(term)))   # LIKE's escape is '\' by default, as like_pattern's
        return "(" + " OR ".join(f"{c} LIKE {pattern}" for c in _TEXT_COLUMNS[field]) + ")"
    if field == "tag":
        # SQLite's COLLATE NOCASE: ASCII letters only ("C" makes lower() do just that).
        return ("EXISTS (SELECT 1 FROM inbox_tags g WHERE g.no = e.no"
                f" AND lower(g.tag COLLATE \"C\") = lower({args.add(term.value)} COLLATE \"C\"))")
    if field == "is":
        if term.value == "tagged":
            return "EXISTS (SELECT 1 FROM inbox_tags g WHERE g.no = e.no)"
        return f"e.read = {args.add(term.value == 'read')}"
    if field == "has":
        return "e.attachments > 0"
    if field == "before":
        return f"e.created <= {args.add(parse_date(term.value))}"
    if field == "after":
        return f"e.created >= {args.add(parse_date(term.value))}"
    if field == "larger":
        return f"e.size > {args.add(parse_size(term.value))}"
    if field == "smaller":
        return f"e.size < {args.add(parse_size(term.value))}"
    if field == "mailbox":
        return (f"EXISTS (SELECT 1 FROM mailbox_messages m WHERE m.inbox_id = e.no"
                f" AND m.mailbox = {args.add(mailbox_key(term.value))})")
    raise ValueError(f"unknown search field {field!r}")


def _selection(entry_ids: Sequence[str] | None, terms: Sequence[SearchTerm]) -> tuple[str, list[Any]]:
    """A condition on ``inbox e``: these IDs, or (None) every entry matching ``terms``."""
    args = _Args()
    if entry_ids is not None:
        return f"e.id = ANY({args.add(list(entry_ids))}::text[])", args.values
    return compile_terms(terms, args), args.values


async def _snapshot(conn: Any) -> None:
    """Make the transaction a read-only snapshot (its first statement)."""
    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


class PostgreSQLInbox:
    """mta.store.api.Inbox on PostgreSQL."""

    def __init__(self, engine: PgEngine):
        self.engine = engine

    async def page(self, terms: Sequence[SearchTerm] = (), *, start: int = 0, limit: int = 50,
                   mailbox: str | None = None) -> InboxPage:
        """Newest first, with Mailpit's counts, from one snapshot. Without terms the page
        is read straight off the ``created`` index (or one mailbox's index); a search
        scans once, counting its matches and keeping the page's row numbers."""
        start, limit = max(start, 0), max(limit, 0)
        key = None if mailbox is None else mailbox_key(mailbox)

        async def read(conn: Any) -> InboxPage:
            await _snapshot(conn)
            if key is None:
                base, base_args = "true", _Args()
                total, unread, tags = await conn.fetchrow(
                    "SELECT (SELECT count(*) FROM inbox), (SELECT count(*) FROM inbox WHERE NOT read),"
                    " ARRAY(SELECT DISTINCT tag COLLATE \"C\" FROM inbox_tags ORDER BY 1)")
            else:
                base_args = _Args(key)
                base = "e.no IN (SELECT inbox_id FROM mailbox_messages WHERE mailbox = $1)"
                total, unread, tags = await conn.fetchrow(
                    "SELECT (SELECT count(DISTINCT inbox_id) FROM mailbox_messages WHERE mailbox = $1),"
                    f" (SELECT count(*) FROM inbox e WHERE NOT e.read AND {base}),"
                    " ARRAY(SELECT DISTINCT tag COLLATE \"C\" FROM inbox_tags ORDER BY 1)", key)
            tags = [str(t) for t in tags]
            if not terms:
                if key is None:
                    rows = await conn.fetch(f"SELECT {ENTRY_COLUMNS} FROM inbox e {NEWEST_FIRST} LIMIT $1 OFFSET $2",
                                            limit, start)
                else:
                    # Off the mailbox's own index, where received is the entry's created.
                    rows = await conn.fetch(
                        f"SELECT {ENTRY_COLUMNS} FROM (SELECT DISTINCT received, inbox_id FROM mailbox_messages"
                        " WHERE mailbox = $1 ORDER BY received DESC, inbox_id DESC LIMIT $2 OFFSET $3) AS w"
                        " JOIN inbox e ON e.no = w.inbox_id ORDER BY w.received DESC, w.inbox_id DESC",
                        key, limit, start)
                return InboxPage(await with_details(conn, rows), total, unread, total, unread, tags)
            args = _Args(*base_args.values)
            where = compile_terms(terms, args)
            limit_arg, start_arg = args.add(limit), args.add(start)
            matched, matched_unread, wanted = await conn.fetchrow(
                f"WITH m AS MATERIALIZED (SELECT e.no, e.created, e.read FROM inbox e WHERE {base} AND {where})"
                " SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM m WHERE NOT m.read),"
                f" ARRAY(SELECT no FROM m ORDER BY created DESC, no DESC LIMIT {limit_arg} OFFSET {start_arg})",
                *args.values)
            rows = await conn.fetch(
                f"SELECT {ENTRY_COLUMNS} FROM unnest($1::bigint[]) WITH ORDINALITY AS w(no, n)"
                " JOIN inbox e ON e.no = w.no ORDER BY w.n", list(wanted))
            return InboxPage(await with_details(conn, rows), total, unread, matched, matched_unread, tags)

        return await self.engine.run(read)

    async def entry(self, entry_id: str) -> InboxEntry | None:
        found = await self.entries([entry_id])
        return found[0] if found else None

    async def entries(self, entry_ids: Sequence[str]) -> list[InboxEntry]:
        ids = list(dict.fromkeys(entry_ids))
        if not ids:
            return []

        async def read(conn: Any) -> list[InboxEntry]:
            await _snapshot(conn)
            return await load_entries(conn, "e.id = ANY($1::text[])", [ids], NEWEST_FIRST)

        return await self.engine.run(read)

    async def raw(self, entry_id: str) -> bytes | None:
        async def read(conn: Any) -> bytes | None:
            data = await conn.fetchval("SELECT m.data FROM inbox e JOIN mailbox_messages m ON m.inbox_id = e.no"
                                       " WHERE e.id = $1 ORDER BY m.id LIMIT 1", entry_id)
            return None if data is None else bytes(data)

        return await self.engine.run(read)

    async def set_read(self, entry_ids: Sequence[str] | None, read: bool, terms: Sequence[SearchTerm] = ()) -> int:
        """Mark entries read or unread (the schema's trigger logs each change); returns how many changed."""
        if entry_ids is not None and not entry_ids:
            return 0
        where, args = _selection(entry_ids, terms)
        flag = f"${len(args) + 1}"

        async def mark(conn: Any) -> int:
            rows = await conn.fetch(f"UPDATE inbox AS e SET read = {flag} WHERE e.read <> {flag} AND {where}"
                                    " RETURNING 1", *args, read)
            return len(rows)

        return await self.engine.run(mark)

    async def set_tags(self, entry_ids: Sequence[str], tags: Sequence[str]) -> int:
        """Replace the tags of these entries (duplicates dropped); returns how many exist."""
        ids = list(dict.fromkeys(entry_ids))
        wanted = list(dict.fromkeys(t for t in tags if t))
        if not ids:
            return 0

        async def tag(conn: Any) -> int:
            # Locked: an entry deleted meanwhile (by another node) leaves no tags behind.
            nos = [int(no) for (no,) in await conn.fetch(
                "SELECT no FROM inbox WHERE id = ANY($1::text[]) ORDER BY no FOR UPDATE", ids)]
            await conn.execute("DELETE FROM inbox_tags WHERE no = ANY($1::bigint[])", nos)
            await conn.executemany("INSERT INTO inbox_tags (no, tag) VALUES ($1, $2)",
                                   [(no, t) for no in nos for t in wanted])
            return len(nos)

        return await self.engine.run(tag)

    async def delete(self, entry_ids: Sequence[str] | None, terms: Sequence[SearchTerm] = ()) -> list[str]:
        """Remove entries and every mailbox copy of them in one transaction (the schema's
        trigger removes the copies and logs each deletion); returns the IDs removed."""
        if entry_ids is not None and not entry_ids:
            return []
        where, args = _selection(entry_ids, terms)

        async def delete(conn: Any) -> list[str]:
            rows = await conn.fetch(f"DELETE FROM inbox WHERE no IN (SELECT e.no FROM inbox e WHERE {where})"
                                    " RETURNING no, id", *args)
            return [str(r[1]) for r in sorted(rows)]

        return await self.engine.run(delete)

    async def changes_since(self, seq: int, *, limit: int = 500) -> list[InboxChange]:
        async def read(conn: Any) -> list[InboxChange]:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CHANGES_LOCK)
            # A statement of its own: its snapshot is taken with the lock held.
            rows = await conn.fetch("SELECT seq, kind, id FROM inbox_changes WHERE seq > $1 ORDER BY seq LIMIT $2",
                                    seq, limit)
            return [InboxChange(int(s), str(k), str(i)) for s, k, i in rows]

        return await self.engine.run(read)

    async def last_change(self) -> int:
        """The newest change's seq, from the sequence (the log itself is pruned), read
        under the change log's lock: no transaction holding a lower number is left running."""
        async def read(conn: Any) -> int:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CHANGES_LOCK)
            value = await conn.fetchval(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM inbox_changes_seq")
            return int(value)

        return await self.engine.run(read)
