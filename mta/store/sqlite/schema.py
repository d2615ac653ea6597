"""The queue file's schema: every migration from an empty file to today's.

One SQLite file holds the queue (messages, bodies, recipients, history) and
the lab mailboxes (mailbox_messages), so that a local delivery and its
recipient's 'delivered' state are one commit. The version is PRAGMA
user_version; the engine (engine.py) migrates a file at open, and
`mta queue repair` builds its new file with :func:`create_schema`.
"""

from __future__ import annotations

import sqlite3

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
)
SCHEMA_VERSION = len(MIGRATIONS)


def create_schema(conn: sqlite3.Connection) -> None:
    """The current schema in an empty database, inside the caller's transaction
    (`mta queue repair` builds its new file with it)."""
    for target in range(1, SCHEMA_VERSION + 1):
        migrate_to(target, conn)


def migrate_to(target: int, conn: sqlite3.Connection) -> None:
    """Apply migration ``target - 1 -> target`` inside the caller's transaction."""
    for statement in statements(MIGRATIONS[target - 1]):
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {target}")


def statements(script: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


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
