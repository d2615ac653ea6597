"""`mta queue repair`: copy what can still be read of a damaged queue into a new file.

SQLite's own answer is the CLI's ``.recover``, but Debian 12's sqlite3 (3.40.1)
is built without the sqlite_dbpage table it needs: there it fails with
"SQL logic error" on any file, damaged or not. ``.dump`` gives up on a table at
its first bad page and ends with ROLLBACK. This copies row by row instead,
stepping over unreadable pages, and keeps the queue's own rules:

* every message row that can be read is kept if its body and its recipients
  can be read too; otherwise it is listed as lost (id and sender, so that the
  sender can be told) -- a message without its body cannot be delivered, and
  one without recipients would never leave the queue;
* recipients keep their state, attempts and errors; history rows are kept
  where readable (they are only for ``mta queue show``);
* mailbox messages are kept where readable, and their id sequence (part of
  the POP3 UIDL) never goes back;
* lab inbox entries are kept where readable (read state, tags); a copy whose
  entry was lost gets one made again from its bytes, an entry whose copies
  were all lost goes.

The new file gets the current schema and must pass ``PRAGMA integrity_check``.
The damaged file is only read.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mta.inbox.raw import entry_raw
from mta.inbox.search import clean_text
from mta.inbox.summary import summarize
from mta.store.sqlite.damage import is_corruption
from mta.store.sqlite.entries import entry_for

_MIN_ROWID = -(1 << 63)
_MAX_ROWID = (1 << 63) - 1


class RepairError(Exception):
    """Nothing can be copied (str() is one line)."""


@dataclass
class RepairReport:
    messages: int = 0
    recipients: int = 0
    history: int = 0
    mailbox_messages: int = 0
    lost: list[str] = field(default_factory=list)     # "ID <sender>: why", per message lost
    skipped_ranges: int = 0                            # runs of unreadable rows stepped over


def repair(damaged: Path, output: Path, create_schema: Callable[[sqlite3.Connection], None]) -> RepairReport:
    """Copy ``damaged`` into the new file ``output`` (which must not exist);
    ``create_schema`` makes the current schema in an empty database."""
    try:
        src = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise RepairError(f"cannot read {damaged}: {exc}") from None
    try:
        try:
            src.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            raise RepairError(f"nothing can be read of {damaged} ({exc}): its header or schema page "
                              "cannot be read; restore it from a backup") from None
        fd = os.open(output, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)   # other people's mail
        os.close(fd)
        dst = sqlite3.connect(output, isolation_level=None)
        try:
            dst.execute("BEGIN")
            create_schema(dst)
            report = _copy(src, dst)
            dst.execute("COMMIT")
            problems = [str(r[0]) for r in dst.execute("PRAGMA integrity_check").fetchall()]
            if problems != ["ok"]:
                raise RepairError(f"the copy {output} fails its own check: {problems[0]}")
        except BaseException:
            dst.close()
            output.unlink(missing_ok=True)   # no half-made file to put in place by mistake
            raise
        dst.close()
        return report
    finally:
        src.close()


def _copy(src: sqlite3.Connection, dst: sqlite3.Connection) -> RepairReport:
    report = RepairReport()
    message_cols = _columns(dst, "messages")
    rcpt_cols = _columns(dst, "recipients")
    history_cols = _columns(dst, "history")
    mailbox_cols = _columns(dst, "mailbox_messages")
    for row in _readable_rows(src, "messages", message_cols, report):
        message = dict(zip(message_cols, row, strict=True))
        message_id, sender = message["id"], message["sender"]
        try:
            body = src.execute("SELECT data FROM bodies WHERE message_id = ?", (message_id,)).fetchone()
            rcpts = src.execute(f"SELECT {', '.join(rcpt_cols)} FROM recipients WHERE message_id = ?"
                                " ORDER BY rcpt_no", (message_id,)).fetchall()
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise
            report.lost.append(f"{message_id} <{sender}>: {exc}")
            continue
        if body is None:
            report.lost.append(f"{message_id} <{sender}>: no body")
            continue
        pending = [r for r in rcpts if r[rcpt_cols.index("state")] not in ("delivered", "bounced")]
        if not pending:
            # Nothing left to deliver (or the recipients are gone: then it cannot be delivered).
            if not rcpts:
                report.lost.append(f"{message_id} <{sender}>: no recipients")
            continue
        _insert(dst, "messages", message_cols, [row])
        dst.execute("INSERT INTO bodies (message_id, data) VALUES (?, ?)", (message_id, body[0]))
        _insert(dst, "recipients", rcpt_cols, rcpts)
        report.messages += 1
        report.recipients += len(rcpts)
        try:
            history = src.execute(f"SELECT {', '.join(history_cols)} FROM history WHERE message_id = ?"
                                  " ORDER BY rowid", (message_id,)).fetchall()
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise
            history = []   # only for `mta queue show`
        _insert(dst, "history", history_cols, history)
        report.history += len(history)
    _copy_inbox(src, dst, report)
    mailbox = list(_readable_rows(src, "mailbox_messages", mailbox_cols, report))
    mailbox = _with_entries(dst, mailbox_cols, mailbox)
    _insert(dst, "mailbox_messages", mailbox_cols, mailbox)
    report.mailbox_messages = len(mailbox)
    _finish_inbox(dst)
    # The AUTOINCREMENT high-water marks: a UIDL is never given out twice, and an
    # events client's position in the inbox's change log never goes back.
    for table in ("mailbox_messages", "inbox_changes"):
        try:
            seq = src.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        except sqlite3.DatabaseError:
            seq = None
        if seq is not None:
            dst.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (seq[0], table))
            dst.execute("INSERT INTO sqlite_sequence (name, seq) SELECT ?, ? WHERE NOT EXISTS"
                        " (SELECT 1 FROM sqlite_sequence WHERE name = ?)", (table, seq[0], table))
    return report


def _copy_inbox(src: sqlite3.Connection, dst: sqlite3.Connection, report: RepairReport) -> None:
    """The lab inbox's entries, search text and tags, where readable (their row numbers
    kept: the copies point at them). What cannot be read is made again from the copies."""
    entries = list(_readable_rows(src, "inbox", _columns(dst, "inbox"), report))
    _insert(dst, "inbox", _columns(dst, "inbox"), entries)
    texts = list(_readable_rows(src, "inbox_text", _columns(dst, "inbox_text"), report))
    dst.executemany("INSERT INTO inbox_text (no, text) SELECT ?, ? WHERE EXISTS (SELECT 1 FROM inbox WHERE no = ?)",
                    [(no, text, no) for no, text in texts])
    try:   # WITHOUT ROWID: all or nothing; tags are the least of what a repair saves
        tags = src.execute("SELECT no, tag FROM inbox_tags").fetchall()
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise
        tags = []
    dst.executemany("INSERT INTO inbox_tags (no, tag) SELECT ?, ? WHERE EXISTS (SELECT 1 FROM inbox WHERE no = ?)",
                    [(no, tag, no) for no, tag in tags])


def _with_entries(dst: sqlite3.Connection, cols: list[str], rows: list[Any]) -> list[Any]:
    """Mailbox copies whose entry was lost point at one made again from their bytes."""
    where = {name: cols.index(name) for name in ("inbox_id", "queue_id", "received", "data")}
    kept = {int(no) for (no,) in dst.execute("SELECT no FROM inbox")}
    fixed = []
    for row in rows:
        if row[where["inbox_id"]] not in kept:
            values = list(row)
            values[where["inbox_id"]] = entry_for(dst, str(row[where["queue_id"]]), float(row[where["received"]]),
                                                  bytes(row[where["data"]]), None)
            kept.add(values[where["inbox_id"]])
            row = tuple(values)
        fixed.append(row)
    return fixed


def _finish_inbox(dst: sqlite3.Connection) -> None:
    """Entries whose copies were all lost go; entries whose search text was lost get it
    again; the change log starts empty (its rows were made by this copy's inserts)."""
    dst.execute("DELETE FROM inbox WHERE no NOT IN (SELECT inbox_id FROM mailbox_messages WHERE inbox_id IS NOT NULL)")
    missing = dst.execute("SELECT e.no, (SELECT m.data FROM mailbox_messages m WHERE m.inbox_id = e.no LIMIT 1)"
                          " FROM inbox e WHERE e.no NOT IN (SELECT no FROM inbox_text)").fetchall()
    dst.executemany("INSERT INTO inbox_text (no, text) VALUES (?, ?)",
                    [(no, clean_text(summarize(entry_raw(bytes(data))).search_text)) for no, data in missing])
    dst.execute("DELETE FROM inbox_changes")


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")]


def _insert(dst: sqlite3.Connection, table: str, cols: list[str], rows: list[Any]) -> None:
    if rows:
        dst.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)


def _readable_rows(src: sqlite3.Connection, table: str, cols: list[str],
                   report: RepairReport) -> Iterator[tuple[Any, ...]]:
    """Every row of rowid table ``table`` that can be read, in rowid order.

    A damaged leaf page makes every seek into its key range fail; seeks past its
    last key succeed (the parent's divider key). So after a failure, find by
    doubling then bisection the first start point that reads again, and go on
    from there: the rows of the damaged page are lost, no other."""
    select = f"SELECT rowid, {', '.join(cols)} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT 1"
    last = _MIN_ROWID
    while True:
        try:
            row = src.execute(select, (last,)).fetchone()
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise
            # Which row is it? Its key may still be readable (a damaged overflow page).
            rowid = _seek(src, table, last)
            if rowid is None or rowid is False:
                restart = _first_readable_start(src, table, last)
                if restart is None:
                    return
                report.skipped_ranges += 1
                last = restart
            else:
                report.skipped_ranges += 1
                last = rowid   # that one row is lost
            continue
        if row is None:
            return
        last = row[0]
        yield tuple(row[1:])


def _seek(src: sqlite3.Connection, table: str, after: int) -> int | None | bool:
    """The first rowid after ``after``; None at the end; False if that part cannot be read."""
    try:
        row = src.execute(f"SELECT rowid FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT 1", (after,)).fetchone()
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise
        return False
    return None if row is None else int(row[0])


def _first_readable_start(src: sqlite3.Connection, table: str, after: int) -> int | None:
    """The smallest x > ``after`` from which a seek reads again; None if none does."""
    step = 1
    while True:
        probe = min(after + step, _MAX_ROWID)
        if _seek(src, table, probe) is not False:
            break
        if probe == _MAX_ROWID:
            return None
        step *= 2
    low, high = after + step // 2 if step > 1 else after, probe   # low fails (or is `after`), high reads
    while high - low > 1:
        middle = (low + high) // 2
        if _seek(src, table, middle) is False:
            low = middle
        else:
            high = middle
    return high
