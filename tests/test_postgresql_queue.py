"""What only the PostgreSQL queue has: several nodes on one database (issue 16).

Two PostgreSQLQueue instances with different node identities stand for two nodes:
claims never overlap, a node that lost its lease cannot overwrite the outcome of the
node that took the recipient over, ended leases come back due and are delivered by the
survivor; the database going away gives StoreError (451 4.3.0 to clients) and the
engine reconnects by itself; the schema is migrated once, under a lock, and re-opening
changes nothing. The behaviour both backends share is in tests/test_store.py."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install -e '.[test]')")

from mta.errors import StoreError  # noqa: E402
from mta.model import RcptState  # noqa: E402
from mta.store.api import RecipientUpdate  # noqa: E402
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
