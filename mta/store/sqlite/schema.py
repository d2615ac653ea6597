"""The queue file's schema: every migration from an empty file to today's.

One SQLite file holds the queue (messages, bodies, recipients, history) and
the lab mailboxes (mailbox_messages) with their inbox entries (inbox, since
version 6), so that a local delivery and its recipient's 'delivered' state
are one commit. A migration may have a Python step after its SQL (BACKFILLS). The version is PRAGMA
user_version; the engine (engine.py) migrates a file at open, and
`mta queue repair` builds its new file with :func:`create_schema`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from mta.store.sqlite.entries import entry_for

log = logging.getLogger("mta.queue")

# Each entry migrates the schema from version i to i + 1 (PRAGMA user_version).
# Never edit a released entry: append a new one, so every old queue file upgrades.
MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the first release.
    """
    CREATE TABLE messages (
        id        TEXT PRIMARY KEY,
        sender    TEXT NOT NULL,
        arrival   REAL NOT NULL,
        size      INTEGER NOT NULL,
        client    TEXT NOT NULL DEFAULT '',
        listener  TEXT NOT NULL DEFAULT '',
        helo      TEXT NOT NULL DEFAULT '',
        auth_user TEXT,
        smtputf8  INTEGER NOT NULL DEFAULT 0,
        body_8bit INTEGER NOT NULL DEFAULT 0,
        ret       TEXT,
        envid     TEXT,
        data      BLOB NOT NULL              -- moved to `bodies` in version 4
    );
    CREATE INDEX messages_arrival ON messages(arrival);
    CREATE TABLE recipients (
        message_id   TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        rcpt_no      INTEGER NOT NULL,
        address      TEXT NOT NULL,
        state        TEXT NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL DEFAULT 0,
        last_error   TEXT,
        notify       TEXT,
        orcpt        TEXT,
        updated      REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (message_id, rcpt_no)
    ) WITHOUT ROWID;
    -- The queue manager's question is "which pending recipients are due?":
    -- this index answers it without scanning delivered or deferred rows.
    CREATE INDEX recipients_due ON recipients(state, next_attempt);
    """,
    # 1 -> 2: per-message history for `mta queue show` (delivery attempts, holds, bounces).
    """
    CREATE TABLE history (
        message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        time       REAL NOT NULL,
        recipient  TEXT,
        event      TEXT NOT NULL,            -- queued, sent, deferred, bounced, held, released, ...
        detail     TEXT
    );
    CREATE INDEX history_message ON history(message_id, time);
    """,
    # 2 -> 3: one delay warning per message at most (RFC 3464 Action: delayed).
    """
    ALTER TABLE messages ADD COLUMN delay_warned INTEGER NOT NULL DEFAULT 0;
    """,
    # 3 -> 4: message bodies in a table of their own. Envelope rows stay small,
    # so listing, claiming and counting never read a message's bytes.
    """
    CREATE TABLE bodies (
        message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        data       BLOB NOT NULL
    );
    INSERT INTO bodies (message_id, data) SELECT id, data FROM messages;
    ALTER TABLE messages DROP COLUMN data;
    """,
    # 4 -> 5: mailboxes for local_domains (mta/store/sqlite/mailboxes.py).
    """
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
    """,
    # 5 -> 6: the lab inbox (issue 15; mta/store/sqlite/entries.py and inbox.py). One
    # entry per accepted message that reached a lab mailbox; its copies point at it.
    # Triggers keep it whole on every path: whatever removes a message's last copy
    # (POP3 DELE, pruning, `mta mailbox purge`) removes its entry, removing an entry
    # removes its copies, and every entry made or removed (or read) is logged in
    # inbox_changes, all in the commit that did it. Then followed by BACKFILLS[6].
    """
    CREATE TABLE inbox (
        no            INTEGER PRIMARY KEY,          -- what mailbox_messages.inbox_id holds
        id            TEXT NOT NULL UNIQUE,         -- the API's ID: the queue id (+ "-2" if reused)
        queue_id      TEXT NOT NULL,
        created       REAL NOT NULL,                -- the message's arrival in the queue
        size          INTEGER NOT NULL,             -- of the message as the API serves it
        read          INTEGER NOT NULL DEFAULT 0,
        message_id    TEXT NOT NULL DEFAULT '',
        from_name     TEXT,
        from_address  TEXT,                         -- NULL: no From
        to_list       TEXT NOT NULL DEFAULT '[]',   -- JSON [[name, address], ...]
        cc_list       TEXT NOT NULL DEFAULT '[]',
        bcc_list      TEXT NOT NULL DEFAULT '[]',
        reply_to_list TEXT NOT NULL DEFAULT '[]',
        subject       TEXT NOT NULL DEFAULT '',
        date          REAL,                         -- the Date field (POSIX time)
        attachments   INTEGER NOT NULL DEFAULT 0,
        snippet       TEXT NOT NULL DEFAULT '',
        -- What field searches match: lower case, cleaned as Mailpit cleans search text.
        find_from     TEXT NOT NULL DEFAULT '',
        find_to       TEXT NOT NULL DEFAULT '',
        find_cc       TEXT NOT NULL DEFAULT '',
        find_bcc      TEXT NOT NULL DEFAULT '',
        find_reply_to TEXT NOT NULL DEFAULT '',
        find_subject  TEXT NOT NULL DEFAULT '',
        find_message_id TEXT NOT NULL DEFAULT ''
    );
    -- A message's copies find their entry by (queue id, arrival), in one attempt or several.
    CREATE UNIQUE INDEX inbox_message ON inbox(queue_id, created);
    -- The list, newest first (the row number breaks ties), and the unread count.
    CREATE INDEX inbox_created ON inbox(created);
    CREATE INDEX inbox_read ON inbox(read);
    -- Free-word search text, apart so that list rows stay small.
    CREATE TABLE inbox_text (
        no   INTEGER PRIMARY KEY,                   -- inbox.no
        text TEXT NOT NULL
    );
    CREATE TABLE inbox_tags (
        no  INTEGER NOT NULL,                       -- inbox.no
        tag TEXT NOT NULL,
        PRIMARY KEY (no, tag)
    ) WITHOUT ROWID;
    CREATE INDEX inbox_tags_tag ON inbox_tags(tag);
    -- What the events socket follows, whichever process made the change.
    CREATE TABLE inbox_changes (
        seq  INTEGER PRIMARY KEY AUTOINCREMENT,     -- never reused: a client's position
        kind TEXT NOT NULL,                         -- new, delete, read, unread
        id   TEXT NOT NULL,                         -- inbox.id
        time REAL NOT NULL
    );
    ALTER TABLE mailbox_messages ADD COLUMN inbox_id INTEGER;   -- inbox.no
    CREATE INDEX mailbox_messages_inbox ON mailbox_messages(inbox_id, mailbox);
    -- One mailbox's entries newest first (received = the entry's created), and their count.
    CREATE INDEX mailbox_messages_box_inbox ON mailbox_messages(mailbox, received, inbox_id);
    CREATE TRIGGER inbox_last_copy AFTER DELETE ON mailbox_messages
    WHEN OLD.inbox_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM mailbox_messages WHERE inbox_id = OLD.inbox_id)
    BEGIN
        DELETE FROM inbox WHERE no = OLD.inbox_id;
    END;
    CREATE TRIGGER inbox_removed AFTER DELETE ON inbox
    BEGIN
        DELETE FROM mailbox_messages WHERE inbox_id = OLD.no;
        DELETE FROM inbox_text WHERE no = OLD.no;
        DELETE FROM inbox_tags WHERE no = OLD.no;
        INSERT INTO inbox_changes (kind, id, time)
        VALUES ('delete', OLD.id, (julianday('now') - 2440587.5) * 86400.0);
    END;
    CREATE TRIGGER inbox_added AFTER INSERT ON inbox
    BEGIN
        INSERT INTO inbox_changes (kind, id, time) VALUES ('new', NEW.id, (julianday('now') - 2440587.5) * 86400.0);
    END;
    CREATE TRIGGER inbox_read_changed AFTER UPDATE OF read ON inbox WHEN NEW.read != OLD.read
    BEGIN
        INSERT INTO inbox_changes (kind, id, time)
        VALUES (CASE WHEN NEW.read THEN 'read' ELSE 'unread' END, NEW.id, (julianday('now') - 2440587.5) * 86400.0);
    END;
    -- The log stays small: the newest 10,000 changes, and of those only the last hour's
    -- (each change removes up to two older than that).
    CREATE TRIGGER inbox_changes_bounded AFTER INSERT ON inbox_changes
    BEGIN
        DELETE FROM inbox_changes WHERE seq <= NEW.seq - 10000;
        DELETE FROM inbox_changes WHERE seq IN (SELECT seq FROM inbox_changes ORDER BY seq LIMIT 2)
            AND time < NEW.time - 3600;
    END;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def _backfill_inbox(conn: sqlite3.Connection) -> None:
    """5 -> 6: an entry for every message already in the mailboxes (its copies grouped
    by queue id and arrival), summarized from one copy's bytes. Not logged as changes:
    nobody follows the log of a file that is being upgraded."""
    groups = conn.execute("SELECT queue_id, received, min(id) FROM mailbox_messages WHERE inbox_id IS NULL"
                          " GROUP BY queue_id, received ORDER BY received, min(id)").fetchall()
    if groups:   # a few ms a message: say why a start with full mailboxes takes a while
        log.info("lab inbox: making entries for the %d messages already in the mailboxes", len(groups))
    for queue_id, received, first in groups:
        data = conn.execute("SELECT data FROM mailbox_messages WHERE id = ?", (first,)).fetchone()[0]
        no = entry_for(conn, str(queue_id), float(received), bytes(data), None)
        conn.execute("UPDATE mailbox_messages SET inbox_id = ? WHERE queue_id = ? AND received = ?",
                     (no, queue_id, received))
    conn.execute("DELETE FROM inbox_changes")


# Python steps run after a migration's SQL, in its transaction, keyed by the version reached.
BACKFILLS: dict[int, Callable[[sqlite3.Connection], None]] = {6: _backfill_inbox}


def create_schema(conn: sqlite3.Connection) -> None:
    """The current schema in an empty database, inside the caller's transaction
    (`mta queue repair` builds its new file with it)."""
    for target in range(1, SCHEMA_VERSION + 1):
        migrate_to(target, conn)


def migrate_to(target: int, conn: sqlite3.Connection) -> None:
    """Apply migration ``target - 1 -> target`` inside the caller's transaction."""
    for statement in statements(MIGRATIONS[target - 1]):
        conn.execute(statement)
    if target in BACKFILLS:
        BACKFILLS[target](conn)
    conn.execute(f"PRAGMA user_version = {target}")


def statements(script: str) -> list[str]:
    """The statements of a migration script, comments dropped. A statement ends at a
    ';' that completes it (sqlite3.complete_statement), so a trigger's body stays whole."""
    found, current = [], ""
    for line in script.splitlines():
        current += line.split("--", 1)[0] + "\n"
        if sqlite3.complete_statement(current):
            for part in _split_complete(current):
                found.append(part)
            current = ""
    if current.strip():
        found.append(current.strip().rstrip(";").strip())
    return found


def _split_complete(text: str) -> list[str]:
    """Complete statements of ``text`` (one line may end several: "a; b;")."""
    parts, current = [], ""
    for piece in text.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n;"):
                parts.append(current.strip().rstrip(";").strip())
            current = ""
    return parts


def schema_version(path: str) -> int | None:
    """The schema version of the file at ``path``, read only; None if it cannot be read."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError:
        return None
    finally:
        db.close()
