"""MX resolution against a real (fake, authoritative) DNS server on loopback."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mta.config import DNSConfig
from mta.delivery.mx import MXHost, MXResolver
from mta.errors import PermanentError, TransientError
from tests.support.fakedns import FakeDNS, fake_dns

ZONES: dict[str, Any] = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3", "127.0.0.4"], "AAAA": ["::1"]},
    "equal.test": {"MX": [(10, "a.equal.test"), (10, "b.equal.test"), (20, "c.equal.test")]},
    "a.equal.test": {"A": ["127.0.0.11"]},
    "b.equal.test": {"A": ["127.0.0.12"]},
    "c.equal.test": {"A": ["127.0.0.13"]},
    "implicit.test": {"A": ["127.0.0.5"], "AAAA": ["::1"]},
    "noaddr.test": {"TXT": []},          # exists, no MX, no A/AAAA
    "nullmx.test": {"MX": [(0, ".")]},
    "mixednull.test": {"MX": [(0, "."), (10, "mx1.example.test")]},
    "skip.test": {"MX": [(5, "gone.skip.test"), (10, "mx1.example.test")]},
    "allgone.test": {"MX": [(5, "gone.allgone.test"), (10, "alsogone.allgone.test")]},
    "mxfail.test": {"MX": [(5, "broken.test")]},
    "halfbroken.test": {"A": ["127.0.0.6"], "AAAA": "SERVFAIL"},
    "broken.test": "SERVFAIL",
    "slow.test": "TIMEOUT",
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dns() -> Iterator[FakeDNS]:
    with fake_dns({k: v for k, v in ZONES.items()}, ttl=300) as server:
        yield server


def make_resolver(server: FakeDNS, *, timeout: float = 2.0, clock: Clock | None = None,
                  seed: int = 0) -> MXResolver:
    cfg = DNSConfig(nameservers=(server.host,), port=server.port, timeout=timeout)
    return MXResolver(cfg, clock=clock or Clock(), rng=random.Random(seed))


pytestmark = pytest.mark.timeout(10)


# --------------------------------------------------------------------------- ordering

async def test_preference_order_and_addresses(dns: FakeDNS) -> None:
    hosts = await make_resolver(dns).resolve("example.test")
    assert hosts == [
        MXHost("mx1.example.test", 10, ("127.0.0.2",)),
        # A records first, then AAAA.
        MXHost("mx2.example.test", 20, ("127.0.0.3", "127.0.0.4", "::1")),
    ]


async def test_equal_preferences_are_shuffled(dns: FakeDNS) -> None:
    orders = set()
    for seed in range(20):
        hosts = await make_resolver(dns, seed=seed).resolve("equal.test")
        assert [h.preference for h in hosts] == [10, 10, 20]
        assert hosts[2].name == "c.equal.test"
        orders.add(tuple(h.name for h in hosts[:2]))
    assert orders == {("a.equal.test", "b.equal.test"), ("b.equal.test", "a.equal.test")}


async def test_same_seed_same_order(dns: FakeDNS) -> None:
    first = await make_resolver(dns, seed=7).resolve("equal.test")
    second = await make_resolver(dns, seed=7).resolve("equal.test")
    assert first == second


async def test_host_without_address_is_skipped(dns: FakeDNS) -> None:
    hosts = await make_resolver(dns).resolve("skip.test")
    assert [h.name for h in hosts] == ["mx1.example.test"]


async def test_no_mx_host_has_an_address_is_transient(dns: FakeDNS) -> None:
    with pytest.raises(TransientError) as info:
        await make_resolver(dns).resolve("allgone.test")
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.4.4")
    assert "allgone.test" in info.value.reply.text


async def test_mx_host_lookup_failure_is_transient(dns: FakeDNS) -> None:
    with pytest.raises(TransientError) as info:
        await make_resolver(dns).resolve("mxfail.test")
    assert info.value.reply.enhanced == "4.4.3"
    assert "name=broken.test type=A" in info.value.reply.text


# --------------------------------------------------------------------------- implicit and null MX

async def test_implicit_mx(dns: FakeDNS) -> None:
    hosts = await make_resolver(dns).resolve("implicit.test")
    assert hosts == [MXHost("implicit.test", 0, ("127.0.0.5", "::1"))]


async def test_no_mx_and_no_address_is_permanent(dns: FakeDNS) -> None:
    with pytest.raises(PermanentError) as info:
        await make_resolver(dns).resolve("noaddr.test")
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.1.2")
    assert "noaddr.test has no MX or address records" in info.value.reply.text


async def test_null_mx(dns: FakeDNS) -> None:
    with pytest.raises(PermanentError) as info:
        await make_resolver(dns).resolve("nullmx.test")
    reply = info.value.reply
    assert (reply.code, reply.enhanced) == (556, "5.1.10")
    assert reply.text == "Recipient address rejected: Domain nullmx.test does not accept mail (nullMX)"


async def test_null_mx_mixed_with_real_mx_is_ignored(dns: FakeDNS) -> None:
    hosts = await make_resolver(dns).resolve("mixednull.test")
    assert hosts == [MXHost("mx1.example.test", 10, ("127.0.0.2",))]


# --------------------------------------------------------------------------- failures

async def test_nxdomain_is_permanent(dns: FakeDNS) -> None:
    with pytest.raises(PermanentError) as info:
        await make_resolver(dns).resolve("nowhere.test")
    reply = info.value.reply
    assert (reply.code, reply.enhanced) == (550, "5.1.2")
    assert reply.text == ("Host or domain name not found. "
                          "Name service error for name=nowhere.test type=MX: Host not found")


async def test_servfail_is_transient(dns: FakeDNS) -> None:
    with pytest.raises(TransientError) as info:
        await make_resolver(dns).resolve("broken.test")
    reply = info.value.reply
    assert (reply.code, reply.enhanced) == (451, "4.4.3")
    assert reply.text == ("Host or domain name not found. "
                          "Name service error for name=broken.test type=MX: Host not found, try again")


async def test_timeout_is_transient(dns: FakeDNS) -> None:
    resolver = make_resolver(dns, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        await resolver.resolve("slow.test")
    assert time.monotonic() - started < 3
    assert info.value.reply.enhanced == "4.4.3"


async def test_no_nameserver_listening_is_transient() -> None:
    with fake_dns({}) as server:
        cfg = DNSConfig(nameservers=(server.host,), port=server.port, timeout=0.5)
    resolver = MXResolver(cfg)  # the server is gone: nothing answers on that port
    with pytest.raises(TransientError):
        await resolver.resolve("example.test")


async def test_failures_are_not_cached(dns: FakeDNS) -> None:
    resolver = make_resolver(dns)
    with pytest.raises(TransientError):
        await resolver.resolve("broken.test")
    dns.zones["broken.test"] = {"MX": [(10, "mx1.example.test")]}
    hosts = await resolver.resolve("broken.test")
    assert [h.name for h in hosts] == ["mx1.example.test"]


async def test_one_address_family_failing_keeps_the_other(dns: FakeDNS) -> None:
    resolver = make_resolver(dns)
    assert await resolver.resolve_host("halfbroken.test") == ("127.0.0.6",)


# --------------------------------------------------------------------------- caching

async def test_answers_cached_for_their_ttl(dns: FakeDNS) -> None:
    clock = Clock()
    resolver = make_resolver(dns, clock=clock)
    first = await resolver.resolve("example.test")
    assert dns.count("example.test", "MX") == 1
    assert dns.count("mx1.example.test", "A") == 1

    clock.now += 299
    assert await resolver.resolve("example.test") == first
    assert dns.count("example.test", "MX") == 1
    assert dns.count("mx1.example.test", "A") == 1

    clock.now += 2  # past the 300 s TTL
    await resolver.resolve("example.test")
    assert dns.count("example.test", "MX") == 2
    assert dns.count("mx1.example.test", "A") == 2


async def test_ttl_change_seen_after_expiry(dns: FakeDNS) -> None:
    clock = Clock()
    resolver = make_resolver(dns, clock=clock)
    assert (await resolver.resolve("example.test"))[0].name == "mx1.example.test"
    dns.zones["example.test"] = {"MX": [(1, "c.equal.test")]}
    assert (await resolver.resolve("example.test"))[0].name == "mx1.example.test"  # cached
    clock.now += 301
    assert (await resolver.resolve("example.test"))[0].name == "c.equal.test"


async def test_nxdomain_cached_with_default_negative_ttl(dns: FakeDNS) -> None:
    clock = Clock()
    resolver = make_resolver(dns, clock=clock)
    for _ in range(2):
        with pytest.raises(PermanentError):
            await resolver.resolve("nowhere.test")
    assert dns.count("nowhere.test", "MX") == 1
    clock.now += 61  # no SOA in the answer: 60 s
    with pytest.raises(PermanentError):
        await resolver.resolve("nowhere.test")
    assert dns.count("nowhere.test", "MX") == 2


async def test_nodata_cached_with_soa_minimum() -> None:
    zones = {"implicit.test": {"A": ["127.0.0.5"]}}
    with fake_dns(zones, ttl=300, negative_ttl=10) as server:
        clock = Clock()
        resolver = make_resolver(server, clock=clock)
        await resolver.resolve("implicit.test")
        await resolver.resolve("implicit.test")
        assert server.count("implicit.test", "MX") == 1   # NODATA cached
        assert server.count("implicit.test", "AAAA") == 1
        clock.now += 11  # RFC 2308: min(SOA TTL 300, MINIMUM 10)
        await resolver.resolve("implicit.test")
        assert server.count("implicit.test", "MX") == 2
        assert server.count("implicit.test", "A") == 1     # positive answer still cached


# --------------------------------------------------------------------------- names and literals

async def test_case_insensitive_and_trailing_dot(dns: FakeDNS) -> None:
    resolver = make_resolver(dns)
    lower = await resolver.resolve("example.test")
    assert await resolver.resolve("EXAMPLE.Test.") == lower
    assert dns.count("example.test", "MX") == 1  # same cache entry


async def test_address_literals() -> None:
    resolver = MXResolver(DNSConfig(nameservers=("127.0.0.1",), port=9, timeout=0.5))
    assert await resolver.resolve("[192.0.2.1]") == [MXHost("[192.0.2.1]", 0, ("192.0.2.1",))]
    assert await resolver.resolve("[IPv6:::1]") == [MXHost("[IPv6:::1]", 0, ("::1",))]
    assert await resolver.resolve("[ipv6:2001:DB8:0::1]") == [
        MXHost("[IPv6:2001:db8::1]", 0, ("2001:db8::1",))]


@pytest.mark.parametrize("literal", ["[192.0.2]", "[256.0.0.1]", "[::1]", "[IPv6:1.2.3.4]",
                                     "[IPv6:::1", "[x-tag:abc]", "[]"])
async def test_malformed_literal_is_permanent(literal: str) -> None:
    resolver = MXResolver(DNSConfig(nameservers=("127.0.0.1",), port=9, timeout=0.5))
    with pytest.raises(PermanentError) as info:
        await resolver.resolve(literal)
    assert info.value.reply.enhanced == "5.1.2"


@pytest.mark.parametrize("domain", ["", ".", "a..b", "exa mple.test", "-bad.test"])
async def test_malformed_domain_is_permanent(domain: str) -> None:
    resolver = MXResolver(DNSConfig(nameservers=("127.0.0.1",), port=9, timeout=0.5))
    with pytest.raises(PermanentError) as info:
        await resolver.resolve(domain)
    assert info.value.reply.enhanced == "5.1.2"


async def test_resolve_host(dns: FakeDNS) -> None:
    resolver = make_resolver(dns)
    assert await resolver.resolve_host("mx2.example.test") == ("127.0.0.3", "127.0.0.4", "::1")
    assert await resolver.resolve_host("MX1.example.test.") == ("127.0.0.2",)
    assert await resolver.resolve_host("127.0.0.9") == ("127.0.0.9",)
    assert await resolver.resolve_host("::1") == ("::1",)
    assert await resolver.resolve_host("[IPv6:::1]") == ("::1",)
    assert await resolver.resolve_host("nowhere.test") == ()
    assert await resolver.resolve_host("noaddr.test") == ()
    with pytest.raises(TransientError):
        await resolver.resolve_host("broken.test")
    assert dns.count("127.0.0.9", "A") == 0


async def test_cname_is_followed(dns: FakeDNS) -> None:
    dns.zones["alias.test"] = {"CNAME": "example.test"}
    hosts = await make_resolver(dns).resolve("alias.test")
    assert [h.name for h in hosts] == ["mx1.example.test", "mx2.example.test"]
