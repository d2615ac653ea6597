"""What only PostgreSQL's queue administration and mailboxes have: several nodes (issue 16).

Two QueueBackends on one database with different node identities stand for two nodes,
each with its own engine (pool): the RFC 1939 maildrop lock holds across them and goes
with its connection; pruning runs on one node at a time and never under a POP3 session
of any node; the queue gauges read the same on every node; an operator's hold of a
recipient another node delivers keeps the lease guarantee; `mta queue check` finds rows
that break the rules. The behaviour both backends share is in tests/test_store_admin.py
and tests/test_store_mailboxes.py."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install -e '.[test]')")

import asyncpg  # noqa: E402

from mta.errors import StoreError  # noqa: E402
from mta.model import NewMessage, RcptState, Recipient  # noqa: E402
from mta.pop3 import POP3Listener  # noqa: E402
from mta.store.api import AdminResult, QueueSummary, RecipientUpdate  # noqa: E402
from mta.store.postgresql.engine import PgEngine  # noqa: E402
from mta.store.postgresql.mailboxes import PRUNE_LOCK, PostgreSQLMailboxes, maildrop_key  # noqa: E402
from mta.store.postgresql.schema import MIGRATION_LOCK  # noqa: E402
from tests.support.backends import QueueBackend  # noqa: E402
from tests.support.messages import message  # noqa: E402
from tests.support.pop3 import TWO, Client, pop3_lab  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

pytestmark = pytest.mark.timeout(60)

NOW = 2e9
OLD = b"Subject: old\r\n\r\nold\r\n"
NEW = b"Subject: new\r\n\r\nnew\r\n"


@pytest.fixture
async def nodes(postgres_dsn):
    """Two nodes, "node-a" and "node-b", on one fresh database (a short lease: 10 s)."""
    a = await QueueBackend.postgresql(postgres_dsn, node="node-a", lease=10.0)
    b = await QueueBackend.postgresql(postgres_dsn, node="node-b", lease=10.0)
    yield a, b
    await a.close()
    await b.close()


async def lock_holders(node: QueueBackend) -> list[str]:
    """The application_name of every session holding an advisory lock."""
    rows = await node.query("SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                            " WHERE l.locktype = 'advisory' AND l.granted ORDER BY 1")
    return [r[0] for r in rows]


# --------------------------------------------------------------------------- the maildrop lock


async def test_the_maildrop_lock_holds_across_nodes_and_goes_with_release(nodes):
    a, b = nodes
    held = await a.mailboxes.lock("alice@lab.test")
    assert held is not None
    assert await b.mailboxes.lock("alice@lab.test") is None
    assert await b.mailboxes.lock("Alice@LAB.test") is None
    assert await a.mailboxes.lock("alice@lab.test") is None      # nor twice on the same node
    bob = await b.mailboxes.lock("bob@lab.test")
    assert bob is not None
    assert await lock_holders(a) == ["mta pop3 lock", "mta pop3 lock"]
    await held.release()
    taken_over = await b.mailboxes.lock("alice@lab.test")
    assert taken_over is not None
    await taken_over.release()
    await bob.release()
    assert await lock_holders(a) == []
    # The sessions' connections are closed with their locks: none left behind.
    assert await a.query("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mta pop3 lock'") == [(0,)]


async def test_the_maildrop_lock_goes_with_its_connection(nodes):
    a, b = nodes
    held = await a.mailboxes.lock("alice@lab.test")
    assert held is not None
    # The holder's session ends (its node died, or lost the database): PostgreSQL lets go.
    [(pid,)] = await b.query("SELECT pid FROM pg_stat_activity WHERE application_name = 'mta pop3 lock'")
    assert await b.query(f"SELECT pg_terminate_backend({pid})") == [(True,)]
    deadline = time.monotonic() + 5
    while (again := await b.mailboxes.lock("alice@lab.test")) is None:
        assert time.monotonic() < deadline, "the lock outlived its connection"
        await asyncio.sleep(0.05)
    await again.release()
    await held.release()   # its connection is gone: nothing to do, and no error


async def test_in_use_across_two_nodes_over_pop3(nodes, tmp_path):
    """RFC 1939 §8 over the wire: two nodes' POP3 listeners (each with its own engine
    and its own in-process lock set, as two daemons have) on one database."""
    a, b = nodes
    async with pop3_lab(tmp_path, backend=a) as lab:
        other = POP3Listener(lab.config, lab.second_listener(allow_insecure_auth=True).listener, b.mailboxes, lab.users,
                             throttle=lab.listener.throttle)
        await other.start()
        try:
            async with await Client.connect(lab.port) as first, \
                    await Client.connect(other.sockets()[0][1]) as second:
                assert await first.login() == b"+OK alice@lab.test has 3 messages (177 octets)\r\n"
                assert await second.login() == b"-ERR [IN-USE] mailbox is locked by another POP3 session\r\n"
                assert await first.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
                assert (await first.cmd("QUIT")).startswith(b"+OK relay.lab.test POP3 server signing off")
                assert await first.closed()
                # Node b sees node a's deletion, and the maildrop is free.
                assert await second.login() == b"+OK alice@lab.test has 2 messages (80 octets)\r\n"
                assert await second.multi("RETR 1") == b"+OK 40 octets\r\n" + TWO + b".\r\n"
        finally:
            other.stop_accepting()
            await other.drain(1.0)


async def test_the_lock_uses_connections_of_its_own_not_the_pool(postgres_dsn):
    engine = PgEngine(postgres_dsn, max_connections=2)
    await engine.open()
    try:
        boxes = PostgreSQLMailboxes(engine)
        locks = [await boxes.lock(f"user{i}@lab.test") for i in range(5)]
        assert all(lock is not None for lock in locks)
        # Five POP3 sessions hold five connections; the pool of two still serves the queue.
        assert await asyncio.wait_for(boxes.messages("user0@lab.test"), 5) == []
        for lock in locks:
            assert lock is not None
            await lock.release()
    finally:
        await engine.close()


async def test_a_dead_nodes_lock_is_found_out_by_the_server_within_a_minute(postgres_dsn):
    # A machine that dies sends no FIN: the server's keepalive probes end the session.
    engine = PgEngine(postgres_dsn)
    conn = await engine.connect("mta pop3 lock")
    try:
        settings = [await conn.fetchval(f"SHOW {name}") for name in
                    ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")]
    finally:
        await conn.close()
    assert settings == ["30", "10", "3"]   # seconds; on a Unix socket these would read 0


async def test_lock_raises_store_error_when_the_database_cannot_be_reached():
    engine = PgEngine(f"postgresql://mta@127.0.0.1:{free_port()}/mta", connect_timeout=2.0)
    with pytest.raises(StoreError, match="^PostgreSQL: "):
        await PostgreSQLMailboxes(engine).lock("alice@lab.test")


def test_maildrop_keys_ignore_case_and_never_meet_the_fixed_keys():
    assert maildrop_key("Alice@Lab.Test") == maildrop_key("alice@lab.test") != maildrop_key("bob@lab.test")
    assert -2**63 <= maildrop_key("alice@lab.test") < 2**63
    assert PRUNE_LOCK != MIGRATION_LOCK


# --------------------------------------------------------------------------- pruning


async def test_pruning_on_two_nodes_at_once_prunes_once(nodes):
    a, b = nodes
    now = time.time()
    for n in range(20):
        await a.deliver(f"user{n % 4}@lab.test", (OLD, now - 2 * 86400 - n), (NEW, now - 60 - n))
    results = await asyncio.gather(*(node.mailboxes.prune_older_than(now - 86400) for node in (a, b, a, b)))
    assert sum(results) == 20
    assert await a.query("SELECT count(*), min(subject) FROM mailbox_messages") == [(20, "new")]


async def test_pruning_is_a_no_op_while_another_node_prunes(nodes):
    a, b = nodes
    now = time.time()
    await a.deliver("alice@lab.test", (OLD, now - 2 * 86400))
    # Another node's prune transaction, caught in the middle (it holds PRUNE_LOCK).
    other = await asyncpg.connect(a.engine.dsn)
    try:
        async with other.transaction():
            assert await other.fetchval("SELECT pg_try_advisory_xact_lock($1)", PRUNE_LOCK)
            assert await b.mailboxes.prune_older_than(now - 86400) == 0
            assert len(await b.mailboxes.messages("alice@lab.test")) == 1
    finally:
        await other.close()
    assert await b.mailboxes.prune_older_than(now - 86400) == 1


async def test_pruning_waits_for_a_pop3_session_on_another_node(nodes):
    # RFC 1939 §8: the session has the maildrop to itself, whichever node it is on.
    a, b = nodes
    now = time.time()
    await a.deliver("alice@lab.test", (OLD, now - 2 * 86400))
    await a.deliver("bob@lab.test", (OLD, now - 2 * 86400))
    session = await a.mailboxes.lock("alice@lab.test")
    assert session is not None
    assert await b.mailboxes.prune_older_than(now - 86400) == 1     # bob's only
    assert [s.mailbox for s in await b.mailboxes.summaries()] == ["alice@lab.test"]
    await session.release()
    assert await b.mailboxes.prune_older_than(now - 86400) == 1
    assert await b.mailboxes.summaries() == []


# --------------------------------------------------------------------------- the queue gauges


async def test_every_node_reports_the_same_queue_figures(nodes):
    a, b = nodes
    for n in range(30):
        await (a, b)[n % 2].queue.enqueue(message(n, rcpts=("x@example.org", "y@example.org")))
    await a.queue.claim(NOW, 10)          # a delivers 10 recipients
    await b.queue.claim(NOW, 6)           # b delivers 6
    await b.admin.hold([m.id for m in await a.admin.list_messages()][-3:], NOW)
    expected = {"active": 16, "queued": 38, "held": 6}
    assert await a.admin.count_recipients() == await b.admin.count_recipients() == expected
    summary = await a.admin.queue_summary(NOW)
    assert summary == await b.admin.queue_summary(NOW) == QueueSummary(
        active=27, deferred=0, hold=3, oldest_arrival=1_700_000_000.0)


async def test_queue_figures_are_one_indexed_query_on_100k_recipients(nodes):
    a, _ = nodes
    # 50,000 messages with two recipients each, written by SQL (enqueueing them one by one
    # is not what is measured here).
    await a.execute(
        "INSERT INTO messages (id, sender, arrival, size) SELECT 'M' || lpad(n::text, 11, '0'), 's@x.test',"
        " 1.7e9 + n, 100 FROM generate_series(1, 50000) n;"
        "INSERT INTO bodies (message_id, data) SELECT id, '\\x00'::bytea FROM messages;"
        "INSERT INTO recipients (message_id, rcpt_no, address, state, next_attempt)"
        " SELECT id, r, 'r@x.test', (ARRAY['queued', 'deferred', 'held', 'active', 'delivered'])[1 + (r + n) % 5],"
        " 1.7e9 FROM (SELECT id, row_number() OVER () AS n FROM messages) m, generate_series(0, 1) r;"
        "UPDATE recipients SET lease_node = 'node-b', lease_until = 2e9 WHERE state = 'active';"
        "ANALYZE")
    timings = {}
    for name, call in (("count_recipients", a.admin.count_recipients),
                       ("queue_summary", lambda: a.admin.queue_summary(NOW))):
        await call()
        started = time.perf_counter()
        for _ in range(5):
            result = await call()
        timings[name] = (time.perf_counter() - started) / 5
        print(f"{name}: {timings[name] * 1000:.1f} ms on 100,000 recipients")   # the README's figure
        assert result
    assert await a.admin.count_recipients() == {
        "queued": 20000, "deferred": 20000, "held": 20000, "active": 20000, "delivered": 20000}
    assert timings["count_recipients"] < 0.5 and timings["queue_summary"] < 0.5, timings


# --------------------------------------------------------------------------- leases and the operator


async def test_hold_of_a_recipient_another_node_delivers(nodes):
    a, b = nodes
    m = message(1, rcpts=("x@example.org", "y@example.org"))
    await a.queue.enqueue(m)
    assert len((await a.queue.claim(NOW, 10)).due) == 2
    # The operator runs `mta queue hold` on node b while node a delivers: a keeps its
    # lease, so its deferral leaves the recipient held and its delivery is kept.
    assert await b.admin.hold([m.id], NOW + 1) == AdminResult((m.id,), {m.id: 2})
    assert await a.query("SELECT state, lease_node FROM recipients ORDER BY rcpt_no") == [
        ("held", "node-a"), ("held", "node-a")]
    assert (await b.queue.claim(NOW + 3600, 10)).due == []      # held, even once the lease ended
    assert not await a.queue.record_outcomes(
        m.id, [RecipientUpdate(0, RcptState.DEFERRED, 1, NOW + 600, "451 later"),
               RecipientUpdate(1, RcptState.DELIVERED, 1, 0.0, None)], NOW + 2)
    assert await a.recipients() == {m.id: [("x@example.org", "held", 1), ("y@example.org", "delivered", 1)]}


async def test_released_while_another_node_still_delivers_it_is_delivered_once(nodes):
    # As tests/test_queue_admin.py's hold-and-release during delivery, across nodes: the
    # released recipient is that delivery's again, not fresh work for another node.
    a, b = nodes
    m, n = message(1), message(2)
    await a.queue.enqueue(m)
    await a.queue.enqueue(n)
    assert len((await a.queue.claim(NOW, 10)).due) == 2        # leases until NOW + 10
    assert await b.admin.hold([m.id, n.id], NOW + 1) == AdminResult((m.id, n.id), {m.id: 1, n.id: 1})
    assert await b.admin.release([m.id], NOW + 2) == AdminResult((m.id,), {m.id: 1})
    assert await b.admin.requeue([n.id], NOW + 2) == AdminResult((n.id,), {n.id: 1})
    assert await a.query("SELECT message_id, state, lease_node, lease_until FROM recipients ORDER BY 1") == sorted(
        [(m.id, "active", "node-a", NOW + 10), (n.id, "active", "node-a", NOW + 10)])
    assert (await b.queue.claim(NOW + 3, 10)).due == []         # nothing for node b
    assert await a.queue.record_outcomes(m.id, [RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None)], NOW + 4)
    assert await a.queue.record_outcomes(n.id, [RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None)], NOW + 4)
    assert await a.recipients() == {}


async def test_released_after_the_delivering_nodes_lease_ended_is_due_for_any_node(nodes):
    a, b = nodes
    m = message(1)
    await a.queue.enqueue(m)
    await a.queue.claim(NOW, 10)                                 # lease until NOW + 10
    await b.admin.hold([m.id], NOW + 1)
    # Node a is gone (its lease is not renewed while held, and it has ended).
    assert await b.admin.release([m.id], NOW + 11) == AdminResult((m.id,), {m.id: 1})
    assert await a.query("SELECT state, lease_node, lease_until, next_attempt FROM recipients") == [
        ("queued", None, None, NOW + 11)]
    [due] = (await b.queue.claim(NOW + 11, 10)).due
    assert due.message_id == m.id


async def test_hold_after_a_takeover_keeps_the_node_that_lost_its_lease_out(nodes):
    a, b = nodes
    m = message(1)
    await a.queue.enqueue(m)
    await a.queue.claim(NOW, 10)
    # a stalls past its lease; b takes the recipient over; then the operator holds it.
    [taken] = (await b.queue.claim(NOW + 11, 10)).due
    assert taken.message_id == m.id
    assert await a.admin.hold([m.id], NOW + 12) == AdminResult((m.id,), {m.id: 1})
    # a comes back with a result: not written (not its lease), the hold stays.
    assert not await a.queue.record_outcomes(m.id, [RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None)],
                                             NOW + 13)
    assert await a.recipients() == {m.id: [("b@example.org", "held", 0)]}
    # b's deferral leaves it held too; released, it is due again.
    assert not await b.queue.record_outcomes(m.id, [RecipientUpdate(0, RcptState.DEFERRED, 1, NOW + 600, "451")],
                                             NOW + 14)
    assert await a.recipients() == {m.id: [("b@example.org", "held", 1)]}
    assert await a.admin.release([m.id], NOW + 15) == AdminResult((m.id,), {m.id: 1})
    [again] = (await a.queue.claim(NOW + 15, 10)).due
    assert (again.message_id, again.attempts) == (m.id, 1)


async def test_flush_and_requeue_leave_another_nodes_delivery_alone(nodes):
    a, b = nodes
    m = message(1, rcpts=("x@example.org", "y@example.org"))
    await a.queue.enqueue(m)
    [first, _] = (await a.queue.claim(NOW, 10)).due
    await a.queue.record_outcomes(m.id, [RecipientUpdate(first.rcpt_no, RcptState.DEFERRED, 1, NOW + 600, "451")],
                                  NOW)
    # One recipient deferred, the other still being delivered by a.
    assert await b.admin.flush(None, NOW + 1) == AdminResult((m.id,), {m.id: 1})
    assert await b.admin.requeue([m.id], NOW + 2) == AdminResult((m.id,), {m.id: 1})
    assert await a.query("SELECT state, lease_node FROM recipients ORDER BY rcpt_no") == [
        ("queued", None), ("active", "node-a")]
    assert await a.queue.record_outcomes(m.id, [RecipientUpdate(1, RcptState.DELIVERED, 1, 0.0, None)], NOW + 3) \
        is False
    assert await a.recipients() == {m.id: [("x@example.org", "queued", 1), ("y@example.org", "delivered", 1)]}


# --------------------------------------------------------------------------- listing and checking


async def test_a_listing_is_one_snapshot_while_another_node_deletes(nodes):
    a, b = nodes
    sent = [message(n, rcpts=("x@example.org", "y@example.org")) for n in range(10)]
    for m in sent:
        await a.queue.enqueue(m)
    listed = []
    async with contextlib.aclosing(a.admin.iter_queue(batch=3)) as batches:
        async for entries in batches:
            if not listed:
                # Mid-listing, node b deletes everything (and another message arrives).
                assert len((await b.admin.delete(None)).found) == 10
                await b.queue.enqueue(message(99))
            listed.extend(entries)
    assert [(e.id, len(e.recipients)) for e in listed] == [(m.id, 2) for m in sent]
    assert [e.id for batch in [x async for x in a.admin.iter_queue()] for e in batch] == [
        (await b.admin.list_messages())[0].id]


async def test_check_reports_rows_that_break_the_rules(nodes):
    a, _ = nodes
    await a.deliver("alice@lab.test", NEW)
    good, no_body, no_rcpts, bad_size = (message(n) for n in range(4))
    for m in (good, no_body, no_rcpts, bad_size):
        await a.queue.enqueue(m)
    orphan = NewMessage(id="0CFFFFFFFFFF", sender="", recipients=(Recipient("z@example.org"),), data=b"x",
                        arrival=1.7e9)
    await a.queue.enqueue(orphan)
    assert await a.admin.check() == []
    # As a restore with the foreign keys' triggers off, or hand-made changes, would leave them.
    await a.execute(
        f"DELETE FROM bodies WHERE message_id = '{no_body.id}';"
        f"DELETE FROM recipients WHERE message_id = '{no_rcpts.id}';"
        f"UPDATE messages SET size = 1 WHERE id = '{bad_size.id}';"
        f"UPDATE recipients SET state = 'active', lease_node = NULL WHERE message_id = '{good.id}';"
        "UPDATE mailbox_messages SET size = size + 1;"
        "SET session_replication_role = replica;"
        f"DELETE FROM messages WHERE id = '{orphan.id}';")
    [(box_id,)] = await a.query("SELECT id FROM mailbox_messages")
    assert await a.admin.check() == [
        f"message {no_body.id}: no body",
        f"message {no_rcpts.id}: no recipients",
        f"message {bad_size.id} (1 stored, {len(bad_size.data)} in the body): wrong size",
        "recipients of message 0CFFFFFFFFFF: no such message",
        "body of message 0CFFFFFFFFFF: no such message",
        f"message {good.id} recipient 0: active without a lease (no node will take it over)",
        f"mailbox alice@lab.test message {box_id} ({len(NEW) + 1} stored, {len(NEW)} in the data): wrong size",
    ]
    assert len(await a.admin.check(limit=3)) == 3


async def test_requeue_racing_another_nodes_claims_never_takes_a_claimed_recipient(nodes):
    a, b = nodes
    sent = [message(n, rcpts=("x@example.org", "y@example.org")) for n in range(200)]
    for m in sent:
        await a.queue.enqueue(m)
    claimed: list[tuple[str, int]] = []

    async def claim_all() -> None:
        # Until all are claimed: a claim skips the rows the requeue has locked (SKIP LOCKED),
        # so it may come back empty meanwhile.
        deadline = time.monotonic() + 20
        while len(claimed) < 400 and time.monotonic() < deadline:
            due = (await a.queue.claim(NOW, 5)).due
            claimed.extend((d.message_id, d.rcpt_no) for d in due)
            if not due:
                await asyncio.sleep(0.005)

    # Node a claims while the operator requeues everything on node b (in chunks of 500
    # messages: one chunk here, one UPDATE racing many claims).
    claims = asyncio.create_task(claim_all())
    await asyncio.sleep(0.01)
    result = await b.admin.requeue([m.id for m in sent], NOW)
    await claims
    rows = await a.query("SELECT message_id, rcpt_no, state, lease_node FROM recipients")
    requeued = await a.query("SELECT count(*) FROM history WHERE event = 'requeued'")
    assert {(m, n): (s, node) for m, n, s, node in rows} == {
        (m.id, n): ("active", "node-a") for m in sent for n in (0, 1)}   # every one claimed in the end
    assert len(claimed) == len(set(claimed)) == 400
    # No recipient was claimed twice: the requeue changed only what was not claimed yet
    # when it reached it (re-checked after each claim committed), and said so exactly.
    assert sum(result.changed.values()) == requeued[0][0]
    assert len(result.found) == 200


async def test_a_hold_during_a_delivery_keeps_its_lease_renewed(nodes):
    """A delivery longer than a lease, held meanwhile: the delivering node keeps renewing it,
    so a release after the first lease would have ended is still that delivery's."""
    a, b = nodes
    m = message(1)
    await a.queue.enqueue(m)
    await a.queue.claim(NOW, 10)                                 # lease until NOW + 10
    await b.admin.hold([m.id], NOW + 1)
    assert await a.queue.renew_leases(NOW + 8) == 1              # held, still renewed: NOW + 18
    assert await a.query("SELECT state, lease_node, lease_until FROM recipients") == [("held", "node-a", NOW + 18)]
    assert await b.admin.release([m.id], NOW + 12) == AdminResult((m.id,), {m.id: 1})
    assert (await b.queue.claim(NOW + 12, 10)).due == []          # still node a's delivery
    assert await a.queue.record_outcomes(m.id, [RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None)], NOW + 13)
    assert await a.recipients() == {}
