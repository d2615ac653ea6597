"""What only the PostgreSQL inbox has: several nodes on one database, and a database made
by an older release (issue 16). The behaviour both backends share is in test_inbox_store.py.

Two engines (two pools) with their own PostgreSQLQueue, Mailboxes and PostgreSQLInbox
stand for two nodes. A copy stored through one is listed, read and deleted through the
other; the change log read through one holds the changes both made; and writers
committing out of the order they took their change numbers in never make a poller
that goes on from the last number it saw skip one (the change log's advisory lock,
schema.py migration 2)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install -e '.[test]')")

import asyncpg  # noqa: E402

from mta.errors import StoreError  # noqa: E402
from mta.inbox.model import InboxChange  # noqa: E402
from mta.inbox.raw import entry_raw  # noqa: E402
from mta.inbox.search import parse_query  # noqa: E402
from mta.mailbox.local import delivery_headers  # noqa: E402
from mta.store.postgresql.engine import PgEngine  # noqa: E402
from mta.store.postgresql.inbox import PostgreSQLInbox  # noqa: E402
from mta.store.postgresql.queue import _insert_copies  # noqa: E402
from mta.store.postgresql.schema import MIGRATIONS, SCHEMA_VERSION  # noqa: E402
from tests.support.backends import QueueBackend  # noqa: E402
from tests.support.inbox import SENDER, copy, deliver, message  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def nodes(postgres_dsn):
    """Two nodes, "node-a" and "node-b", on one fresh database."""
    a = await QueueBackend.postgresql(postgres_dsn, node="node-a")
    b = await QueueBackend.postgresql(postgres_dsn, node="node-b")
    yield a, b
    await a.close()
    await b.close()


async def store_copies(node: QueueBackend, queue_id: str, data: bytes, mailboxes: list[str],
                       arrival: float) -> None:
    """Local delivery's copies stored by ``node`` as record_outcomes stores them (its
    _insert_copies in a transaction of its own), without the queue's claim: several
    writers at once, each its own message."""
    copies = [copy(m, queue_id, data, arrival) for m in mailboxes]

    async def insert(conn: Any) -> None:
        await _insert_copies(conn, copies, time.time())

    await node.engine.run(insert)


# --------------------------------------------------------------------------- two nodes


async def test_a_copy_stored_on_one_node_is_listed_read_and_deleted_on_the_other(nodes):
    a, b = nodes
    data = message("from node a", attachment=True)
    await deliver(a, "Q0000000A001", data, ["alice@lab.test", "bob@lab.test"])
    page = await b.inbox.page()
    assert [(e.id, e.mailboxes, e.summary.subject, e.summary.attachments) for e in page.entries] == [
        ("Q0000000A001", ("alice@lab.test", "bob@lab.test"), "from node a", 1)]
    raw = await b.inbox.raw("Q0000000A001")
    assert raw is not None and entry_raw(raw) == f"Return-Path: <{SENDER}>\r\n".encode() + data
    assert await b.inbox.set_read(["Q0000000A001"], True) == 1
    assert (await a.inbox.entry("Q0000000A001")).read
    # POP3 on node b removes bob's copy; the entry stays with alice's, as node a sees it.
    [bob] = await b.mailboxes.messages("bob@lab.test")
    assert await b.mailboxes.delete("bob@lab.test", [bob.id]) == 1
    assert (await a.inbox.entry("Q0000000A001")).mailboxes == ("alice@lab.test",)
    # Deleted over node b's HTTP API: gone from node a's POP3 too.
    assert await b.inbox.delete(["Q0000000A001"]) == ["Q0000000A001"]
    assert await a.mailboxes.messages("alice@lab.test") == []
    assert (await a.inbox.page()).total == 0


async def test_changes_read_on_one_node_hold_both_nodes_changes(nodes):
    a, b = nodes
    await deliver(a, "Q0000000A002", message("a"), ["alice@lab.test"])
    await deliver(b, "Q0000000B002", message("b"), ["bob@lab.test"])
    await a.inbox.set_read(["Q0000000B002"], True)
    await b.inbox.delete(["Q0000000A002"])
    expected = [InboxChange(1, "new", "Q0000000A002"), InboxChange(2, "new", "Q0000000B002"),
                InboxChange(3, "read", "Q0000000B002"), InboxChange(4, "delete", "Q0000000A002")]
    assert await a.inbox.changes_since(0) == await b.inbox.changes_since(0) == expected
    assert await a.inbox.last_change() == await b.inbox.last_change() == 4
    assert await b.inbox.changes_since(2) == expected[2:]


async def test_both_nodes_deleting_the_last_two_copies_at_once_leave_no_entry(nodes):
    a, b = nodes
    for n in range(20):
        await deliver(a, f"Q0000000C{n:03d}", message(f"m{n}"), ["alice@lab.test", "bob@lab.test"])
    alice = [m.id for m in await a.mailboxes.messages("alice@lab.test")]
    bob = [m.id for m in await b.mailboxes.messages("bob@lab.test")]
    # Each node removes one copy of every message at the same time, a copy at a time.
    await asyncio.gather(*(a.mailboxes.delete("alice@lab.test", [i]) for i in alice),
                         *(b.mailboxes.delete("bob@lab.test", [i]) for i in bob))
    assert await a.query("SELECT count(*) FROM inbox") == [(0,)]
    assert await a.query("SELECT count(*) FROM mailbox_messages") == [(0,)]
    assert sorted(c.id for c in await a.inbox.changes_since(20)) == [f"Q0000000C{n:03d}" for n in range(20)]


async def test_two_nodes_storing_the_first_copies_of_one_message_at_once_make_one_entry(nodes):
    a, b = nodes
    data, arrival = message("both at once"), time.time()
    await asyncio.gather(store_copies(a, "Q0000000D001", data, ["alice@lab.test"], arrival),
                         store_copies(b, "Q0000000D001", data, ["bob@lab.test"], arrival))
    [entry] = (await a.inbox.page()).entries
    assert (entry.id, entry.mailboxes) == ("Q0000000D001", ("alice@lab.test", "bob@lab.test"))
    assert [c.kind for c in await b.inbox.changes_since(0)] == ["new"]


async def test_concurrent_writers_never_make_a_poller_skip_a_change(nodes, postgres_dsn):
    """Writers on both nodes take change numbers and commit in another order (each
    holds its transaction open a random while after logging its change); a poller on a
    third engine goes on from the last seq it saw, as the events socket does. It must
    see every change that was committed, each once, in seq order."""
    a, b = nodes
    for n in range(10):
        await deliver(a, f"Q0000000E{n:03d}", message(f"m{n}"), ["alice@lab.test"])
    start = await a.inbox.last_change()
    rng = random.Random(16)

    async def toggle(node: QueueBackend, entry_id: str, read: bool, hold: float) -> None:
        async def op(conn: Any) -> None:
            await conn.execute("UPDATE inbox SET read = $1 WHERE id = $2", read, entry_id)
            await conn.execute("SELECT pg_sleep($1)", hold)   # committed later than later numbers

        await node.engine.run(op)

    async def write(node: QueueBackend, entry_ids: list[str]) -> None:
        for round_ in range(8):
            for entry_id in entry_ids:
                await toggle(node, entry_id, round_ % 2 == 0, rng.choice((0.0, 0.0, 0.01, 0.05)))

    reader = PgEngine(postgres_dsn)
    await reader.open()
    seen: list[InboxChange] = []
    writing = True

    async def poll() -> None:
        inbox, last = PostgreSQLInbox(reader), start
        while True:
            finished = not writing   # then this look finds everything: one more, until it is empty
            changes = await inbox.changes_since(last)
            if changes:
                seen.extend(changes)
                last = changes[-1].seq
            elif finished:
                return
            await asyncio.sleep(0.002)

    try:
        poller = asyncio.create_task(poll())
        ids = [f"Q0000000E{n:03d}" for n in range(10)]
        await asyncio.gather(*(write(node, ids[i::4]) for i, node in enumerate((a, b, a, b))))
        writing = False
        await asyncio.wait_for(poller, 30)
    finally:
        await reader.close()
    logged = [InboxChange(int(s), str(k), str(i)) for s, k, i in
              await a.query(f"SELECT seq, kind, id FROM inbox_changes WHERE seq > {start} ORDER BY seq")]
    assert len(logged) == 8 * 10
    assert seen == logged


# --------------------------------------------------------------------------- schema versions


async def test_a_version_1_database_is_upgraded_with_entries_for_its_copies(postgres_dsn):
    """A database of the first PostgreSQL release (queue and mailboxes, no inbox), with
    queued mail and mailbox copies in it, opened by this release."""
    one, two = message("one", attachment=True), message("two", from_="Other <o@x.test>")
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                           " applied TIMESTAMPTZ NOT NULL DEFAULT now())")
        for version, script in enumerate(MIGRATIONS[:1], start=1):
            await conn.execute(script)
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
        await conn.execute("INSERT INTO messages (id, sender, arrival, size) VALUES ('QQUEUED00001', $1, 500.0, 3)",
                           SENDER)
        await conn.execute("INSERT INTO bodies (message_id, data) VALUES ('QQUEUED00001', 'abc')")
        await conn.execute("INSERT INTO recipients (message_id, rcpt_no, address, state, next_attempt)"
                           " VALUES ('QQUEUED00001', 0, 'x@example.org', 'deferred', 600.0)")
        rows = [("alice@lab.test", "QOLD00000001", 1000.0, one), ("bob@lab.test", "QOLD00000001", 1000.0, one),
                ("alice@lab.test", "QOLD00000002", 2000.0, two)]
        for mailbox, queue_id, received, data in rows:
            copy_data = delivery_headers(SENDER, mailbox, None) + data
            await conn.execute(
                "INSERT INTO mailbox_messages (mailbox, queue_id, received, sender, subject, size, data)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7)", mailbox, queue_id, received, SENDER, "", len(copy_data), copy_data)
    finally:
        await conn.close()
    node = await QueueBackend.postgresql(postgres_dsn)
    try:
        assert node.engine.schema_found == 1
        assert await node.query("SELECT version FROM schema_version ORDER BY version") == [
            (v,) for v in range(1, SCHEMA_VERSION + 1)]
        # The queue is intact ...
        assert await node.recipients() == {"QQUEUED00001": [("x@example.org", "deferred", 0)]}
        assert await node.queue.message_data("QQUEUED00001") == b"abc"
        assert await node.queue.next_due_time() == 600.0
        # ... and the copies already there have their entries.
        page = await node.inbox.page()
        assert [(e.id, e.created, e.mailboxes, e.summary.subject, e.summary.attachments) for e in page.entries] == [
            ("QOLD00000002", 2000.0, ("alice@lab.test",), "two", 0),
            ("QOLD00000001", 1000.0, ("alice@lab.test", "bob@lab.test"), "one", 1)]
        assert page.entries[1].size == len(f"Return-Path: <{SENDER}>\r\n") + len(one)
        assert [e.id for e in (await node.inbox.page(parse_query("from:other"))).entries] == ["QOLD00000002"]
        assert await node.inbox.changes_since(0) == []   # the back-fill is not news
        # And the upgraded database behaves: POP3 deletes bob's copy, then alice's go.
        [bob] = await node.mailboxes.messages("bob@lab.test")
        await node.mailboxes.delete("bob@lab.test", [bob.id])
        assert (await node.inbox.page()).total == 2
        await node.mailboxes.purge("alice@lab.test")
        assert (await node.inbox.page()).total == 0
        assert [c.kind for c in await node.inbox.changes_since(0)] == ["delete", "delete"]
    finally:
        await node.close()
    again = await QueueBackend.postgresql(postgres_dsn)   # opening it again changes nothing
    try:
        assert again.engine.schema_found == SCHEMA_VERSION
    finally:
        await again.close()


async def test_a_database_newer_than_this_mta_is_refused_in_one_line(postgres_dsn):
    node = await QueueBackend.postgresql(postgres_dsn)
    await node.execute(f"INSERT INTO schema_version (version) VALUES ({SCHEMA_VERSION + 1})")
    await node.close()
    engine = PgEngine(postgres_dsn)
    with pytest.raises(StoreError) as refused:
        await engine.open()
    assert str(refused.value) == (f"database schema version {SCHEMA_VERSION + 1} is newer than this mta"
                                  f" ({SCHEMA_VERSION})")
