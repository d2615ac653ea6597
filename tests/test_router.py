"""mta.delivery.router: next-hop choice, fallback, reuse and loops, on real sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from mta.config import ConnectionCacheConfig, DeliveryConfig, DNSConfig, SmarthostConfig, TimeoutsConfig
from mta.delivery.mx import MXHost, MXResolver
from mta.delivery.pool import ConnectionPool
from mta.delivery.router import Delivery, Outcome, Router
from mta.errors import PermanentError, TransientError
from mta.model import Reply
from tests.support.ports import PEER_HOSTS, free_port, free_port_all
from tests.support.smtp_peer import RecordingPeer

pytestmark = pytest.mark.timeout(10)

BODY = b"From: a@sender.test\r\nSubject: hi\r\n\r\nHello.\r\n"
MX1 = "mx1.example.test"
MX2 = "mx2.example.test"


class StubResolver:
    """MXResolver's interface, answering from dicts; records what was asked."""

    def __init__(self, mx: dict[str, list[MXHost] | Exception] | None = None,
                 hosts: dict[str, tuple[str, ...]] | None = None):
        self.mx = mx or {}
        self.hosts = hosts or {}
        self.asked: list[str] = []

    async def resolve(self, domain: str) -> list[MXHost]:
        self.asked.append(domain)
        answer = self.mx[domain]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def resolve_host(self, name: str) -> tuple[str, ...]:
        self.asked.append(name)
        if re.fullmatch(r"[\d.]+", name):
            return (name,)
        return self.hosts.get(name, ())


def two_mx(first: str = "127.0.0.2", second: str = "127.0.0.3") -> StubResolver:
    return StubResolver({"example.test": [MXHost(MX1, 10, (first,)), MXHost(MX2, 20, (second,))]})


def make_router(port: int, resolver: StubResolver, *, own: Iterable[tuple[str, int]] = (),
                **config: object) -> Router:
    cfg = DeliveryConfig(port=port, timeouts=TimeoutsConfig(connect=2.0, command=2.0),
                         connection_cache=ConnectionCacheConfig(max_messages=100, idle_timeout=5.0),
                         **config)  # type: ignore[arg-type]
    pool = ConnectionPool(max_messages=cfg.connection_cache.max_messages,
                          idle_timeout=cfg.connection_cache.idle_timeout, per_destination=4,
                          max_idle_total=20)
    return Router(cfg, "relay.test", resolver, pool, frozenset(own))  # type: ignore[arg-type]


def delivery(*recipients: str, n: int = 1) -> Delivery:
    return Delivery(message_id=f"M{n}", sender="a@sender.test", recipients=recipients, data=BODY)


def codes(outcomes: list[Outcome]) -> dict[str, int]:
    return {o.recipient: o.reply.code for o in outcomes}


async def test_mx_preference_order_first_host_wins() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port) as p2, RecordingPeer("127.0.0.3", port) as p3:
        router = make_router(port, two_mx("127.0.0.3", "127.0.0.2"))
        outcomes = await router.deliver(delivery("u@example.test", "v@EXAMPLE.test"))
        await router.close()
        await p3.wait_finished()
    assert [o.delivered for o in outcomes] == [True, True]
    assert {o.relay for o in outcomes} == {f"{MX1}[127.0.0.3]:{port}"}
    assert p2.connections == []
    assert p3.connections[0].verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert p3.messages[0].data == BODY


async def test_4xx_greeting_is_quit_and_next_host_used() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, greeting="451 4.3.2 Try again later") as p2, \
            RecordingPeer("127.0.0.3", port):
        router = make_router(port, two_mx())
        outcomes = await router.deliver(delivery("u@example.test"))
        await router.close()
        await p2.wait_finished()
    assert outcomes[0].delivered and outcomes[0].relay == f"{MX2}[127.0.0.3]:{port}"
    assert p2.connections[0].verbs == ["QUIT"]
    assert router.pool.opened == 1   # the refused session never counted nor cached


async def test_421_at_ehlo_moves_on() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, replies=lambda v, a, c: "421 4.7.0 Bye" if v == "EHLO"
                             else None) as p2, RecordingPeer("127.0.0.3", port) as p3:
        router = make_router(port, two_mx())
        outcomes = await router.deliver(delivery("u@example.test"))
        await router.close()
    assert outcomes[0].delivered
    assert p2.connections[0].verbs == ["EHLO"] and len(p3.messages) == 1


async def test_connection_refused_moves_to_second_host() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, refuse=True), RecordingPeer("127.0.0.3", port) as p3:
        router = make_router(port, two_mx())
        outcomes = await router.deliver(delivery("u@example.test"))
        await router.close()
    assert outcomes[0].delivered and len(p3.messages) == 1


async def test_every_host_failing_gives_the_last_error() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, refuse=True), RecordingPeer("127.0.0.3", port, refuse=True):
        router = make_router(port, two_mx())
        outcomes = await router.deliver(delivery("u@example.test", "v@example.test"))
        await router.close()
    for outcome in outcomes:
        assert not outcome.delivered and outcome.reply.transient
        assert outcome.reply.enhanced == "4.4.1"
        assert outcome.reply.text == f"connect to {MX2}[127.0.0.3]:{port}: Connection refused"
        assert outcome.relay == "none"


async def test_5xx_at_mail_stops_fallback_and_session_is_reused_after_rset() -> None:
    port = free_port_all(PEER_HOSTS)
    reject_first = lambda v, a, c: "550 5.7.1 Sender blocked" if v == "MAIL" and c.peer.counts["MAIL"] == 1 \
        else None  # noqa: E731
    async with RecordingPeer("127.0.0.2", port, replies=reject_first) as p2, \
            RecordingPeer("127.0.0.3", port) as p3:
        router = make_router(port, two_mx())
        outcomes = await router.deliver(delivery("u@example.test", "v@example.test"))
        assert [o.reply for o in outcomes] == [Reply(550, "5.7.1", "Sender blocked")] * 2
        assert outcomes[0].relay == f"{MX1}[127.0.0.2]:{port}"
        second = await router.deliver(delivery("u@example.test", n=2))
        assert second[0].delivered
        await router.close()
        await p2.wait_finished()
    assert p3.connections == []
    # One connection: the refused transaction, RSET before reuse, then QUIT at close.
    assert p2.connections[0].verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "RSET", "MAIL", "RCPT",
                                       "DATA", "QUIT"]
    assert router.pool.reused == 1


async def test_rset_is_pipelined_and_a_failed_rset_retries_on_a_new_connection() -> None:
    """RSET goes in the same write as MAIL, RCPT and DATA (RFC 2920 3.1); a cached
    session whose RSET is refused is dropped and the message goes on a fresh one."""
    port = free_port_all(PEER_HOSTS)
    refuse_second_rset = lambda v, a, c: "421 4.3.2 Shutting down" if v == "RSET" and c.peer.counts["RSET"] == 2 \
        else None  # noqa: E731
    async with RecordingPeer("127.0.0.2", port, replies=refuse_second_rset) as p2:
        router = make_router(port, two_mx())
        for n in range(3):
            [outcome] = await router.deliver(delivery("u@example.test", n=n))
            assert outcome.delivered, outcome
        await router.close()
        await p2.wait_finished()
    first, second = p2.connections
    # The peer hung up after its 421, leaving the rest of that write unread.
    assert first.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "RSET"]
    assert ["RSET", "MAIL", "RCPT", "DATA"] in [[line.split(" ")[0] for line in b] for b in first.batches]
    assert first.closed_by_peer
    assert second.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert len(p2.messages) == 3
    assert router.pool.reused == 2 and router.pool.opened == 2


async def test_4xx_at_mail_moves_on() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, replies=lambda v, a, c: "451 4.3.0 Busy" if v == "MAIL"
                             else None) as p2, RecordingPeer("127.0.0.3", port) as p3:
        router = make_router(port, two_mx())
        outcomes = await router.deliver(delivery("u@example.test"))
        await router.close()
    assert outcomes[0].delivered and outcomes[0].relay.startswith(MX2)
    assert p2.messages == [] and len(p3.messages) == 1


async def test_5xx_greeting_moves_on_to_the_next_mx() -> None:
    # A 554 greeting refuses service, not the mail (RFC 5321 3.1): like Postfix
    # (smtp_skip_5xx_greeting = yes) the next MX gets the message.
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, greeting="554 5.7.1 No service") as p2, \
            RecordingPeer("127.0.0.3", port) as p3:
        router = make_router(port, two_mx())
        outcomes = await router.deliver(delivery("u@example.test"))
        await router.close()
        await p2.wait_finished()
    assert outcomes[0].delivered and outcomes[0].relay.startswith(MX2)
    assert p2.connections[0].verbs == ["QUIT"] and len(p3.messages) == 1


async def test_5xx_greeting_from_every_mx_defers() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, greeting="554 5.7.1 No service") as p2, \
            RecordingPeer("127.0.0.3", port, greeting="554 No service here either") as p3:
        router = make_router(port, two_mx())
        outcomes = await router.deliver(delivery("u@example.test"))
        await router.close()
    assert outcomes[0].reply == Reply(
        450, "4.0.0", f"host {MX2}[127.0.0.3] refused to talk to me: 554 5.0.0 No service here either")
    assert not outcomes[0].reply.permanent
    assert p2.connections[0].verbs == ["QUIT"] and p3.connections[0].verbs == ["QUIT"]


async def test_mixed_recipient_results() -> None:
    def replies(verb: str, arg: str, conn: object) -> str | None:
        if verb == "RCPT" and "nobody" in arg:
            return "550 5.1.1 User unknown"
        if verb == "RCPT" and "later" in arg:
            return "450 4.2.1 Try later"
        return None

    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, replies=replies) as p2, RecordingPeer("127.0.0.3", port) as p3:
        router = make_router(port, two_mx())
        outcomes = await router.deliver(delivery("ok@example.test", "nobody@example.test",
                                                 "later@example.test"))
        await router.close()
    assert codes(outcomes) == {"ok@example.test": 250, "nobody@example.test": 550, "later@example.test": 450}
    assert p3.connections == []   # RCPT results are final: no fallback
    assert p2.messages[0].rcpts == ["ok@example.test"]


async def test_smarthost_with_auth() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, auth={"relayuser": "pa55"}) as peer:
        resolver = StubResolver()
        router = make_router(25, resolver, smarthost=SmarthostConfig("127.0.0.2", port, "relayuser", "pa55"))
        assert router.destination("u@anywhere.test") == f"smarthost:127.0.0.2:{port}"
        outcomes = await router.deliver(delivery("u@anywhere.test", "v@elsewhere.test"))
        await router.close()
    assert all(o.delivered for o in outcomes)
    assert resolver.asked == ["127.0.0.2"]   # no MX lookup
    conn = peer.connections[0]
    assert conn.auth_user == "relayuser"
    assert conn.verbs == ["EHLO", "AUTH", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]


async def test_smarthost_wrong_password_defers() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, auth={"relayuser": "pa55"}):
        router = make_router(25, StubResolver(), smarthost=SmarthostConfig("127.0.0.2", port, "relayuser", "x"))
        outcomes = await router.deliver(delivery("u@anywhere.test"))
        await router.close()
    assert outcomes[0].reply.transient and "SASL authentication failed" in outcomes[0].reply.text


async def test_routes_by_address_and_by_name() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port) as p2, RecordingPeer("127.0.0.3", port) as p3:
        resolver = StubResolver(hosts={"relay-b.internal": ("127.0.0.3",)})
        router = make_router(25, resolver, routes=(("a.test", "127.0.0.2", port),
                                                   ("b.test", "relay-b.internal", port)))
        assert router.destination("x@A.test") == f"route:127.0.0.2:{port}"
        assert router.destination("x@b.test") == f"route:relay-b.internal:{port}"
        assert router.destination("x@Other.Test") == "other.test"
        assert router.destination("x@[192.0.2.1]") == "[192.0.2.1]"
        a = await router.deliver(delivery("x@a.test"))
        b = await router.deliver(delivery("y@b.test"))
        await router.close()
    assert a[0].delivered and b[0].delivered
    assert b[0].relay == f"relay-b.internal[127.0.0.3]:{port}"
    assert p2.messages[0].rcpts == ["x@a.test"] and p3.messages[0].rcpts == ["y@b.test"]


@pytest.mark.parametrize("listener", ["127.0.0.2", "0.0.0.0", "::ffff:127.0.0.2"])
async def test_mail_loop_is_detected(listener: str) -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port) as peer:
        resolver = StubResolver({"example.test": [MXHost(MX1, 10, ("127.0.0.2",))]})
        router = make_router(port, resolver, own=[(listener, port)])
        outcomes = await router.deliver(delivery("u@example.test"))
        await router.close()
    assert outcomes[0].reply == Reply(554, "5.4.6", "mail for example.test loops back to myself")
    assert peer.connections == []


async def test_backup_mx_never_delivers_to_itself() -> None:
    # We are MX 20; the primary (MX 10) is down: defer with its error, never loop.
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port) as own, RecordingPeer("127.0.0.3", port, refuse=True):
        router = make_router(port, two_mx("127.0.0.3", "127.0.0.2"), own=[("127.0.0.2", port)])
        outcomes = await router.deliver(delivery("u@example.test"))
        await router.close()
    assert outcomes[0].reply.text == f"connect to {MX1}[127.0.0.3]:{port}: Connection refused"
    assert own.connections == []


@pytest.mark.parametrize("error", [PermanentError(Reply(550, "5.1.2", "Host or domain name not found")),
                                   TransientError(Reply(451, "4.4.3", "Name service error"))])
async def test_resolver_errors_become_outcomes(error: Exception) -> None:
    router = make_router(25, StubResolver({"example.test": error}))
    outcomes = await router.deliver(delivery("u@example.test", "v@example.test"))
    await router.close()
    assert [o.reply for o in outcomes] == [error.reply] * 2  # type: ignore[attr-defined]
    assert {o.relay for o in outcomes} == {"none"}


async def test_one_connection_serves_several_domains(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port) as peer:
        resolver = StubResolver({"a.test": [MXHost("mx.a.test", 10, ("127.0.0.2",))],
                                 "b.test": [MXHost("mx.b.test", 10, ("127.0.0.2",))]})
        router = make_router(port, resolver)
        with caplog.at_level(logging.DEBUG, logger="mta.delivery"):
            await router.deliver(delivery("x@a.test"))
            await router.deliver(delivery("y@b.test", n=2))
        await router.close()
        await peer.wait_finished()
    assert len(peer.connections) == 1 and len(peer.messages) == 2
    assert (router.pool.opened, router.pool.reused) == (1, 1)
    assert "reusing cached connection to" in caplog.text


async def test_cached_connection_broken_midway_is_retried_once_on_a_new_one() -> None:
    # The cached session dies at the second MAIL (a 421 the idle check could not see).
    def replies(verb: str, arg: str, conn) -> str | None:  # type: ignore[no-untyped-def]
        if verb == "MAIL" and conn.number == 0 and conn.verbs.count("MAIL") == 2:
            return "421 4.4.2 Connection dropped"
        return None

    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, replies=replies) as p2, RecordingPeer("127.0.0.3", port) as p3:
        router = make_router(port, two_mx())
        assert (await router.deliver(delivery("u@example.test")))[0].delivered
        outcomes = await router.deliver(delivery("v@example.test", n=2))
        await router.close()
        await p2.wait_finished()
    assert outcomes[0].delivered and outcomes[0].relay.startswith(MX1)
    assert [c.verbs[:2] for c in p2.connections] == [["EHLO", "MAIL"], ["EHLO", "MAIL"]]
    assert len(p2.messages) == 2 and p3.connections == []
    assert (router.pool.opened, router.pool.reused) == (2, 1)


async def test_fresh_connection_broken_midway_moves_to_the_next_host() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, drop_after_data_bytes=5) as p2, \
            RecordingPeer("127.0.0.3", port) as p3:
        router = make_router(port, two_mx())
        outcomes = await router.deliver(delivery("u@example.test"))
        await router.close()
    assert outcomes[0].delivered and outcomes[0].relay.startswith(MX2)
    assert len(p2.connections) == 1 and len(p3.messages) == 1


async def test_oversized_message_bounces_without_fallback() -> None:
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port, extensions=["PIPELINING", "SIZE 10"]) as p2, \
            RecordingPeer("127.0.0.3", port) as p3:
        router = make_router(port, two_mx())
        outcomes = await router.deliver(delivery("u@example.test"))
        await router.close()
    assert (outcomes[0].reply.code, outcomes[0].reply.enhanced) == (552, "5.3.4")
    assert p3.connections == [] and "MAIL" not in p2.connections[0].verbs


# --------------------------------------------------------------------------- Postfix's smtp-sink

SMTP_SINK = "/usr/sbin/smtp-sink"


async def _wait_listening(host: str, port: int) -> None:
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError("smtp-sink did not start")


@pytest.mark.skipif(not os.access(SMTP_SINK, os.X_OK), reason="Postfix smtp-sink not installed")
async def test_delivery_to_postfix_smtp_sink() -> None:
    port = free_port("127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="smtp-sink-") as tmp:
        os.chmod(tmp, 0o777)   # smtp-sink drops to "nobody" when run as root
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        proc = await asyncio.create_subprocess_exec(
            SMTP_SINK, *user, "-c", "-d", f"{tmp}/msg-%M.", f"127.0.0.1:{port}", "100",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            # Connection-probe of readiness counts as a session in smtp-sink's counter.
            await _wait_listening("127.0.0.1", port)
            router = make_router(25, StubResolver(), routes=(("sink.test", "127.0.0.1", port),))
            results = [await router.deliver(Delivery(f"M{n}", "a@sender.test",
                                                     (f"r{n}@sink.test", f"s{n}@sink.test"),
                                                     BODY.replace(b"Hello.", f"Hello {n}.".encode())))
                       for n in range(3)]
            await router.close()
            await asyncio.sleep(0.2)
        finally:
            proc.terminate()
            stdout, stderr = await proc.communicate()
        dumps = sorted(Path(tmp).glob("msg-*"))
        texts = [p.read_bytes() for p in dumps]
    assert all(o.delivered for outcomes in results for o in outcomes), results
    assert results[0][0].relay == f"127.0.0.1[127.0.0.1]:{port}"
    assert (router.pool.opened, router.pool.reused) == (1, 2)
    # "-c" prints running counters; the last line: one session (plus the probe), one QUIT, 3 messages.
    last = stdout.decode().replace("\r", "\n").strip().splitlines()[-1]
    assert re.fullmatch(r"sess=2 quit=1 mesg=3", last), (last, stderr)
    assert len(texts) == 3
    for n in range(3):
        text = next(t for t in texts if f"Hello {n}.".encode() in t)
        assert f"X-Rcpt-Args: <r{n}@sink.test>".encode() in text
        assert f"X-Rcpt-Args: <s{n}@sink.test>".encode() in text
        # smtp-sink stores lines with LF and adds a blank line after the message.
        assert f"\nFrom: a@sender.test\nSubject: hi\n\nHello {n}.\n".encode() in text


async def test_address_literal_with_the_real_resolver() -> None:
    # MXResolver answers "[127.0.0.2]" without asking DNS (RFC 5321 4.1.3).
    port = free_port_all(PEER_HOSTS)
    async with RecordingPeer("127.0.0.2", port) as peer:
        resolver = MXResolver(DNSConfig(nameservers=("127.0.0.1",), port=9, timeout=0.5))
        router = make_router(port, resolver)  # type: ignore[arg-type]
        assert router.destination("u@[127.0.0.2]") == "[127.0.0.2]"
        outcomes = await router.deliver(delivery("u@[127.0.0.2]"))
        await router.close()
    assert outcomes[0].delivered and outcomes[0].relay == f"127.0.0.2[127.0.0.2]:{port}"
    assert peer.messages[0].rcpts == ["u@[127.0.0.2]"]
