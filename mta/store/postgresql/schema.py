"""The PostgreSQL schema: every migration from an empty database to today's.

The same tables as the SQLite backend (mta/store/sqlite/schema.py) in PostgreSQL's
types, plus what several nodes need: a recipient being delivered carries the
claiming node's identity and the end of its lease (``lease_node``,
``lease_until``). The version is the highest row of ``schema_version``. Every
node migrates at open, inside one transaction holding an advisory lock, so two
nodes starting together neither race nor see a half-made schema.
"""

from __future__ import annotations

from typing import Any

from mta.errors import StoreError

# pg_advisory_xact_lock's key for migrations: any fixed number other code does not use
# ("mta\0schm" as 8 bytes).
MIGRATION_LOCK = 0x6D7461_00_7363686D

# Each entry migrates the schema from version i to i + 1. Never edit a released entry:
# append a new one, so every older database upgrades.
MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the queue with leases, and the lab mailboxes' copies.
    """
    CREATE TABLE messages (
        id           TEXT PRIMARY KEY,
        sender       TEXT NOT NULL,
        arrival      DOUBLE PRECISION NOT NULL,
        size         BIGINT NOT NULL,
        client       TEXT NOT NULL DEFAULT '',
        listener     TEXT NOT NULL DEFAULT '',
        helo         TEXT NOT NULL DEFAULT '',
        auth_user    TEXT,
        smtputf8     BOOLEAN NOT NULL DEFAULT false,
        body_8bit    BOOLEAN NOT NULL DEFAULT false,
        ret          TEXT,
        envid        TEXT,
        delay_warned BOOLEAN NOT NULL DEFAULT false
    );
    CREATE INDEX messages_arrival ON messages(arrival);
    -- Bodies apart: claiming, listing and counting never read a message's bytes.
    CREATE TABLE bodies (
        message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        data       BYTEA NOT NULL
    );
    CREATE TABLE recipients (
        message_id   TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        rcpt_no      INTEGER NOT NULL,
        address      TEXT NOT NULL,
        state        TEXT NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_attempt DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_error   TEXT,
        notify       TEXT,
        orcpt        TEXT,
        updated      DOUBLE PRECISION NOT NULL DEFAULT 0,
        lease_node   TEXT,                -- the node delivering it (state 'active')
        lease_until  DOUBLE PRECISION,    -- when that claim ends unless renewed
        PRIMARY KEY (message_id, rcpt_no)
    );
    -- "Which pending recipients are due?" (and "which leases have ended?", state 'active'),
    -- in claim order: a claim reads the first rows of one state, already sorted.
    CREATE INDEX recipients_due ON recipients(state, next_attempt, message_id, rcpt_no);
    CREATE INDEX recipients_lease ON recipients(lease_node) WHERE lease_node IS NOT NULL;
    CREATE TABLE history (
        no         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        time       DOUBLE PRECISION NOT NULL,
        recipient  TEXT,
        event      TEXT NOT NULL,
        detail     TEXT
    );
    CREATE INDEX history_message ON history(message_id, time);
    -- The lab mailboxes, in SQLite's shape (mailbox_messages); the id is never reused:
    -- it is part of the UIDL. inbox_id points at the lab inbox entry (a later migration).
    CREATE TABLE mailbox_messages (
        id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        mailbox  TEXT NOT NULL,
        queue_id TEXT NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        sender   TEXT NOT NULL,
        subject  TEXT NOT NULL DEFAULT '',
        size     BIGINT NOT NULL,
        data     BYTEA NOT NULL,
        inbox_id BIGINT
    );
    CREATE INDEX mailbox_messages_box ON mailbox_messages(mailbox, received, id, size, queue_id);
    CREATE INDEX mailbox_messages_received ON mailbox_messages(received);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(conn: Any) -> int:
    """Bring the database to SCHEMA_VERSION in one transaction; the version found before.

    StoreError if the database is newer than this mta."""
    async with conn.transaction():
        # Held to the end of the transaction: a second node waits here, then finds the work done.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                           " version INTEGER PRIMARY KEY, applied TIMESTAMPTZ NOT NULL DEFAULT now())")
        found = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
        if found > SCHEMA_VERSION:
            raise StoreError(f"database schema version {found} is newer than this mta ({SCHEMA_VERSION})")
        for version in range(found, SCHEMA_VERSION):
            await conn.execute(MIGRATIONS[version])
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version + 1)
    return found
