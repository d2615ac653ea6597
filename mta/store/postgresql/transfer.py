"""A PostgreSQL database as `mta queue export` reads it and `mta queue import` writes it
(mta/store/transfer.py has the records and the file).

Import runs beside the nodes: each batch is one transaction, and one that stored new
mail sends the new-mail NOTIFY (queue.py), so every node's queue manager looks at the
queue as soon as it commits. Export copies the database and leaves it as it is, so it
is refused while a node is connected (its node-name and LISTEN connections are in
pg_stat_activity) or a lease has not ended: a running node accepts mail the dump would miss, and delivers
mail the dump holds, which the target would then deliver again. Stop every node
first; a recipient whose node died is exported as due again once its lease has ended.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

from mta.store.api import HistoryEntry, mailbox_key, new_queue_id
from mta.store.postgresql.engine import PgEngine
from mta.store.postgresql.entries import entry_for
from mta.store.postgresql.queue import _tell_other_nodes
from mta.store.transfer import (
    BATCH_MESSAGES,
    Added,
    CopyRecord,
    MessageRecord,
    RecipientRecord,
    TransferError,
    due_again,
    in_pages,
    within_batch_bytes,
)

# The NOTIFY payload of an import (queue.py's listeners wake for any payload but their own node's).
IMPORT_PAYLOAD = "mta queue import"

# The application_name of a node's connections: the one holding its name (node.py: "mta node
# <name>") and its delivery process's LISTEN (PgEngine.listen). Either means a node runs.
NODE_NAME_CONNECTION = "mta node "
NODE_CONNECTION = "mta listen"


class PostgreSQLTransfer:
    """mta.store.transfer.TransferStore on one PostgreSQL database."""

    name = "postgresql"

    def __init__(self, dsn: str):
        self.engine = PgEngine(dsn, max_connections=2)

    async def open(self) -> None:
        await self.engine.open()

    async def close(self) -> None:
        await self.engine.close()

    async def check_quiet(self) -> None:
        async def look(conn: Any) -> tuple[list[str], list[tuple[str, float]]]:
            # A node's main process holds its name on a connection of its own (node.py), its
            # delivery process listens for new mail on another (PgEngine.listen).
            apps = await conn.fetch(
                "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
                " AND (application_name LIKE $1 OR application_name = $2) AND pid <> pg_backend_pid()",
                NODE_NAME_CONNECTION + "%", NODE_CONNECTION)
            leases = await conn.fetch(
                "SELECT lease_node, max(lease_until) FROM recipients WHERE state = 'active' AND lease_until > $1"
                " GROUP BY lease_node ORDER BY lease_node", time.time())
            return [str(a[0]) for a in apps], [(str(n), float(u)) for n, u in leases]

        apps, leases = await self.engine.run(look)
        names = sorted({a[len(NODE_NAME_CONNECTION):] for a in apps if a.startswith(NODE_NAME_CONNECTION)})
        why = "stop every node first (mail arriving or being delivered during the export would be missed or" \
              " delivered twice)"
        if names:
            raise TransferError(f"node{_s(len(names))} {', '.join(names)} {'is' if len(names) == 1 else 'are'}"
                                f" running on this database: {why}")
        if apps:
            raise TransferError(f"{len(apps)} mta node{_s(len(apps))} {'is' if len(apps) == 1 else 'are'}"
                                f" connected to this database: {why}")
        if leases:
            until = max(u for _, u in leases)
            raise TransferError(
                f"recipients are being delivered by node {', '.join(n for n, _ in leases)} (leases until"
                f" {time.strftime('%H:%M:%S', time.localtime(until))}): stop every node first, or wait until"
                " those leases end")

    # ----------------------------------------------------------------- export

    async def max_copy_id(self) -> int:
        async def read(conn: Any) -> int:
            return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM mailbox_messages"))

        return await self.engine.run(read)

    def messages(self) -> AsyncIterator[list[MessageRecord]]:
        return in_pages(lambda after: self.engine.run(partial(_read_messages, after=after)), "")

    def copies(self) -> AsyncIterator[list[CopyRecord]]:
        return in_pages(lambda after: self.engine.run(partial(_read_copies, after=after)), 0)

    # ----------------------------------------------------------------- import

    async def reserve_copy_ids(self, up_to: int) -> None:
        """Move the id sequence past ``up_to`` (never back): from now on no node's new copy
        takes an id of the file. (A node that drew an id just before is seen by the
        import's ON CONFLICT: that copy of the file then gets a new id.)"""

        async def reserve(conn: Any) -> None:
            await conn.execute(
                "SELECT setval(s, greatest($1::bigint, coalesce(pg_sequence_last_value(s), 1)))"
                " FROM CAST(pg_get_serial_sequence('mailbox_messages', 'id') AS regclass) AS s", up_to)

        if up_to > 0:
            await self.engine.run(reserve)

    async def add_messages(self, records: Sequence[MessageRecord]) -> Added:
        return await self.engine.run(lambda conn: _add_messages(conn, records))

    async def add_copies(self, records: Sequence[tuple[CopyRecord, int]]) -> Added:
        return await self.engine.run(lambda conn: _add_copies(conn, records))


def _s(n: int) -> str:
    return "" if n == 1 else "s"


async def _read_messages(conn: Any, after: str) -> list[MessageRecord]:
    """The next batch of messages after queue id ``after``, whole, in one transaction.
    (COLLATE "C": queue ids sort by their bytes, as SQLite sorts them.)"""
    rows = await conn.fetch(
        "SELECT id, sender, arrival, client, listener, helo, auth_user, smtputf8, body_8bit, ret, envid,"
        ' delay_warned, size FROM messages WHERE id > $1 COLLATE "C" ORDER BY id COLLATE "C" LIMIT $2',
        after, BATCH_MESSAGES)
    kept = within_batch_bytes(rows, lambda row: int(row["size"]))
    if not kept:
        return []
    ids = [str(r["id"]) for r in kept]
    recipients: dict[str, list[RecipientRecord]] = {i: [] for i in ids}
    for r in await conn.fetch(
            "SELECT message_id, address, state, attempts, next_attempt, last_error, notify, orcpt, updated"
            " FROM recipients WHERE message_id = ANY($1) ORDER BY message_id, rcpt_no", ids):
        recipients[r[0]].append(RecipientRecord(str(r[1]), due_again(str(r[2]), int(r[3])), int(r[3]), float(r[4]),
                                                r[5], r[6], r[7], float(r[8])))
    history: dict[str, list[HistoryEntry]] = {i: [] for i in ids}
    for h in await conn.fetch("SELECT message_id, time, recipient, event, detail FROM history"
                              " WHERE message_id = ANY($1) ORDER BY message_id, time, no", ids):
        history[h[0]].append(HistoryEntry(float(h[1]), h[2], str(h[3]), h[4]))
    bodies = {str(b[0]): bytes(b[1]) for b in await conn.fetch(
        "SELECT message_id, data FROM bodies WHERE message_id = ANY($1)", ids)}
    return [MessageRecord(
        id=str(m["id"]), sender=str(m["sender"]), arrival=float(m["arrival"]),
        recipients=tuple(recipients[m["id"]]), data=bodies.get(m["id"], b""), client=str(m["client"]),
        listener=str(m["listener"]), helo=str(m["helo"]), auth_user=m["auth_user"], smtputf8=bool(m["smtputf8"]),
        body_8bit=bool(m["body_8bit"]), ret=m["ret"], envid=m["envid"], delay_warned=bool(m["delay_warned"]),
        history=tuple(history[m["id"]])) for m in kept]


async def _read_copies(conn: Any, after: int) -> list[CopyRecord]:
    rows = await conn.fetch(
        "SELECT id, mailbox, queue_id, received, sender, subject, size FROM mailbox_messages"
        " WHERE id > $1 ORDER BY id LIMIT $2", after, BATCH_MESSAGES)
    kept = within_batch_bytes(rows, lambda row: int(row["size"]))
    if not kept:
        return []
    ids = [int(r["id"]) for r in kept]
    data = {int(r[0]): bytes(r[1]) for r in await conn.fetch(
        "SELECT id, data FROM mailbox_messages WHERE id = ANY($1::bigint[])", ids)}
    marks = await _read_marks(conn, ids)
    return [CopyRecord(mailbox=str(r["mailbox"]), id=int(r["id"]), queue_id=str(r["queue_id"]),
                       received=float(r["received"]), sender=str(r["sender"]), subject=str(r["subject"]),
                       data=data[int(r["id"])], read=marks.get(int(r["id"]), (False, ()))[0],
                       tags=marks.get(int(r["id"]), (False, ()))[1]) for r in kept]


async def _read_marks(conn: Any, ids: list[int]) -> dict[int, tuple[bool, tuple[str, ...]]]:
    """The read flag and tags of the inbox entries of these copies (tags in byte order, as
    SQLite sorts them)."""
    rows = await conn.fetch(
        "SELECT m.id, e.read, ARRAY(SELECT t.tag FROM inbox_tags t WHERE t.no = e.no ORDER BY t.tag COLLATE \"C\")"
        " FROM mailbox_messages m JOIN inbox e ON e.no = m.inbox_id WHERE m.id = ANY($1::bigint[])", ids)
    return {int(r[0]): (bool(r[1]), tuple(str(t) for t in r[2])) for r in rows}


async def _add_messages(conn: Any, records: Sequence[MessageRecord]) -> Added:
    """The batch in one transaction, a statement per table (asyncpg pipelines each
    executemany: a few round trips per batch, not per message)."""
    recipients = skipped = 0
    renamed: list[tuple[str, str]] = []
    found = {str(r[0]): float(r[1]) for r in await conn.fetch(
        "SELECT id, arrival FROM messages WHERE id = ANY($1)", [m.id for m in records])}
    chosen: list[tuple[str, MessageRecord]] = []
    for m in records:
        queue_id = m.id
        if queue_id in found:
            if found[queue_id] == m.arrival:
                skipped += 1   # imported before (a second run after an interruption)
                continue
            # Another message has this id: the mail must not be lost, so it gets an id of its own.
            queue_id = await _free_id(conn, found)
            renamed.append((m.id, queue_id))
        found[queue_id] = m.arrival
        chosen.append((queue_id, m))
        recipients += len(m.recipients)
    if not chosen:
        return Added(0, 0, skipped)
    await conn.executemany(
        "INSERT INTO messages (id, sender, arrival, size, client, listener, helo, auth_user, smtputf8, body_8bit,"
        " ret, envid, delay_warned) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)",
        [(i, m.sender, m.arrival, len(m.data), m.client, m.listener, m.helo, m.auth_user, m.smtputf8, m.body_8bit,
          m.ret, m.envid, m.delay_warned) for i, m in chosen])
    await conn.executemany("INSERT INTO bodies (message_id, data) VALUES ($1, $2)", [(i, m.data) for i, m in chosen])
    await conn.executemany(
        "INSERT INTO recipients (message_id, rcpt_no, address, state, attempts, next_attempt, last_error, notify,"
        " orcpt, updated) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
        [(i, n, r.address, due_again(r.state, r.attempts), r.attempts, r.next_attempt, r.last_error, r.notify,
          r.orcpt, r.updated) for i, m in chosen for n, r in enumerate(m.recipients)])
    history = [(i, h.time, h.recipient, h.event, h.detail) for i, m in chosen for h in m.history]
    if history:   # in the file's order: the identity column keeps it
        await conn.executemany(
            "INSERT INTO history (message_id, time, recipient, event, detail) VALUES ($1,$2,$3,$4,$5)", history)
    # Sent at COMMIT: every node's queue manager looks at the queue at once.
    await _tell_other_nodes(conn, IMPORT_PAYLOAD)
    return Added(len(chosen), recipients, skipped, tuple(renamed))


async def _free_id(conn: Any, taken: dict[str, float]) -> str:
    while True:
        queue_id = new_queue_id()
        if queue_id not in taken and await conn.fetchval("SELECT 1 FROM messages WHERE id = $1", queue_id) is None:
            return queue_id


async def _add_copies(conn: Any, records: Sequence[tuple[CopyRecord, int]]) -> Added:
    """Each copy not yet here, keeping its id where it is free (its POP3 UIDL stays what
    clients know; one whose id is taken gets a new one above every id of the file:
    reserve_copy_ids), without pruning: an import removes no mail."""
    added = skipped = 0
    keys = [(mailbox_key(c.mailbox), c.queue_id, c.received) for c, _ in records]
    wanted = sorted(set(keys))
    present = {(str(r[0]), str(r[1]), float(r[2])): int(r[3]) for r in await conn.fetch(
        "SELECT m.mailbox, m.queue_id, m.received, count(*) FROM mailbox_messages m"
        " JOIN unnest($1::text[], $2::text[], $3::float8[]) AS k(mailbox, queue_id, received)"
        " ON m.mailbox = k.mailbox AND m.queue_id = k.queue_id AND m.received = k.received"
        " GROUP BY 1, 2, 3", [k[0] for k in wanted], [k[1] for k in wanted], [k[2] for k in wanted])}
    for (c, nth), key in zip(records, keys, strict=True):
        mailbox = key[0]
        if present.get(key, 0) >= nth:
            skipped += 1
            continue
        present[key] = present.get(key, 0) + 1
        # The message's entry, made with its first copy as local delivery makes it (entries.py).
        no = await entry_for(conn, c.queue_id, c.received, c.data, None)
        row = (mailbox, c.queue_id, c.received, c.sender, c.subject, len(c.data), c.data, no)
        kept = await conn.fetchval(
            "INSERT INTO mailbox_messages (id, mailbox, queue_id, received, sender, subject, size, data, inbox_id)"
            " OVERRIDING SYSTEM VALUE VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) ON CONFLICT (id) DO NOTHING RETURNING id",
            c.id, *row)
        if kept is None:   # the id is another copy's here: a new one
            await conn.execute(
                "INSERT INTO mailbox_messages (mailbox, queue_id, received, sender, subject, size, data, inbox_id)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8)", *row)
        if c.read:
            await conn.execute("UPDATE inbox SET read = true WHERE no = $1 AND NOT read", no)
        if c.tags:
            await conn.execute("INSERT INTO inbox_tags (no, tag) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
                               no, list(c.tags))
        added += 1
    return Added(added, 0, skipped)

