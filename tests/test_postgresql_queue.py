"""What only the PostgreSQL queue has: several nodes on one database (issue 16).

Two PostgreSQLQueue instances with different node identities stand for two nodes:
claims never overlap, a node that lost its lease cannot overwrite the outcome of the
node that took the recipient over, ended leases come back due and are delivered by the
survivor; the database going away gives StoreError (451 4.3.0 to clients) and the
engine reconnects by itself; the schema is migrated once, under a lock, and re-opening
changes nothing. The behaviour both backends share is in tests/test_store.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install -e '.[test]')")

from mta.errors import StoreError  # noqa: E402
from mta.model import NewMessage, RcptState  # noqa: E402
from mta.store.api import HistoryEntry, RecipientUpdate  # noqa: E402
from mta.store.postgresql.batches import MAX_BATCH_ITEMS  # noqa: E402
from mta.store.postgresql.engine import PgEngine  # noqa: E402
from mta.store.postgresql.queue import PostgreSQLQueue  # noqa: E402
from mta.store.postgresql.schema import SCHEMA_VERSION  # noqa: E402
from tests.support.backends import QueueBackend  # noqa: E402
from tests.support.messages import message  # noqa: E402
from tests.support.postgres import Cluster, unavailable_reason  # noqa: E402

pytestmark = pytest.mark.timeout(30)

DELIVERED = RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None)


@pytest.fixture
async def nodes(postgres_dsn):
    """Two nodes, "node-a" and "node-b", on one fresh database."""
    a = await QueueBackend.postgresql(postgres_dsn, node="node-a")
    b = await QueueBackend.postgresql(postgres_dsn, node="node-b")
    yield a, b
    await a.close()
    await b.close()


async def test_two_nodes_claiming_at_once_never_take_the_same_recipient(nodes):
    a, b = nodes
    sent = [message(i, rcpts=("x@example.org", "y@example.org")) for i in range(150)]
    await asyncio.gather(*(a.queue.enqueue(m) for m in sent[::2]), *(b.queue.enqueue(m) for m in sent[1::2]))
    # Committed before enqueue returned: the other node sees every message at once.
    assert len(await b.recipients()) == len(sent)

    async def drain(node: QueueBackend) -> list[tuple[str, int]]:
        taken: list[tuple[str, int]] = []
        while due := (await node.queue.claim(2e9, 7)).due:
            taken.extend((d.message_id, d.rcpt_no) for d in due)
        return taken

    # Several claimers per node, all at once: SKIP LOCKED makes them take different rows.
    results = await asyncio.gather(*(drain(node) for node in (a, b, a, b, a, b)))
    taken = [t for r in results for t in r]
    assert len(taken) == len(set(taken)) == 2 * len(sent)
    by_a = {t for r in results[0::2] for t in r}
    by_b = {t for r in results[1::2] for t in r}
    assert by_a and by_b   # both nodes did work
    leases = await a.query("SELECT message_id, rcpt_no, lease_node, lease_until FROM recipients")
    assert {(m, n): node for m, n, node, _ in leases} == (
        {t: "node-a" for t in by_a} | {t: "node-b" for t in by_b})
    assert {until for *_, until in leases} == {2e9 + 60}


async def test_a_node_that_lost_its_lease_cannot_overwrite_the_outcome(nodes):
    a, b = nodes
    m = message(1)
    await a.queue.enqueue(m)
    [due] = (await a.queue.claim(2e9, 10)).due
    # Node a stalls past its lease (60 s): node b takes the recipient over and defers it.
    assert (await b.queue.claim(2e9 + 30, 10)).due == []          # a's lease still holds
    assert await b.queue.next_due_time() == 2e9 + 60               # b wakes when it ends
    [taken] = (await b.queue.claim(2e9 + 61, 10)).due
    assert (taken.message_id, taken.rcpt_no) == (due.message_id, due.rcpt_no)
    # a comes back: its outcome, give-back and renewal change nothing of b's.
    assert not await a.queue.record_outcomes(m.id, [DELIVERED], 2e9 + 62,
                                             new_messages=[message(2, rcpts=("a@lab.test",))])
    assert not await a.queue.record_outcomes(m.id, [DELIVERED], 2e9 + 62)   # the one-statement path too
    await a.queue.give_back(m.id, [0])
    assert await a.queue.renew_leases(2e9 + 62) == 0
    assert await a.recipients() == {m.id: [("b@example.org", "active", 0)]}   # no bounce either
    assert await b.queue.renew_leases(2e9 + 62) == 1
    assert await b.query("SELECT lease_node, lease_until FROM recipients") == [("node-b", 2e9 + 122)]
    assert not await b.queue.record_outcomes(
        m.id, [RecipientUpdate(0, RcptState.DEFERRED, 1, 2e9 + 400, "451 4.4.1 later")], 2e9 + 63)
    assert await a.recipients() == {m.id: [("b@example.org", "deferred", 1)]}
    assert await a.query("SELECT lease_node, lease_until FROM recipients") == [(None, None)]


async def test_a_dead_nodes_recipients_are_delivered_by_the_survivor_when_its_lease_ends(postgres_dsn):
    a = await QueueBackend.postgresql(postgres_dsn, node="node-a", lease=0.5)
    b = await QueueBackend.postgresql(postgres_dsn, node="node-b", lease=0.5)
    try:
        sent = [message(i) for i in range(5)]
        for m in sent:
            await a.queue.enqueue(m)
        claimed_at = time.time()
        assert len((await a.queue.claim(claimed_at, 10)).due) == 5
        await a.close()                    # node a dies mid-delivery
        # While the lease runs, b leaves a's recipients alone (a might be alive).
        assert await b.queue.recover_in_flight() == 0
        assert (await b.queue.claim(time.time(), 10)).due == []
        due_at = await b.queue.next_due_time()
        assert due_at == claimed_at + 0.5
        await asyncio.sleep(max(0.0, due_at - time.time()) + 0.05)
        assert await b.queue.recover_in_flight() == 5        # due again: queued, never tried
        assert await b.recipients() == {m.id: [("b@example.org", "queued", 0)] for m in sent}
        claimed = await b.queue.claim(time.time(), 10, prefetch_bytes=1 << 20)
        assert sorted(d.message_id for d in claimed.due) == sorted(m.id for m in sent)
        assert claimed.bodies == {m.id: m.data for m in sent}
        for m in sent:
            assert await b.queue.record_outcomes(m.id, [DELIVERED], time.time())
        assert await b.recipients() == {}
    finally:
        await b.close()


async def test_ended_leases_are_claimed_without_recovery(nodes):
    """The survivor's queue manager need not restart: its next claim takes ended leases over."""
    a, b = nodes
    m = message(1)
    await a.queue.enqueue(m)
    await a.queue.claim(2e9, 10)
    [due] = (await b.queue.claim(2e9 + 60, 10)).due
    assert due.message_id == m.id
    assert await b.queue.record_outcomes(m.id, [DELIVERED], 2e9 + 61)


async def test_a_claim_whose_reply_was_lost_is_not_renewed_and_comes_back(postgres_dsn):
    """A claim whose COMMIT reached the server while the node saw its connection break
    (StoreError: `pg_ctl restart` under load) leased rows the queue manager never got.
    Renewal keeps only what the queue manager holds, so that lease ends and the next
    claim, this node's own too, takes the recipient; what it does hold stays its own."""
    a = await QueueBackend.postgresql(postgres_dsn, node="node-a", lease=0.5)
    try:
        lost, held = message(1), message(2)
        await a.queue.enqueue(lost)
        await a.queue.enqueue(held)
        [due] = (await a.queue.claim(time.time(), 1)).due       # the queue manager has message 2's ...
        lost, held = (held, lost) if due.message_id == lost.id else (lost, held)
        now = time.time()
        # ... and the lost claim: rows leased to node-a that its queue manager never saw.
        await a.query(f"UPDATE recipients SET state = 'active', lease_node = 'node-a', lease_until = {now + 0.5}"
                      f" WHERE message_id = '{lost.id}'")
        for _ in range(3):                                        # renewals past the lease
            await asyncio.sleep(0.25)
            assert await a.queue.renew_leases() == 1
        [(lease_until,)] = await a.query(f"SELECT lease_until FROM recipients WHERE message_id = '{lost.id}'")
        assert lease_until == pytest.approx(now + 0.5)            # not renewed: it ends
        [retaken] = (await a.queue.claim(time.time(), 10)).due     # the held one is not taken again
        assert retaken.message_id == lost.id
        for m in (lost, held):
            assert await a.queue.record_outcomes(m.id, [DELIVERED], time.time())
        assert await a.recipients() == {}
        assert await a.queue.renew_leases() == 0
    finally:
        await a.close()


async def test_enqueue_fails_while_the_database_is_down_and_works_when_it_is_back():
    if reason := unavailable_reason():
        pytest.skip(reason)
    cluster = Cluster()               # its own server: this test stops it
    try:
        cluster.start()
        engine = PgEngine(cluster.dsn(), connect_timeout=2.0)
        await engine.open()
        queue = PostgreSQLQueue(engine, node="node-a")
        woken: list[object] = []
        queue.add_listener(woken.append)
        await queue.enqueue(message(1))
        cluster.stop()
        started = time.monotonic()
        lost = message(2)
        with pytest.raises(StoreError, match="PostgreSQL"):
            await queue.enqueue(lost)
        with pytest.raises(StoreError):
            await queue.claim(2e9, 10)
        assert time.monotonic() - started < 10
        assert engine.health.failing("database")     # /healthz says so
        assert len(woken) == 1          # no wake-up for mail that was not committed
        cluster.start()
        kept = message(3)
        await queue.enqueue(kept)       # reconnected by itself, on the first try
        assert engine.health.ok
        assert sorted(d.message_id for d in (await queue.claim(2e9, 10)).due) == sorted(
            [woken[0][0].id, kept.id])
        # Connections cut under a running pool (a failover): an error at most once, then it works.
        cluster.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'mta'")
        failures = 0
        for i in range(2):
            try:
                await queue.enqueue(message(10 + i))
            except StoreError:
                failures += 1
        assert failures <= 1
        await queue.enqueue(message(20))
        await engine.close()
    finally:
        cluster.remove()


async def test_open_migrates_an_empty_database_once_and_refuses_a_newer_one(postgres_cluster):
    name = postgres_cluster.create_database()
    dsn = postgres_cluster.dsn(name)
    try:
        # Two nodes starting together: one migrates, the other waits on the lock and finds it done.
        first, second = PgEngine(dsn), PgEngine(dsn)
        await asyncio.gather(first.open(), second.open())
        assert sorted([first.schema_found, second.schema_found]) == [0, SCHEMA_VERSION]
        queue = PostgreSQLQueue(first)
        m = message(1)
        await queue.enqueue(m)
        await first.close()
        await second.close()
        again = PgEngine(dsn)
        await again.open()                       # idempotent: nothing to do, nothing lost
        assert again.schema_found == SCHEMA_VERSION
        assert await PostgreSQLQueue(again).message_data(m.id) == m.data
        await again.close()
        assert postgres_cluster.psql("SELECT version FROM schema_version ORDER BY version", name).split() == [
            str(v) for v in range(1, SCHEMA_VERSION + 1)]
        postgres_cluster.psql(f"INSERT INTO schema_version (version) VALUES ({SCHEMA_VERSION + 1})", name)
        newer = PgEngine(dsn)
        with pytest.raises(StoreError, match="newer than this mta"):
            await newer.open()
    finally:
        postgres_cluster.drop_database(name)


async def test_open_fails_with_store_error_when_nothing_listens():
    from tests.support.ports import free_port
    engine = PgEngine(f"postgresql://mta@127.0.0.1:{free_port()}/mta", connect_timeout=2.0)
    with pytest.raises(StoreError, match="PostgreSQL"):
        await engine.open()
    with pytest.raises(StoreError, match="not open"):
        await PostgreSQLQueue(engine).enqueue(message(1))


async def test_commits_are_synchronous_whatever_the_database_default(postgres_cluster):
    """250 after COMMIT: the engine's sessions wait for the WAL flush even where the
    database's default says not to (a DBA's synchronous_commit = off)."""
    name = postgres_cluster.create_database()
    try:
        postgres_cluster.psql(f"ALTER DATABASE {name} SET synchronous_commit = off")
        engine = PgEngine(postgres_cluster.dsn(name))
        await engine.open()

        async def setting(conn):
            return await conn.fetchval("SHOW synchronous_commit")

        assert await engine.run(setting) == "on"
        await engine.close()
    finally:
        postgres_cluster.drop_database(name)


async def test_new_mail_on_one_node_wakes_the_other(nodes):
    a, b = nodes
    woken_a: list[object] = []
    woken_b = asyncio.Event()
    a.queue.add_listener(woken_a.append)
    b.queue.add_listener(lambda messages: woken_b.set())
    b.queue.listen_to_other_nodes()
    a.queue.listen_to_other_nodes()
    await asyncio.wait_for(woken_b.wait(), 5)       # woken once on connecting: "look again"
    await asyncio.sleep(0.1)
    woken_a.clear()
    woken_b.clear()
    m = message(1)
    started = time.monotonic()
    await a.queue.enqueue(m)
    await asyncio.wait_for(woken_b.wait(), 5)
    assert time.monotonic() - started < 1.0   # milliseconds in practice
    assert woken_a == [[m]]                        # a's own commit, not again through NOTIFY
    # A failed enqueue wakes nobody: the NOTIFY went with the rolled-back transaction.
    woken_b.clear()
    with pytest.raises(StoreError):
        await a.queue.enqueue(m)
    await asyncio.sleep(0.3)
    assert not woken_b.is_set()
    # b's listening connection cut (a failover): it comes back by itself and wakes b.
    await a.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                  " WHERE application_name = 'mta listen' AND pid <> pg_backend_pid()")
    await asyncio.wait_for(woken_b.wait(), 5)
    await asyncio.sleep(1.5)                        # both listeners are back
    woken_b.clear()
    await a.queue.enqueue(message(2))
    await asyncio.wait_for(woken_b.wait(), 5)


# ----------------------------------------------------------------- concurrent enqueues share commits
# A deferred trigger holds each message's commit until the test lets it through: a message
# whose HELO is a number waits for the advisory lock of that number, which the test holds
# on a connection of its own. Senders starting with "disk-full" or "refused" make that
# commit fail, as a full disk on the server would, or as a row the server refuses.

COMMIT_GATE = """
CREATE FUNCTION commit_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.helo ~ '^[0-9]+$' THEN
        PERFORM pg_advisory_xact_lock_shared(7305, NEW.helo::int);
    END IF;
    IF NEW.sender LIKE 'disk-full%' THEN
        RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full';
    END IF;
    IF NEW.sender LIKE 'refused%' THEN
        RAISE EXCEPTION 'refused by a check' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER commit_gate AFTER INSERT ON messages
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION commit_gate();
"""


def gated(n: int, gate: int, sender: str = "a@lab.test") -> NewMessage:
    return dataclasses.replace(message(n), helo=str(gate), sender=sender)


@pytest.fixture
async def gates(postgres_dsn):
    """(queue backend, the test's own connection holding gates 1 and 2)."""
    backend = await QueueBackend.postgresql(postgres_dsn)
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute(COMMIT_GATE)
    await conn.execute("SELECT pg_advisory_lock(7305, 1), pg_advisory_lock(7305, 2)")
    yield backend, conn
    await conn.close()
    await backend.close()


async def stored_by_transaction(backend: QueueBackend) -> list[list[str]]:
    """The stored message ids grouped by the transaction that inserted them (xmin), in order."""
    rows = await backend.query("SELECT array_agg(id ORDER BY arrival) FROM messages"
                               " GROUP BY xmin::text ORDER BY min(arrival)")
    return [list(ids) for ids, in rows]


async def until_waiting_at_gate(conn: asyncpg.Connection, gate: int) -> None:
    """Until some transaction waits for ``gate`` (its commit has begun and is held there)."""
    for _ in range(500):
        if await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                               " AND classid = 7305 AND objid = $1", gate):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"nothing waits at gate {gate}")


async def test_concurrent_enqueues_share_a_commit_and_each_returns_after_it(gates):
    backend, conn = gates
    woken: list[list[NewMessage]] = []
    backend.queue.add_listener(woken.append)
    first = gated(0, gate=1)
    rest = [gated(n, gate=2) for n in range(1, 20)]
    first_done = asyncio.ensure_future(backend.queue.enqueue(first))
    await until_waiting_at_gate(conn, 1)        # its commit is in flight, held at gate 1
    rest_done = [asyncio.ensure_future(backend.queue.enqueue(m)) for m in rest]
    await asyncio.sleep(0.3)
    assert not first_done.done() and not any(f.done() for f in rest_done)
    assert await conn.fetchval("SELECT count(*) FROM messages") == 0

    await conn.execute("SELECT pg_advisory_unlock(7305, 1)")
    await asyncio.wait_for(first_done, 5)       # its commit done: it returns...
    await until_waiting_at_gate(conn, 2)        # ...while the 19 that waited commit together
    await asyncio.sleep(0.3)
    assert not any(f.done() for f in rest_done)  # not before their own commit
    assert await conn.fetchval("SELECT count(*) FROM messages") == 1
    assert woken == [[first]]

    await conn.execute("SELECT pg_advisory_unlock(7305, 2)")
    await asyncio.wait_for(asyncio.gather(*rest_done), 5)
    assert await stored_by_transaction(backend) == [[first.id], [m.id for m in rest]]
    assert await backend.recipients() == {m.id: [("b@example.org", "queued", 0)] for m in [first, *rest]}
    assert sorted(m.id for [m] in woken) == sorted(m.id for m in [first, *rest])


async def test_a_batch_whose_commit_fails_fails_all_its_callers_and_stores_none(gates):
    backend, conn = gates
    woken: list[list[NewMessage]] = []
    backend.queue.add_listener(woken.append)
    first = gated(0, gate=1)
    first_done = asyncio.ensure_future(backend.queue.enqueue(first))
    await until_waiting_at_gate(conn, 1)
    # These five share the next commit, which fails: the server's disk is full.
    batch = [message(n) for n in range(1, 5)] + [dataclasses.replace(message(5), sender="disk-full@lab.test")]
    batch_done = [asyncio.ensure_future(backend.queue.enqueue(m)) for m in batch]
    await asyncio.sleep(0.1)
    await conn.execute("SELECT pg_advisory_unlock(7305, 1)")
    results = await asyncio.wait_for(asyncio.gather(*batch_done, return_exceptions=True), 5)
    await first_done
    assert [type(r) for r in results] == [StoreError] * 5
    assert all("No space left on device" in str(r) for r in results)
    assert len({id(r) for r in results}) == 5          # each caller its own exception
    assert await stored_by_transaction(backend) == [[first.id]]
    assert woken == [[first]]
    await backend.queue.enqueue(message(6))            # and the next one is stored
    assert len(await backend.recipients()) == 2


async def test_a_message_the_server_refuses_fails_alone(gates):
    backend, conn = gates
    first = gated(0, gate=1)
    first_done = asyncio.ensure_future(backend.queue.enqueue(first))
    await until_waiting_at_gate(conn, 1)
    batch = [message(1), dataclasses.replace(message(2), sender="refused@lab.test"), message(3)]
    batch_done = [asyncio.ensure_future(backend.queue.enqueue(m)) for m in batch]
    await asyncio.sleep(0.1)
    await conn.execute("SELECT pg_advisory_unlock(7305, 1)")
    results = await asyncio.wait_for(asyncio.gather(*batch_done, return_exceptions=True), 5)
    await first_done
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StoreError) and "refused by a check" in str(results[1])
    # The batch failed whole; the others were then stored one at a time.
    assert await stored_by_transaction(backend) == [[first.id], [batch[0].id], [batch[2].id]]
    assert backend.queue.health.ok


async def test_a_batch_cut_off_by_a_broken_connection_fails_all_its_callers(gates):
    backend, conn = gates
    batch = [gated(n, gate=1) for n in range(3)]
    done = [asyncio.ensure_future(backend.queue.enqueue(m)) for m in batch]
    await until_waiting_at_gate(conn, 1)
    # A failover in the middle of the commit: the server cuts the connection.
    await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                       " AND NOT granted AND classid = 7305")
    results = await asyncio.wait_for(asyncio.gather(*done, return_exceptions=True), 5)
    assert [type(r) for r in results] == [StoreError] * 3
    assert await conn.fetchval("SELECT count(*) FROM messages") == 0
    await conn.execute("SELECT pg_advisory_unlock_all()")
    m = message(9)
    await backend.queue.enqueue(m)                     # reconnected by itself
    assert await stored_by_transaction(backend) == [[m.id]]


async def test_a_batch_holds_at_most_max_batch_messages(gates):
    backend, conn = gates
    first = gated(0, gate=1)
    first_done = asyncio.ensure_future(backend.queue.enqueue(first))
    await until_waiting_at_gate(conn, 1)
    rest = [message(n) for n in range(1, 2 * MAX_BATCH_ITEMS + 11)]
    await asyncio.sleep(0.05)
    rest_done = asyncio.gather(*(backend.queue.enqueue(m) for m in rest))
    await asyncio.sleep(0.1)
    await conn.execute("SELECT pg_advisory_unlock(7305, 1)")
    await asyncio.wait_for(asyncio.gather(first_done, rest_done), 10)
    sizes = [len(ids) for ids in await stored_by_transaction(backend)]
    assert sizes == [1, MAX_BATCH_ITEMS, MAX_BATCH_ITEMS, 10]


async def test_concurrent_delivery_outcomes_share_a_commit(postgres_dsn):
    backend = await QueueBackend.postgresql(postgres_dsn)
    try:
        queue = backend.queue
        sent = [message(n, rcpts=("x@example.org", "y@example.org")) for n in range(20)]
        for m in sent:
            await queue.enqueue(m)
        assert len((await queue.claim(2e9, 100)).due) == 40
        first = RecipientUpdate(0, RcptState.DELIVERED, 1, 2e9, None)
        # Twenty deliveries ending at once: one transaction records them all, each message stays
        # (its second recipient is pending) with its history row.
        assert await asyncio.gather(*(queue.record_outcomes(
            m.id, [first], 2e9, history=[HistoryEntry(2e9, "x@example.org", "sent", "relay=mx")])
            for m in sent)) == [False] * 20
        assert await backend.query("SELECT count(DISTINCT xmin::text), count(*) FROM recipients"
                                   " WHERE state = 'delivered'") == [(1, 20)]
        assert await backend.query("SELECT count(*) FROM history WHERE event = 'sent'") == [(20,)]
        # Two outcomes of one message in flight together are committed in turn: the first
        # leaves a recipient pending, the second finishes the message, as if one after the other.
        second = RecipientUpdate(1, RcptState.DELIVERED, 1, 2e9, None)
        m = message(99, rcpts=("x@example.org", "y@example.org"))
        await queue.enqueue(m)
        assert len((await queue.claim(2e9, 100)).due) == 2
        assert await asyncio.gather(queue.record_outcomes(m.id, [first], 2e9),
                                    queue.record_outcomes(m.id, [second], 2e9),
                                    queue.record_outcomes(sent[1].id, [second], 2e9)) == [False, True, True]
        remaining = await backend.recipients()
        assert m.id not in remaining and sent[1].id not in remaining and len(remaining) == 19
    finally:
        await backend.close()
