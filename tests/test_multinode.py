"""Two real `mta serve` nodes on one PostgreSQL database (issue 16), end to end.

Each node has its own hostname (node-a.lab.example, node-b.lab.example: the name
it holds on the database and greets the next hop with), listeners, metrics address
and log; both use ``queue: {backend: postgresql, dsn, lease: 3s}`` on a fresh
database of the session's private cluster (tests/support/postgres.py) and short
retry backoffs. The next hop is a recording peer on 127.0.0.2 found by MX on the
loopback DNS server; it holds its reply to the end of DATA a little, so deliveries
are in flight when something happens to a node or to the database.

Without PostgreSQL (or asyncpg) every test here skips, with the reason, through
the ``postgres_cluster`` fixture.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import poplib
import signal
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.fakedns import FakeDNS, mx
from tests.support.multinode import (
    LEASE,
    MIN_BACKOFF,
    NODE_A,
    NODE_B,
    NextHop,
    Node,
    Sent,
    message_id,
    mta_cli,
    node_doc,
    nodes_running,
    query,
    queue_id,
    send_message,
    transaction,
)
from tests.support.postgres import Cluster
from tests.support.users import write_users
from tests.support.waiting import wait_until

MAILBOX_USERS = {"alice@lab.test": "alice pw", "bob@lab.test": "bob pw"}


def two_nodes(tmp_path: Path, dsn: str, dns: FakeDNS, peer_port: int, *, env: dict[str, str] | None = None,
              **options: Any) -> tuple[Node, Node]:
    """Node A and node B on ``dsn``, delivering to example.test's MX (127.0.0.2:peer_port)."""
    mx(dns, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    return (Node(tmp_path / "a", node_doc(NODE_A, dsn, dns=dns, peer_port=peer_port, **options), **(env or {})),
            Node(tmp_path / "b", node_doc(NODE_B, dsn, dns=dns, peer_port=peer_port, **options), **(env or {})))


async def queue_empty(dsn: str) -> bool:
    return (await query(dsn, "SELECT count(*) FROM recipients"))[0][0] == 0


async def wait_queue_empty(dsn: str, timeout: float) -> None:  # noqa: ASYNC109
    """Until no recipient is left in the shared queue; else AssertionError showing some."""
    deadline = time.monotonic() + timeout
    while not await queue_empty(dsn):
        if time.monotonic() > deadline:
            rows = await query(dsn, "SELECT message_id, state, attempts, lease_node, round((lease_until"
                                    " - extract(epoch FROM now()))::numeric, 2), last_error FROM recipients"
                                    " ORDER BY message_id LIMIT 5")
            raise AssertionError(f"the queue is not empty after {timeout} s: {rows}")
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------- 1. relay

@pytest.mark.timeout(60)
async def test_twenty_clients_on_two_nodes_every_message_arrives_once(
        tmp_path: Path, postgres_dsn: str, dns_server: FakeDNS, peer_port: int) -> None:
    a, b = two_nodes(tmp_path, postgres_dsn, dns_server, peer_port)
    total, clients = 200, 20
    sent = Sent()
    seqs = iter(range(total))

    async def client() -> None:
        for seq in seqs:   # even numbers to node A, odd ones to node B
            sent.record(seq, await send_message((a, b)[seq % 2].smtp_port, seq))

    async with NextHop("127.0.0.2", peer_port, hold=0.05) as hop, nodes_running(a, b):
        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        assert (sent.refused, sent.unknown) == ({}, set())
        await hop.wait_for({message_id(seq) for seq in sent.accepted}, timeout=30)
        elapsed = time.monotonic() - started
        await wait_queue_empty(postgres_dsn, 10)
    arrivals = hop.arrivals()
    # Exactly once each, under the queue id its 250 named, with the Received: line of
    # the node that accepted it.
    assert Counter(x.message_id for x in arrivals) == Counter(message_id(seq) for seq in range(total))
    assert {x.message_id: (x.queue_id, x.accepted_by) for x in arrivals} == {
        message_id(seq): (qid, (NODE_A, NODE_B)[seq % 2]) for seq, qid in sent.accepted.items()}
    # Both nodes delivered, and each logged status=sent for exactly what it delivered.
    by_node = Counter(x.node for x in arrivals)
    assert set(by_node) == {NODE_A, NODE_B} and min(by_node.values()) > 0, by_node
    for node in (a, b):
        assert sorted(qid for qid, _ in node.sent()) == sorted(x.queue_id for x in arrivals if x.node == node.name)
    print(f"\n{total} messages through two nodes in {elapsed:.2f} s; delivered by node: {dict(by_node)}")


# ----------------------------------------------------------------- 2. SIGKILL

@pytest.mark.timeout(60)
async def test_sigkill_one_node_mid_delivery_the_survivor_delivers_everything(
        tmp_path: Path, postgres_dsn: str, dns_server: FakeDNS, peer_port: int) -> None:
    a, b = two_nodes(tmp_path, postgres_dsn, dns_server, peer_port)
    total, clients = 120, 20
    sent = Sent()
    seqs = iter(range(total))
    dead: Node | None = None

    async def client() -> None:
        for seq in seqs:
            # Even numbers to node A, odd ones to node B; once one is dead, all to the
            # survivor (as a client's MX fallback would).
            node = (a, b)[seq % 2]
            if node is dead:
                node = a if dead is b else b
            sent.record(seq, await send_message(node.smtp_port, seq))

    async def leased_by(node: Node) -> set[str]:
        return {row[0] for row in await query(
            postgres_dsn, "SELECT message_id FROM recipients WHERE state = 'active' AND lease_node = $1", node.name)}

    async with NextHop("127.0.0.2", peer_port, hold=0.3) as hop, nodes_running(a, b):
        sending = asyncio.gather(*(client() for _ in range(clients)))

        async def delivering() -> Node | None:
            """A node with recipients leased whose deliveries have begun: the one to kill."""
            for node in (b, a):
                if len(await leased_by(node)) >= 5 and sum(x.node == node.name for x in hop.arrivals()) >= 3:
                    return node
            return None

        victim = await wait_until(delivering, 20, "a node delivering with recipients leased", interval=0.01)
        survivor = a if victim is b else b
        await asyncio.sleep(0.15)   # into the next hop's hold of the victim's next messages
        # From here the next hop refuses what the victim still has in flight: it is dead.
        hop.declare_dead(victim.name)
        dead = victim
        killed_at = time.monotonic()
        await victim.kill()
        # What the victim held when it died: its outcomes never committed.
        in_flight = await leased_by(victim)
        answered = {x.queue_id for x in hop.arrivals() if x.node == victim.name and x.answered < killed_at}
        await sending
        accepted = {message_id(seq) for seq in sent.accepted}
        await hop.wait_for(accepted, timeout=LEASE + MIN_BACKOFF + 20)
        await wait_queue_empty(postgres_dsn, 10)
        after_kill = time.monotonic() - killed_at
    arrivals = hop.arrivals()
    counts = Counter(x.message_id for x in arrivals)
    assert accepted - set(counts) == set()          # lost = 0
    assert sent.refused == {}
    # Only what a client sent is there (a transaction cut off by the kill may or may not
    # have been committed: then it is delivered too, once).
    assert set(counts) <= {message_id(seq) for seq in (*sent.accepted, *sent.unknown)}
    # A duplicate is allowed only for a message whose DATA the next hop had answered 250
    # to the victim before the kill while the victim's outcome for it was not committed
    # (its recipient still leased by the victim, read from the database right after the
    # kill): the victim died between the next hop's 250 and its commit, so the survivor
    # had to send it again (RFC 5321 §6.1: a duplicate rather than a loss). What the next
    # hop was still holding at the kill it refused (NextHop.declare_dead), so it may not
    # come twice; anything else twice is a bug.
    duplicates = {mid for mid, n in counts.items() if n > 1}
    may_repeat = answered & in_flight
    assert max(counts.values()) <= 2, counts.most_common(3)
    assert {x.queue_id for x in arrivals if x.message_id in duplicates} <= may_repeat
    assert len(duplicates) <= len(may_repeat)
    # The survivor delivered every recipient the victim held, once its lease ended: not
    # before (the victim renewed every lease/3, so each lease ran at least 2/3 of a
    # lease past the kill), and soon after (the survivor wakes at the lease's end).
    taken_over = [x for x in arrivals if x.queue_id in in_flight and x.node == survivor.name]
    assert {x.queue_id for x in taken_over} == in_flight
    first_taken_over = min(x.answered for x in taken_over) - killed_at
    assert LEASE * 2 / 3 - 0.1 <= first_taken_over <= LEASE + MIN_BACKOFF + 3.0
    # Within lease + backoff of the kill, plus the time to send the survivor's backlog.
    assert after_kill < LEASE + MIN_BACKOFF + 15
    print(f"\nkilled {victim.name} with {len(in_flight)} recipients leased ({len(may_repeat)} already answered "
          f"250); {len(sent.accepted)} accepted, {len(sent.unknown)} cut off, lost 0, duplicates "
          f"{len(duplicates)}; its first recipient taken over {first_taken_over:.2f} s after the kill, "
          f"everything delivered after {after_kill:.2f} s")


# ----------------------------------------------------------------- 2b. a slow next hop

@pytest.mark.timeout(45)
@pytest.mark.parametrize("delivery_process", ["yes", "no"])
async def test_a_delivery_longer_than_the_lease_is_renewed_not_taken_over(
        tmp_path: Path, postgres_dsn: str, dns_server: FakeDNS, peer_port: int, delivery_process: str) -> None:
    # The next hop takes longer than a lease to answer the end of DATA. The delivering
    # node renews its lease meanwhile (every lease/3), so the other node, idle, never
    # takes the recipient over: one copy arrives. Both ways of running a node: the queue
    # manager in its own process, and in the main process (MTA_DELIVERY_PROCESS=no, as on
    # a machine with one core).
    a, b = two_nodes(tmp_path, postgres_dsn, dns_server, peer_port, env={"MTA_DELIVERY_PROCESS": delivery_process})
    async with NextHop("127.0.0.2", peer_port, hold=LEASE + 1.0) as hop, nodes_running(a, b):
        assert queue_id(await send_message(a.smtp_port, 1))
        await hop.wait_for({message_id(1)}, timeout=LEASE + 5)
        # Empty: no other node holds it (one that took it over would hold its lease).
        await wait_queue_empty(postgres_dsn, LEASE + 5)
    [arrival] = hop.arrivals()   # once
    assert arrival.message_id == message_id(1)
    assert [*a.sent(), *b.sent()] == [(arrival.queue_id, "r1@example.test")]   # one status=sent line


# ----------------------------------------------------------------- 3. wake-ups

@pytest.mark.timeout(45)
async def test_mail_committed_on_one_node_wakes_the_other(
        tmp_path: Path, postgres_dsn: str, dns_server: FakeDNS, peer_port: int) -> None:
    # Two processes per node whatever the machine, so node A's queue manager can be
    # stopped on its own (SIGSTOP) while A keeps accepting: then only node B can
    # deliver, and only NOTIFY tells it there is mail (its poll is 1 s).
    a, b = two_nodes(tmp_path, postgres_dsn, dns_server, peer_port, env={"MTA_DELIVERY_PROCESS": "yes"})
    async with NextHop("127.0.0.2", peer_port) as hop, nodes_running(a, b):
        # Warm up both nodes' connections and DNS caches.
        for seq, node in ((0, a), (1, b)):
            assert queue_id(await send_message(node.smtp_port, seq))
        await hop.wait_for({message_id(0), message_id(1)}, timeout=10)
        await wait_queue_empty(postgres_dsn, 10)

        async def latency(node: Node, seq: int) -> tuple[float, str]:
            assert queue_id(await send_message(node.smtp_port, seq))
            committed = time.monotonic()   # the 250 came after the commit
            await hop.wait_for({message_id(seq)}, timeout=5)
            [arrival] = [x for x in hop.arrivals() if x.message_id == message_id(seq)]
            return arrival.answered - committed, arrival.node

        same_node = [await latency(b, seq) for seq in range(10, 18)]
        [delivery_a] = a.delivery_children()
        os.kill(delivery_a, signal.SIGSTOP)
        try:
            cross_node = [await latency(a, seq) for seq in range(20, 28)]
        finally:
            os.kill(delivery_a, signal.SIGCONT)
    assert {node for _, node in cross_node} == {NODE_B}
    cross = [t for t, _ in cross_node]
    same = [t for t, _ in same_node]
    print(f"\nfirst delivery after the 250: same node median {statistics.median(same) * 1000:.0f} ms "
          f"(max {max(same) * 1000:.0f}); other node median {statistics.median(cross) * 1000:.0f} ms "
          f"(max {max(cross) * 1000:.0f})")
    # Well under the 1 s poll: each one was woken by the other node's NOTIFY.
    assert max(cross) < 0.5, cross
    assert statistics.median(cross) < 0.25, cross


# ----------------------------------------------------------------- 4. mailboxes and POP3

def pop3_login(port: int, user: str) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        pop.user(user)
        pop.pass_(MAILBOX_USERS[user])
    except BaseException:
        pop.close()
        raise
    return pop


def pop3_fetch_all(port: int, user: str) -> list[bytes]:
    pop = pop3_login(port, user)
    try:
        return [b"".join(line + b"\r\n" for line in pop.retr(n)[1]) for n in range(1, pop.stat()[0] + 1)]
    finally:
        pop.quit()


LAB_MESSAGE = (b"From: ci@clients.lab.example\r\nTo: alice@lab.test\r\nSubject: across nodes\r\n"
               b"Message-ID: <pop3@clients.lab.example>\r\n\r\nhello\r\n.\r\n..two dots\r\nend\r\n")


@pytest.mark.timeout(45)
async def test_a_mailbox_written_through_one_node_is_read_and_locked_through_the_other(
        tmp_path: Path, postgres_dsn: str, dns_server: FakeDNS, peer_port: int) -> None:
    users = tmp_path / "mailboxes.users"
    write_users(users, MAILBOX_USERS)
    a, b = two_nodes(tmp_path, postgres_dsn, dns_server, peer_port, pop3=True, mailbox_users=users)
    async with nodes_running(a, b):
        reply = await transaction(a.smtp_port, "ci@clients.lab.example", ["alice@lab.test"], LAB_MESSAGE)
        qid = queue_id(reply)
        assert qid, reply

        async def on_b() -> list[bytes]:
            return await asyncio.to_thread(pop3_fetch_all, b.pop3_port, "alice@lab.test")

        [through_b] = await wait_until(on_b, 10, "alice's message readable over POP3 on node B")
        [through_a] = await asyncio.to_thread(pop3_fetch_all, a.pop3_port, "alice@lab.test")
        assert through_b == through_a
        # The sent bytes (un-stuffed) under the trace fields local delivery adds, the
        # Received: line naming node A, which accepted it.
        head, _, rest = through_b.partition(b"\r\n\r\n")
        assert through_b.startswith(b"Return-Path: <ci@clients.lab.example>\r\nX-Original-To: alice@lab.test\r\n"
                                    b"Delivered-To: alice@lab.test\r\nReceived: from client.clients.lab.example "
                                    b"(localhost [127.0.0.1])\r\n\tby node-a.lab.example (mta) with ESMTP id "
                                    + qid.encode() + b"\r\n")
        assert through_b.endswith(b"\r\n" + LAB_MESSAGE)
        [(stored,)] = await query(postgres_dsn, "SELECT data FROM mailbox_messages WHERE mailbox = 'alice@lab.test'")
        assert bytes(stored) == through_b

        # RFC 1939 §8's maildrop lock across nodes: a session on A holds it; B says IN-USE.
        holder = await asyncio.to_thread(pop3_login, a.pop3_port, "alice@lab.test")
        try:
            with pytest.raises(poplib.error_proto) as refused:
                await asyncio.to_thread(pop3_login, b.pop3_port, "alice@lab.test")
            assert refused.value.args[0] == b"-ERR [IN-USE] mailbox is locked by another POP3 session"
            # Another mailbox is not locked.
            assert await asyncio.to_thread(pop3_fetch_all, b.pop3_port, "bob@lab.test") == []
        finally:
            await asyncio.to_thread(holder.quit)
        # After A's QUIT, B logs in; its DELE+QUIT removes the message for A too.
        pop = await asyncio.to_thread(pop3_login, b.pop3_port, "alice@lab.test")
        assert await asyncio.to_thread(pop.stat) == (1, len(through_b))
        await asyncio.to_thread(pop.dele, 1)
        await asyncio.to_thread(pop.quit)
        assert await asyncio.to_thread(pop3_fetch_all, a.pop3_port, "alice@lab.test") == []
        assert await query(postgres_dsn, "SELECT id FROM mailbox_messages") == []


# ----------------------------------------------------------------- 5. the HTTP inbox

@pytest.mark.timeout(45)
async def test_events_and_the_inbox_api_across_nodes(
        tmp_path: Path, postgres_dsn: str, dns_server: FakeDNS, peer_port: int) -> None:
    users = tmp_path / "mailboxes.users"
    write_users(users, MAILBOX_USERS)
    a, b = two_nodes(tmp_path, postgres_dsn, dns_server, peer_port, http=True, mailbox_users=users,
                     env={"MTA_DELIVERY_PROCESS": "yes"})
    async with nodes_running(a, b), aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session, \
            session.ws_connect(b.http_base + "/api/events") as ws:
        # Node B's queue manager stopped: node A accepts the mail and delivers it to the mailbox.
        [delivery_b] = b.delivery_children()
        os.kill(delivery_b, signal.SIGSTOP)
        try:
            qid = queue_id(await transaction(a.smtp_port, "ci@clients.lab.example", ["alice@lab.test"],
                                             LAB_MESSAGE))
            assert qid
            message = await ws.receive(timeout=10)
        finally:
            os.kill(delivery_b, signal.SIGCONT)
        assert message.type == aiohttp.WSMsgType.TEXT, message
        new = json.loads(message.data)
        assert (qid, "alice@lab.test") in a.sent() and b.sent() == []
        on_a = await a.api_json("/api/v1/messages")
        on_b = await b.api_json("/api/v1/messages")
        assert on_a == on_b
        [summary] = on_b["messages"]
        assert new == {"Type": "new", "Data": summary}
        assert (summary["Subject"], summary["Mailboxes"], summary["MessageID"]) == (
            "across nodes", ["alice@lab.test"], "pop3@clients.lab.example")
        one_a = await a.api_json(f"/api/v1/message/{summary['ID']}")
        one_b = await b.api_json(f"/api/v1/message/{summary['ID']}")
        assert one_a == one_b


# ----------------------------------------------------------------- 6. the database restarted

@pytest.mark.timeout(90)
async def test_database_restarted_under_load_nothing_250d_is_lost(
        tmp_path: Path, postgres_cluster: Cluster, postgres_dsn: str, dns_server: FakeDNS,
        peer_port: int) -> None:
    a, b = two_nodes(tmp_path, postgres_dsn, dns_server, peer_port)
    sent = Sent()
    replied_at: dict[int, tuple[float, Node]] = {}
    seqs = itertools.count()
    stop = asyncio.Event()
    go = asyncio.Event()       # cleared: the clients pause
    sending = 0                # transactions under way

    async def client() -> None:
        nonlocal sending
        while not stop.is_set():
            await go.wait()
            seq = next(seqs)
            node = (a, b)[seq % 2]
            sending += 1
            sent.record(seq, await send_message(node.smtp_port, seq))
            sending -= 1
            replied_at[seq] = (time.monotonic(), node)
            if seq not in sent.accepted:
                await asyncio.sleep(0.05)   # a client backs off a little after a 4xx

    def accepted_since(since: float, node: Node) -> bool:
        return any(t > since and n is node and seq in sent.accepted for seq, (t, n) in replied_at.items())

    async with NextHop("127.0.0.2", peer_port, hold=0.05) as hop, nodes_running(a, b):
        go.set()
        clients = asyncio.gather(*(client() for _ in range(10)))
        await wait_until(lambda: len(sent.accepted) >= 50, 15, "50 messages accepted")

        # Down: stopped ("fast" ends every session), kept down while clients send.
        down_from = time.monotonic()
        await asyncio.to_thread(postgres_cluster.stop, "fast")
        await wait_until(lambda: len(sent.refused) >= 10, 15, "clients refused while the database is down")
        for node in (a, b):
            status, body = await node.healthz()
            assert status == 503 and "database: PostgreSQL: " in body, (node.name, status, body)
        # Back while the clients pause: /healthz says so by itself (a balancer that sends
        # no traffic to an unhealthy node would otherwise never see it recover).
        go.clear()
        await wait_until(lambda: sending == 0, 30, "the clients' transactions ended")
        await asyncio.to_thread(postgres_cluster.start)
        up_at = time.monotonic()
        for node in (a, b):
            await wait_until(lambda node=node: _healthy(node), 5,
                             lambda node=node: f"{node.name} /healthz 200 with the database back:\n{node.log_tail()}")
        go.set()
        for node in (a, b):    # each accepts again, without a restart
            await wait_until(lambda node=node: accepted_since(up_at, node), 15, f"{node.name} accepts again")

        # `pg_ctl restart` while clients keep sending.
        restart_from = time.monotonic()
        await asyncio.to_thread(postgres_cluster.restart)
        restart_done = time.monotonic()
        for node in (a, b):
            await wait_until(lambda node=node: accepted_since(restart_done, node), 15,
                             f"{node.name} accepts after pg_ctl restart")
        stop.set()
        await clients

        accepted = {message_id(seq) for seq in sent.accepted}
        await hop.wait_for(accepted, timeout=LEASE + MIN_BACKOFF + 20)
        await wait_queue_empty(postgres_dsn, 15)
        for node in (a, b):
            await wait_until(lambda node=node: _healthy(node), 10,
                             lambda node=node: f"{node.name} /healthz 200 after pg_ctl restart:\n{node.log_tail()}")
    # What the clients were told: 451 4.3.0 while the database was away (or its restart
    # had just broken a pooled connection), never a hang, never another reply.
    outage = [(down_from, up_at + 1.0), (restart_from, restart_done + 1.0)]

    def in_outage(moment: float, before: float = 0.0) -> bool:
        return any(start - before <= moment <= end for start, end in outage)

    assert sent.unknown == set()
    assert sent.refused and all(reply.startswith("451 4.3.0 ") for reply in sent.refused.values()), \
        Counter(sent.refused.values()).most_common(5)
    assert all(in_outage(replied_at[seq][0]) for seq in sent.refused)
    arrivals = hop.arrivals()
    counts = Counter(x.message_id for x in arrivals)
    assert accepted <= set(counts)                                   # lost = 0
    # A 451 whose COMMIT had in fact reached the server as the connection broke: the
    # message goes out although the client will send it again (RFC 5321 §4.1.1.4 allows
    # a duplicate, never a loss). Only for a transaction the outage cut off.
    refused_but_sent = {seq for seq in sent.refused if message_id(seq) in counts}
    assert set(counts) <= accepted | {message_id(seq) for seq in refused_but_sent}
    # A duplicate only where a node's outcome could not be committed: the next hop's 250
    # came while the database was going down or away (its hold before that included).
    duplicates = {mid for mid, n in counts.items() if n > 1}
    for mid in duplicates:
        first = min(x.answered for x in arrivals if x.message_id == mid)
        assert in_outage(first, before=1.0), mid
    print(f"\n{len(sent.accepted)} accepted, {len(sent.refused)} refused with 451 while the database was down "
          f"({len(refused_but_sent)} of them committed all the same), lost 0, duplicates {len(duplicates)}; down {up_at - down_from:.2f} s, "
          f"pg_ctl restart {restart_done - restart_from:.2f} s")


async def _healthy(node: Node) -> bool:
    return (await node.healthz())[0] == 200


# ----------------------------------------------------------------- 7. the queue CLI and metrics

@pytest.mark.timeout(60)
async def test_queue_cli_on_the_shared_database_while_both_nodes_run(
        tmp_path: Path, postgres_dsn: str, dns_server: FakeDNS, peer_port: int, write_config: Any) -> None:
    a, b = two_nodes(tmp_path, postgres_dsn, dns_server, peer_port)
    # A third config on the same database, as an operator's machine would have.
    cli = write_config({"hostname": "ops.lab.example", "queue": {"backend": "postgresql", "dsn": postgres_dsn}},
                       "ops.yaml")
    refusing = True

    def next_hop(verb: str, arg: str, conn: Any) -> str | None:
        return "451 4.3.2 try later" if refusing and verb == "RCPT" else None

    async def gauges(node: Node) -> dict[str, float]:
        return await node.metrics("mta_queue_messages{")

    async with NextHop("127.0.0.2", peer_port) as hop, nodes_running(a, b):
        hop.peer.replies = next_hop
        qids = [queue_id(await send_message(node.smtp_port, seq)) for seq, node in enumerate((a, b, a))]
        assert all(qids)

        async def all_deferred() -> bool:
            rows = await query(postgres_dsn, "SELECT state, attempts FROM recipients")
            return len(rows) == 3 and all(state == "deferred" and n >= 1 for state, n in rows)

        await wait_until(all_deferred, 10, "three deferred messages")
        done = await asyncio.to_thread(mta_cli, cli, "queue", "hold", *qids)
        assert done.returncode == 0, done.stderr
        done = await asyncio.to_thread(mta_cli, cli, "queue", "list", "--json")
        assert done.returncode == 0, done.stderr
        listed = [json.loads(line) for line in done.stdout.splitlines()]
        assert sorted(e["queue_id"] for e in listed) == sorted(qids)
        assert {e["queue_name"] for e in listed} == {"hold"}
        assert {r["state"] for e in listed for r in e["recipients"]} == {"held"}
        # The gauges read the database: the same on both nodes.
        held = {'mta_queue_messages{state="active"}': 0.0, 'mta_queue_messages{state="deferred"}': 0.0,
                'mta_queue_messages{state="hold"}': 3.0}
        assert await gauges(a) == await gauges(b) == held

        refusing = False
        done = await asyncio.to_thread(mta_cli, cli, "queue", "release", qids[0])
        assert done.returncode == 0, done.stderr
        await hop.wait_for({message_id(0)}, timeout=5)    # released: due now, on some node
        await wait_until(lambda: _gone(postgres_dsn, qids[0]), 5, "the released message gone from the queue")
        assert await gauges(a) == await gauges(b) == {**held, 'mta_queue_messages{state="hold"}': 2.0}
        done = await asyncio.to_thread(mta_cli, cli, "queue", "release", *qids[1:])
        assert done.returncode == 0, done.stderr
        await hop.wait_for({message_id(1), message_id(2)}, timeout=5)
        await wait_queue_empty(postgres_dsn, 10)
        done = await asyncio.to_thread(mta_cli, cli, "queue", "list")
        assert (done.returncode, done.stdout) == (0, "Mail queue is empty\n"), done
        assert await gauges(a) == await gauges(b) == {**held, 'mta_queue_messages{state="hold"}': 0.0}
    assert Counter(x.message_id for x in hop.arrivals()) == Counter(message_id(seq) for seq in range(3))


async def _gone(dsn: str, qid: str) -> bool:
    return await query(dsn, "SELECT 1 FROM messages WHERE id = $1", qid) == []
