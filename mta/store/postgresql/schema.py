"""The PostgreSQL schema: every migration from an empty database to today's.

The same tables as the SQLite backend (mta/store/sqlite/schema.py) in PostgreSQL's
types, plus what several nodes need: a recipient being delivered carries the
claiming node's identity and the end of its lease (``lease_node``,
``lease_until``). The version is the highest row of ``schema_version``. Every
node migrates at open, inside one transaction holding an advisory lock, so two
nodes starting together neither race nor see a half-made schema.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mta.errors import StoreError
from mta.store.postgresql.entries import entry_for

log = logging.getLogger("mta.queue")

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
    # 1 -> 2: the lab inbox (issue 15; SQLite's version 6, mta/store/sqlite/schema.py, in
    # PostgreSQL's terms; mta/store/postgresql/entries.py and inbox.py). One entry per
    # accepted message that reached a lab mailbox; its copies point at it (inbox_id).
    # Triggers keep it whole on every path, in the transaction that does it: whatever
    # removes a message's last copy (POP3 DELE, pruning, `mta mailbox purge`) removes its
    # entry, removing an entry removes its copies, and every entry made or removed (or
    # read) is logged in inbox_changes. Then followed by BACKFILLS[2].
    #
    # Several nodes write at once (READ COMMITTED), where SQLite has one writer, so:
    # * Whoever deletes copies locks their entries (in row-number order, so two such
    #   transactions queue instead of deadlocking) before looking for remaining copies;
    #   its next statement's snapshot sees the other's committed deletions: two nodes
    #   deleting an entry's last two copies at once cannot both leave it behind.
    # * A new copy locks its entry (FOR KEY SHARE, entries.py): an entry being deleted is
    #   waited for, then made anew, never pointed at once gone.
    # * The change log's seq must never be skipped by a reader polling "seq > last"
    #   (mta/web/events.py): a sequence gives numbers in call order, but transactions
    #   commit in another, so a reader could see seq 8 committed while 7's transaction
    #   still runs, move on to 8, and never see 7. Writers therefore take an advisory
    #   lock SHARED (they never wait for each other) before they take a number, and
    #   hold it to their COMMIT; a reader takes it EXCLUSIVE for its read
    #   (postgresql/inbox.py): it waits until every transaction holding a number it could
    #   see has ended, and no new number is taken while it reads. So every number below
    #   the highest a reader sees is committed (or rolled back: a gap). Chosen over
    #   serializing the writers with an exclusive lock (every node's local deliveries
    #   would commit one at a time, WAL flushes not shared) and over reading only below
    #   the oldest running transaction id (any long transaction in the cluster, even in
    #   another database, would hold every node's events back for its whole length).
    #   The cost: a reader waits for the writers running when it polls (short, every
    #   0.15 s while an events client is connected), and writers starting meanwhile
    #   wait for its read (an index range scan).
    """
    CREATE TABLE inbox (
        no            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- what mailbox_messages.inbox_id holds
        id            TEXT NOT NULL UNIQUE,          -- the API's ID: the queue id (+ "-2" if reused)
        queue_id      TEXT NOT NULL,
        created       DOUBLE PRECISION NOT NULL,     -- the message's arrival in the queue
        size          BIGINT NOT NULL,               -- of the message as the API serves it
        read          BOOLEAN NOT NULL DEFAULT false,
        message_id    TEXT NOT NULL DEFAULT '',
        from_name     TEXT,
        from_address  TEXT,                          -- NULL: no From
        to_list       TEXT NOT NULL DEFAULT '[]',    -- JSON [[name, address], ...]
        cc_list       TEXT NOT NULL DEFAULT '[]',
        bcc_list      TEXT NOT NULL DEFAULT '[]',
        reply_to_list TEXT NOT NULL DEFAULT '[]',
        subject       TEXT NOT NULL DEFAULT '',
        date          DOUBLE PRECISION,              -- the Date field (POSIX time)
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
    -- A message's copies find their entry by (queue id, arrival), in one attempt or several
    -- (and two nodes making it at once meet here: INSERT ... ON CONFLICT DO NOTHING).
    CREATE UNIQUE INDEX inbox_message ON inbox(queue_id, created);
    -- The list, newest first (the row number breaks ties); the unread count.
    CREATE INDEX inbox_created ON inbox(created, no);
    CREATE INDEX inbox_unread ON inbox(no) WHERE NOT read;
    -- Free-word search text, apart so that list rows stay small.
    CREATE TABLE inbox_text (
        no   BIGINT PRIMARY KEY,                     -- inbox.no
        text TEXT NOT NULL
    );
    CREATE TABLE inbox_tags (
        no  BIGINT NOT NULL,                         -- inbox.no
        tag TEXT NOT NULL,
        PRIMARY KEY (no, tag)
    );
    CREATE INDEX inbox_tags_tag ON inbox_tags(tag);
    -- What the events socket follows, whichever node made the change.
    CREATE SEQUENCE inbox_changes_seq;
    CREATE TABLE inbox_changes (
        seq  BIGINT PRIMARY KEY DEFAULT nextval('inbox_changes_seq'),  -- never reused: a client's position
        kind TEXT NOT NULL,                          -- new, delete, read, unread
        id   TEXT NOT NULL,                          -- inbox.id
        time DOUBLE PRECISION NOT NULL
    );
    ALTER SEQUENCE inbox_changes_seq OWNED BY inbox_changes.seq;
    CREATE INDEX mailbox_messages_inbox ON mailbox_messages(inbox_id, mailbox);
    -- One mailbox's entries newest first (received = the entry's created), and their count.
    CREATE INDEX mailbox_messages_box_inbox ON mailbox_messages(mailbox, received, inbox_id);

    -- Log changes (kinds[i] of entry ids[i], in that order) under the change log's shared
    -- lock (see above; the key is CHANGES_LOCK), and keep the log small as SQLite does:
    -- the newest 10,000 changes, and of those only the last hour's (each change removes up
    -- to two older than that). Rows another transaction is removing are left to it.
    CREATE FUNCTION inbox_log(kinds TEXT[], ids TEXT[]) RETURNS void LANGUAGE plpgsql AS $$
    DECLARE
        newest DOUBLE PRECISION := extract(epoch FROM clock_timestamp());
        top BIGINT;
    BEGIN
        IF cardinality(ids) = 0 THEN
            RETURN;
        END IF;
        PERFORM pg_advisory_xact_lock_shared(7887035501728263783);
        INSERT INTO inbox_changes (kind, id, time)
            SELECT k, i, newest FROM unnest(kinds, ids) WITH ORDINALITY AS c(k, i, n) ORDER BY n;
        top := currval('inbox_changes_seq');
        DELETE FROM inbox_changes WHERE seq IN (
            SELECT seq FROM inbox_changes WHERE seq <= top - 10000 FOR UPDATE SKIP LOCKED);
        DELETE FROM inbox_changes WHERE seq IN (
            SELECT seq FROM inbox_changes WHERE time < newest - 3600
            AND seq IN (SELECT seq FROM inbox_changes ORDER BY seq LIMIT 2 * cardinality(ids))
            FOR UPDATE SKIP LOCKED);
    END $$;

    CREATE FUNCTION inbox_added() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM inbox_log(ARRAY(SELECT 'new' FROM added ORDER BY no), ARRAY(SELECT id FROM added ORDER BY no));
        RETURN NULL;
    END $$;
    CREATE TRIGGER inbox_added AFTER INSERT ON inbox REFERENCING NEW TABLE AS added
        FOR EACH STATEMENT EXECUTE FUNCTION inbox_added();

    CREATE FUNCTION inbox_read_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM inbox_log(
            ARRAY(SELECT CASE WHEN n.read THEN 'read' ELSE 'unread' END FROM new_rows n JOIN old_rows o USING (no)
                  WHERE n.read <> o.read ORDER BY n.no),
            ARRAY(SELECT n.id FROM new_rows n JOIN old_rows o USING (no) WHERE n.read <> o.read ORDER BY n.no));
        RETURN NULL;
    END $$;
    CREATE TRIGGER inbox_read_changed AFTER UPDATE ON inbox REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION inbox_read_changed();

    -- An entry removed (by the API, or with its last copy): its copies, text and tags go too.
    -- (Statement triggers fire for no rows too: returning at once ends the recursion
    -- between this trigger and the next.)
    CREATE FUNCTION inbox_removed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM removed) THEN
            RETURN NULL;
        END IF;
        DELETE FROM mailbox_messages WHERE inbox_id IN (SELECT no FROM removed);
        DELETE FROM inbox_text WHERE no IN (SELECT no FROM removed);
        DELETE FROM inbox_tags WHERE no IN (SELECT no FROM removed);
        PERFORM inbox_log(ARRAY(SELECT 'delete' FROM removed ORDER BY no),
                          ARRAY(SELECT id FROM removed ORDER BY no));
        RETURN NULL;
    END $$;
    CREATE TRIGGER inbox_removed AFTER DELETE ON inbox REFERENCING OLD TABLE AS removed
        FOR EACH STATEMENT EXECUTE FUNCTION inbox_removed();

    -- Copies removed (POP3 DELE, pruning, purge): an entry goes with its last copy.
    CREATE FUNCTION inbox_last_copy() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM gone WHERE inbox_id IS NOT NULL) THEN
            RETURN NULL;
        END IF;
        PERFORM 1 FROM inbox WHERE no IN (SELECT inbox_id FROM gone) ORDER BY no FOR UPDATE;
        DELETE FROM inbox e WHERE e.no IN (SELECT inbox_id FROM gone)
            AND NOT EXISTS (SELECT 1 FROM mailbox_messages m WHERE m.inbox_id = e.no);
        RETURN NULL;
    END $$;
    CREATE TRIGGER inbox_last_copy AFTER DELETE ON mailbox_messages REFERENCING OLD TABLE AS gone
        FOR EACH STATEMENT EXECUTE FUNCTION inbox_last_copy();
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# The change log's advisory lock (see migration 2): taken shared by every transaction that
# logs a change, exclusive by a reader of the log. "mta\0chng" as 8 bytes; written out in
# inbox_log() above, which a released migration cannot take from here.
CHANGES_LOCK = 0x6D7461_00_63686E67


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
            if version + 1 in BACKFILLS:
                await BACKFILLS[version + 1](conn)
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version + 1)
    return found


async def _backfill_inbox(conn: Any) -> None:
    """1 -> 2: an entry for every message already in the mailboxes (its copies grouped
    by queue id and arrival), summarized from one copy's bytes, as SQLite's 5 -> 6 does.
    Not logged as changes: nobody follows the log of a database being upgraded."""
    groups = await conn.fetch("SELECT queue_id, received, min(id) FROM mailbox_messages WHERE inbox_id IS NULL"
                              " GROUP BY queue_id, received ORDER BY received, min(id)")
    if groups:   # a few ms a message: say why a start with full mailboxes takes a while
        log.info("lab inbox: making entries for the %d messages already in the mailboxes", len(groups))
    for queue_id, received, first in groups:
        data = await conn.fetchval("SELECT data FROM mailbox_messages WHERE id = $1", first)
        no = await entry_for(conn, str(queue_id), float(received), bytes(data), None)
        await conn.execute("UPDATE mailbox_messages SET inbox_id = $1 WHERE queue_id = $2 AND received = $3"
                           " AND inbox_id IS NULL", no, queue_id, received)
    await conn.execute("DELETE FROM inbox_changes")


# Python steps run after a migration's SQL, in its transaction, keyed by the version reached.
BACKFILLS: dict[int, Callable[[Any], Awaitable[None]]] = {2: _backfill_inbox}
