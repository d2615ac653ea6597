"""Store and forward end to end: SMTP in, the queue manager, DNS on loopback, SMTP out.

The daemon runs in-process (listeners, SQLite queue, scheduler, router, pool);
next hops are RecordingPeers on 127.0.0.2, 127.0.0.3, … found through a real
DNS server on loopback. Assertions are on the peers' transcripts and bytes,
and on the queue's rows.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

import pytest

from tests.support.fakedns import mx
from tests.support.in_process import DEFAULT_CONTENT as CONTENT
from tests.support.in_process import queue_rows, running, submit
from tests.support.smtp_peer import END_OF_DATA, RecordingPeer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

async def test_one_message_relayed_with_envelope_and_body_intact(relay_config, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    config = relay_config()
    async with RecordingPeer("127.0.0.2", peer_port) as peer, running(config, deliver=True):
        queue_id = await submit(config, ["bob@example.test"])
        [message] = await peer.wait_for_messages(1)
        await wait_until(lambda: queue_rows(config) == [])
    assert message.sender == "lab@lab.test" and message.rcpts == ["bob@example.test"]
    assert message.data.startswith(b"Received: from client.test (localhost [127.0.0.1])\r\n")
    assert f"with ESMTP id {queue_id}".encode() in message.data
    # Un-stuffed by us, stuffed again on the way out, un-stuffed by the peer: the same bytes.
    assert message.data.endswith(b"\r\n" + CONTENT)
    [conn] = peer.connections
    assert conn.verbs[:4] == ["EHLO", "MAIL", "RCPT", "DATA"]
    assert conn.transcript[0] == "EHLO relay.lab.test"
    assert conn.transcript[1] == f"MAIL FROM:<lab@lab.test> SIZE={len(message.data)}"
    # PIPELINING (RFC 2920): MAIL, RCPT and DATA arrived in one read.
    assert [f"MAIL FROM:<lab@lab.test> SIZE={len(message.data)}", "RCPT TO:<bob@example.test>", "DATA"] \
        in conn.batches


async def test_ten_messages_share_one_connection_with_rset_and_quit(relay_config, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    config = relay_config(connection_cache={"idle_timeout": "0.5s"}, per_destination_concurrency=1)
    async with RecordingPeer("127.0.0.2", peer_port) as peer, running(config, deliver=True) as app:
        for i in range(10):
            await submit(config, [f"user{i}@example.test"])
        await peer.wait_for_messages(10, timeout=10)
        await peer.wait_finished(timeout=5)  # closed by the idle timeout, not by us stopping
        assert app.pool.reused >= 1
    verbs = [v for conn in peer.connections for v in conn.verbs]
    assert len(peer.connections) <= 2  # the first message may have left before the rest arrived
    for conn in peer.connections:
        v = conn.verbs
        assert v[0] == "EHLO" and v[-1] == "QUIT"
        transactions = [v[i:i + 3] for i in range(1, len(v) - 1) if v[i] == "MAIL"]
        assert all(t == ["MAIL", "RCPT", "DATA"] for t in transactions)
        # Between two transactions on one connection: exactly one RSET (Postfix's cache semantics).
        body = v[1:-1]
        expected = []
        for n in range(len(transactions)):
            expected += (["RSET"] if n else []) + ["MAIL", "RCPT", "DATA"]
        assert body == expected
        # RFC 2920 3.1: the RSET travels in the same write as the next MAIL, RCPT and DATA.
        batches = [[line.split(" ")[0] for line in b] for b in conn.batches]
        assert all(b == ["RSET", "MAIL", "RCPT", "DATA"] for b in batches if "RSET" in b), batches
    assert verbs.count("MAIL") == 10 and verbs.count("QUIT") == len(peer.connections)
    assert sorted(m.rcpts[0] for m in peer.messages) == sorted(f"user{i}@example.test" for i in range(10))


async def test_quit_after_550_and_recipient_bounced(relay_config, dns_server, peer_port, caplog):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))

    def refuse(verb, arg, conn):
        return "550 5.1.1 <nobody@example.test>: Recipient address rejected" if verb == "RCPT" else None

    config = relay_config(connection_cache={"idle_timeout": "0.3s"})
    caplog.set_level(logging.INFO, logger="mta")
    async with RecordingPeer("127.0.0.2", peer_port, replies=refuse) as peer, running(config, deliver=True):
        queue_id = await submit(config, ["nobody@example.test"])
        await wait_until(lambda: queue_rows(config) == [])
        await peer.wait_finished()
    [conn] = peer.connections
    assert conn.verbs[:3] == ["EHLO", "MAIL", "RCPT"] and conn.verbs[-1] == "QUIT"
    assert peer.messages == []
    assert (f"{queue_id}: to=<nobody@example.test>, relay=mx1.example.test[127.0.0.2]:{peer_port}, "
            in caplog.text)
    assert ("dsn=5.1.1, status=bounced (550 5.1.1 <nobody@example.test>: Recipient address rejected)"
            in caplog.text)


async def test_451_twice_then_delivered_once_with_growing_gaps(relay_config, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    attempts: list[float] = []

    def flaky(verb, arg, conn):
        if verb == END_OF_DATA:
            attempts.append(time.monotonic())
            if len(attempts) <= 2:
                return "451 4.3.0 Try again later"
        return None

    config = relay_config(retry={"min_backoff": "0.4s", "max_backoff": "10s"}, connection_cache={"idle_timeout": "0.1s"})
    async with RecordingPeer("127.0.0.2", peer_port, replies=flaky) as peer, running(config, deliver=True):
        queue_id = await submit(config, ["bob@example.test"])
        await wait_until(lambda: len(attempts) >= 1)
        seen: list = []   # the rows as read by the check that succeeded (one read per check)

        def deferred_once():
            seen[:] = queue_rows(config)
            return len(seen) == 1 and seen[0][2] == "deferred"

        await wait_until(deferred_once)
        [(mid, _, state, tries, last_error)] = seen
        assert (mid, state, tries, last_error) == (queue_id, "deferred", 1, "451 4.3.0 Try again later")
        await peer.wait_for_messages(1, timeout=15)
        await wait_until(lambda: queue_rows(config) == [])
        await asyncio.sleep(1.0)  # nothing more is sent after success
        await peer.wait_finished()
    assert len(attempts) == 3
    assert len(peer.messages) == 1
    first_gap, second_gap = attempts[1] - attempts[0], attempts[2] - attempts[1]
    assert 0.3 <= first_gap < second_gap  # 0.4 s then 0.8 s (±10% jitter)
    assert all(conn.verbs[-1] == "QUIT" for conn in peer.connections)


async def test_mx_preference_order_and_fallback(relay_config, dns_server, peer_port):
    mx(dns_server, "example.test", (20, "mx2.example.test", "127.0.0.3"), (10, "mx1.example.test", "127.0.0.2"))
    config = relay_config()
    first = RecordingPeer("127.0.0.2", peer_port, greeting="421 4.3.2 mx1 is busy")
    async with first, RecordingPeer("127.0.0.3", peer_port) as second, running(config, deliver=True):
        await submit(config, ["bob@example.test"])
        await second.wait_for_messages(1)
        await wait_until(lambda: queue_rows(config) == [])
    # The lower preference was tried first; its 421 sent us on to the next MX.
    assert len(first.connections) == 1 and first.messages == []
    assert [m.rcpts for m in second.messages] == [["bob@example.test"]]


async def test_connection_refused_falls_back(relay_config, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"), (20, "mx2.example.test", "127.0.0.3"))
    config = relay_config()
    async with RecordingPeer("127.0.0.2", peer_port, refuse=True), RecordingPeer("127.0.0.3", peer_port) as second, \
            running(config, deliver=True):
        await submit(config, ["bob@example.test"])
        await second.wait_for_messages(1)


async def test_5xx_at_mail_stops_the_search(relay_config, dns_server, peer_port, caplog):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"), (20, "mx2.example.test", "127.0.0.3"))

    def no(verb, arg, conn):
        return "554 5.7.1 Sender refused" if verb == "MAIL" else None

    caplog.set_level(logging.INFO, logger="mta")
    config = relay_config(connection_cache={"idle_timeout": "0.2s"})
    async with RecordingPeer("127.0.0.2", peer_port, replies=no) as first, RecordingPeer("127.0.0.3", peer_port) as second, \
            running(config, deliver=True):
        await submit(config, ["bob@example.test"])
        await wait_until(lambda: queue_rows(config) == [])
        await first.wait_finished()
    assert second.connections == []
    assert first.connections[0].verbs[-1] == "QUIT"
    assert "status=bounced (554 5.7.1 Sender refused)" in caplog.text


async def test_implicit_mx(relay_config, dns_server, peer_port):
    dns_server.zones["plain.test"] = {"A": ["127.0.0.3"]}
    config = relay_config()
    async with RecordingPeer("127.0.0.3", peer_port) as peer, running(config, deliver=True):
        await submit(config, ["bob@plain.test"])
        await peer.wait_for_messages(1)


@pytest.mark.parametrize("zone, reply", [
    ({"MX": [(0, ".")]}, "556 5.1.10"),
    (None, "550 5.1.2"),
])
async def test_null_mx_and_nxdomain_bounce_at_once(relay_config, dns_server, zone, reply, caplog):
    if zone is not None:
        dns_server.zones["nomail.test"] = zone
    caplog.set_level(logging.INFO, logger="mta")
    config = relay_config()
    async with running(config, deliver=True):
        await submit(config, ["bob@nomail.test"])
        await wait_until(lambda: queue_rows(config) == [])
    assert f"status=bounced ({reply}" in caplog.text


async def test_servfail_defers(relay_config, dns_server):
    dns_server.zones["broken.test"] = "SERVFAIL"
    config = relay_config()
    async with running(config, deliver=True):
        await submit(config, ["bob@broken.test"])
        await wait_until(lambda: queue_rows(config)[0][2] == "deferred")
    [(_, _, state, attempts, error)] = queue_rows(config)
    assert state == "deferred" and attempts == 1 and error.startswith("451 4.4.3")


async def test_mixed_recipient_results(relay_config, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))

    def per_rcpt(verb, arg, conn):
        if verb == "RCPT" and "temp" in arg:
            return "452 4.2.2 Mailbox full"
        if verb == "RCPT" and "gone" in arg:
            return "550 5.1.1 No such user"
        return None

    config = relay_config()
    async with RecordingPeer("127.0.0.2", peer_port, replies=per_rcpt) as peer, running(config, deliver=True):
        await submit(config, ["ok@example.test", "temp@example.test", "gone@example.test"])
        [message] = await peer.wait_for_messages(1)
        # One read per check: two reads could straddle the commit that records the
        # outcomes and queues the bounce (which then goes, undeliverable, to lab.test).
        def settled():
            rows = queue_rows(config)
            return len(rows) == 3 and rows[1][2] == "deferred"

        await wait_until(settled)
        rows = queue_rows(config)
    assert message.rcpts == ["ok@example.test"]
    assert [(r[1], r[2], r[4]) for r in rows] == [
        ("ok@example.test", "delivered", None),
        ("temp@example.test", "deferred", "452 4.2.2 Mailbox full"),
        ("gone@example.test", "bounced", "550 5.1.1 No such user"),
    ]


async def test_smarthost_gets_everything_without_dns(make_config, dns_server, peer_port):
    config = make_config(delivery={"smarthost": f"127.0.0.4:{peer_port}",
                                   "dns": {"nameservers": ["127.0.0.1"], "port": dns_server.port}})
    async with RecordingPeer("127.0.0.4", peer_port) as peer, running(config, deliver=True):
        await submit(config, ["a@one.test", "b@two.test"])
        [message] = await peer.wait_for_messages(1)
    assert sorted(message.rcpts) == ["a@one.test", "b@two.test"]
    assert dns_server.queries == {} or sum(dns_server.queries.values()) == 0


async def test_routes_send_a_domain_elsewhere(relay_config, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    config = relay_config(routes={"routed.test": f"127.0.0.3:{peer_port}"})
    async with RecordingPeer("127.0.0.2", peer_port) as mx_peer, RecordingPeer("127.0.0.3", peer_port) as routed, \
            running(config, deliver=True):
        await submit(config, ["a@routed.test", "b@example.test"])
        await routed.wait_for_messages(1)
        await mx_peer.wait_for_messages(1)
    assert routed.messages[0].rcpts == ["a@routed.test"]
    assert mx_peer.messages[0].rcpts == ["b@example.test"]


async def test_routes_win_over_the_smarthost(make_config, dns_server, peer_port):
    """Postfix: transport_maps before relayhost. The routed domain goes to its route,
    everything else to the smarthost; DNS is asked nothing."""
    config = make_config(delivery={"smarthost": f"127.0.0.4:{peer_port}", "routes": {"routed.test": f"127.0.0.3:{peer_port}"},
                                   "dns": {"nameservers": ["127.0.0.1"], "port": dns_server.port}})
    async with RecordingPeer("127.0.0.4", peer_port) as smarthost, RecordingPeer("127.0.0.3", peer_port) as routed, \
            running(config, deliver=True):
        await submit(config, ["a@routed.test", "b@elsewhere.test"])
        await routed.wait_for_messages(1)
        await smarthost.wait_for_messages(1)
    assert [m.rcpts for m in routed.messages] == [["a@routed.test"]]
    assert [m.rcpts for m in smarthost.messages] == [["b@elsewhere.test"]]
    assert sum(dns_server.queries.values()) == 0


async def test_route_to_our_own_listener_is_a_loop(make_config, caplog):
    from tests.support.ports import free_port as free
    own = free()
    caplog.set_level(logging.INFO, logger="mta")
    config = make_config(listeners=[{"name": "mta", "address": f"127.0.0.1:{own}", "mode": "relay"}],
                         delivery={"routes": {"loop.test": f"127.0.0.1:{own}"}})
    async with running(config, deliver=True):
        await submit(config, ["x@loop.test"])
        await wait_until(lambda: queue_rows(config) == [])
    assert "dsn=5.4.6, status=bounced (554 5.4.6" in caplog.text
    with sqlite3.connect(config.queue.path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


async def test_quit_on_shutdown(relay_config, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    config = relay_config(connection_cache={"idle_timeout": "60s"})
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        async with running(config, deliver=True):
            await submit(config, ["bob@example.test"])
            await peer.wait_for_messages(1)
            await asyncio.sleep(0.2)
            assert peer.connections[0].verbs[-1] == "DATA"  # still cached, idle
        await peer.wait_finished()
    assert peer.connections[0].verbs[-1] == "QUIT"


async def test_quit_after_451_at_greeting_and_retry_later(relay_config, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    config = relay_config()
    async with RecordingPeer("127.0.0.2", peer_port, greeting="451 4.3.2 not now") as peer, \
            running(config, deliver=True):
        await submit(config, ["bob@example.test"])
        await wait_until(lambda: queue_rows(config)[0][2] == "deferred")
        await peer.wait_finished()
    assert peer.connections[0].transcript == ["QUIT"]
    assert queue_rows(config)[0][4].startswith("451 4.3.2 not now")


async def test_crash_recovery_makes_in_flight_recipients_due(relay_config, dns_server, peer_port):
    """A recipient left 'active' by a killed daemon is delivered after restart."""
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    config = relay_config()
    async with running(config) as app:  # accept only
        queue_id = await submit(config, ["bob@example.test"])
        claimed = (await app.store.queue.claim(time.time(), 10)).due
        assert [c.message_id for c in claimed] == [queue_id]
    assert queue_rows(config)[0][2] == "active"  # as a SIGKILL would leave it
    async with RecordingPeer("127.0.0.2", peer_port) as peer, running(config, deliver=True):
        await peer.wait_for_messages(1)
        await wait_until(lambda: queue_rows(config) == [])
    assert len(peer.messages) == 1


async def test_backlog_of_deferred_mail_does_not_delay_fresh_mail(relay_config, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    config = relay_config()
    async with running(config) as app:
        for i in range(300):  # a backlog: deferred, not due for an hour
            await submit(config, [f"old{i}@slow.test"])
        await app.store.engine.db.execute("UPDATE recipients SET state='deferred', attempts=1, next_attempt=?",
                                   (time.time() + 3600,))
    async with RecordingPeer("127.0.0.2", peer_port) as peer, running(config, deliver=True):
        start = time.monotonic()
        await submit(config, ["fresh@example.test"])
        await peer.wait_for_messages(1)
        elapsed = time.monotonic() - start
    assert elapsed < 2.0
    assert sum(1 for row in queue_rows(config) if row[2] == "deferred") == 300
