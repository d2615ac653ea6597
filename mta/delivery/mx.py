"""Next-hop resolution: which hosts, in which order, take mail for a domain.

RFC 5321 §5.1 (MX lookup, implicit MX, preference order, equal preferences
randomised), RFC 7505 (null MX), RFC 5321 §4.1.3 (address literals).

Lookups use dnspython's asyncio resolver, so they never block the event loop.
Answers are cached for their TTL by (name, type) -- positive, NXDOMAIN and
NODATA alike (RFC 2308); failures (SERVFAIL, timeouts) are not cached, so the
next attempt asks again. Errors are mta.errors exceptions carrying a Reply whose
text follows Postfix's wording, which operators already know how to read.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mta.config import DNSConfig
from mta.errors import ConfigError, PermanentError, TransientError
from mta.model import Reply


@functools.lru_cache(maxsize=1024)
def _plain_ip(text: str) -> str | None:
    """``text`` as an IP address in normal form, or None for a host name. Cached:
    routes and MX hosts repeat for every message, and a failed parse raises."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None

# RFC 2308 §5: a negative answer is cached for min(SOA TTL, SOA MINIMUM). Without
# an SOA there is no negative TTL; use a short fixed one.
NEGATIVE_TTL_WITHOUT_SOA = 60.0
# Bound the cache of a long-running daemon; expired entries are swept past this size.
_CACHE_SWEEP_SIZE = 10_000

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


@dataclass(frozen=True, slots=True)
class MXHost:
    """One candidate next hop."""

    name: str                   # MX exchange, the domain itself (implicit MX) or "[literal]"
    preference: int
    addresses: tuple[str, ...]  # A records then AAAA records, each in the resolver's order


@dataclass(frozen=True, slots=True)
class _Lookup:
    """A cacheable DNS outcome for one (name, type)."""

    nxdomain: bool
    records: tuple[Any, ...]  # MX: ((preference, exchange), ...) with "." for the root; A/AAAA: ("addr", ...)


class MXResolver:
    """Resolves domains to ordered MX hosts; share one per process to share its cache."""

    def __init__(self, dns: DNSConfig, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        self._resolver = _make_resolver(dns)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._cache: dict[tuple[str, str], tuple[float, _Lookup]] = {}

    # ------------------------------------------------------------------ public

    async def resolve(self, domain: str) -> list[MXHost]:
        """Ordered candidate hosts for mail to `domain`.

        Raises PermanentError (the domain cannot take mail: NXDOMAIN, null MX, no
        MX and no address, malformed) or TransientError (DNS failed, or no MX
        host has an address yet).
        """
        text = domain.strip()
        if text.startswith("["):
            return [_literal(text)]
        name = _normalize(text)
        mx = await self._lookup(name, "MX")
        if mx.nxdomain:
            raise PermanentError(Reply(550, "5.1.2", _not_found(name, "MX")))
        if not mx.records:
            # RFC 5321 §5.1: no MX records -> the domain itself is the implicit MX,
            # preference 0.
            addresses = await self._host_addresses(name)
            if not addresses:
                raise PermanentError(Reply(
                    550, "5.1.2",
                    f"Host or domain name not found. Domain {name} has no MX or address records"))
            return [MXHost(name, 0, addresses)]

        # RFC 7505 §3: an MX whose exchange is the root "." says the domain takes no
        # mail. It "MUST NOT" be mixed with other MX records (§3); if it is anyway, the
        # real exchanges are the more useful reading, so the null one is dropped.
        exchanges = [(pref, host) for pref, host in mx.records if host != "."]
        if not exchanges:
            raise PermanentError(Reply(
                556, "5.1.10", f"Recipient address rejected: Domain {name} does not accept mail (nullMX)"))

        ordered = self._order(exchanges)
        # Look up all exchanges at once: one slow host must not cost N timeouts.
        results = await asyncio.gather(*(self._host_addresses(host) for _, host in ordered),
                                       return_exceptions=True)
        hosts: list[MXHost] = []
        failure: TransientError | None = None
        for (pref, host), result in zip(ordered, results, strict=True):
            if isinstance(result, TransientError):
                failure = failure or result  # try the hosts we can reach; keep the reason
            elif isinstance(result, BaseException):
                raise result
            elif result:
                hosts.append(MXHost(host, pref, result))
            # else: the exchange has no address records -- skip it (RFC 5321 §5.1).
        if hosts:
            return hosts
        if failure is not None:
            raise failure
        # Every exchange lacks addresses: likely a DNS mistake the domain's owner can
        # fix while the message waits, so defer rather than bounce.
        names = ", ".join(host for _, host in ordered)
        raise TransientError(Reply(451, "4.4.4", f"No usable MX host address for {name} (MX hosts: {names})"))

    async def resolve_host(self, name: str) -> tuple[str, ...]:
        """A then AAAA addresses of a host name (IP literal returned as is).

        "192.0.2.1", "::1", "[192.0.2.1]" and "[IPv6:::1]" give that address without
        DNS. An empty tuple means the name exists without addresses or does not
        exist; TransientError means DNS failed and no address could be found.
        Malformed names raise PermanentError 5.1.2.
        """
        text = name.strip()
        literal = _plain_ip(text)
        if literal is not None:
            return (literal,)
        if text.startswith("["):
            return _literal(text).addresses
        return await self._host_addresses(_normalize(text))

    # ------------------------------------------------------------------ internals

    def _order(self, exchanges: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Sort by preference; shuffle each run of equal preferences (RFC 5321 §5.1)."""
        by_pref: dict[int, list[str]] = {}
        for pref, host in exchanges:
            if host not in by_pref.setdefault(pref, []):  # duplicate records add nothing
                by_pref[pref].append(host)
        ordered: list[tuple[int, str]] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            self._rng.shuffle(group)
            ordered.extend((pref, host) for host in group)
        return ordered

    async def _host_addresses(self, name: str) -> tuple[str, ...]:
        """A then AAAA records of `name`; () when it has none or does not exist."""
        results = await asyncio.gather(self._lookup(name, "A"), self._lookup(name, "AAAA"),
                                       return_exceptions=True)
        addresses: list[str] = []
        failure: TransientError | None = None
        for result in results:
            if isinstance(result, TransientError):
                failure = failure or result
            elif isinstance(result, BaseException):
                raise result
            elif result.nxdomain:
                return ()  # the name does not exist, whatever the other query says
            else:
                addresses.extend(result.records)
        if not addresses and failure is not None:
            raise failure
        # One family failing while the other answered still gives usable hosts.
        return tuple(addresses)

    async def _lookup(self, name: str, rdtype: str) -> _Lookup:
        """One cached DNS question; TransientError when no usable answer came back."""
        key = (name, rdtype)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]

        qname = dns.name.from_text(name)  # absolute: never apply a search list
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            # dnspython's responses() is untyped; it maps each name asked to its answer.
            responses: dict[dns.name.Name, dns.message.Message] = \
                exc.responses() if "responses" in exc.kwargs else {}  # type: ignore[no-untyped-call]
            response = responses.get(qname)
            result, ttl = _Lookup(True, ()), _negative_ttl(response)
        except (dns.exception.DNSException, OSError):
            # SERVFAIL/REFUSED from every server (NoNameservers), lifetime timeout
            # (LifetimeTimeout), unreachable servers: try again later, no caching.
            raise TransientError(Reply(
                451, "4.4.3",
                f"Host or domain name not found. Name service error for name={name} type={rdtype}: "
                "Host not found, try again")) from None
        else:
            if answer.rrset is None:
                result, ttl = _Lookup(False, ()), _negative_ttl(answer.response)  # NODATA
            else:
                result = _Lookup(False, tuple(_record(rd) for rd in answer.rrset))
                ttl = float(answer.chaining_result.minimum_ttl)

        if ttl > 0:
            if len(self._cache) >= _CACHE_SWEEP_SIZE:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[key] = (now + ttl, result)
        return result


# --------------------------------------------------------------------------- helpers

def _make_resolver(cfg: DNSConfig) -> dns.asyncresolver.Resolver:
    if cfg.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ns, cfg.port) for ns in cfg.nameservers]
    else:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)  # /etc/resolv.conf
        except dns.resolver.NoResolverConfiguration:
            raise ConfigError("delivery.dns.nameservers",
                              "empty, and the system resolver configuration names no nameserver") from None
    # dnspython's `lifetime` bounds a whole query (all servers and retries); each
    # attempt's `timeout` is clipped to what is left of it.
    resolver.lifetime = cfg.timeout
    resolver.cache = None  # we cache ourselves, on the injected clock
    return resolver


def _normalize(text: str) -> str:
    """Lower-case, no trailing dot, ASCII (IDNA) form; PermanentError when malformed."""
    name = text.strip().rstrip(".")
    try:
        if not name:
            raise ValueError
        ascii_name = dns.name.from_text(name).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        raise PermanentError(Reply(550, "5.1.2", f"Malformed domain name: {text!r}")) from None
    if not all(_LABEL.fullmatch(label) for label in ascii_name.split(".")):
        raise PermanentError(Reply(550, "5.1.2", f"Malformed domain name: {text!r}"))
    return ascii_name


def _literal(text: str) -> MXHost:
    """An address literal (RFC 5321 §4.1.3) as the single host to deliver to."""
    inner = text[1:-1] if text.endswith("]") else None
    try:
        if inner is None:
            raise ValueError
        if inner[:5].lower() == "ipv6:":
            v6 = ipaddress.IPv6Address(inner[5:])
            if v6.scope_id:
                raise ValueError
            return MXHost(f"[IPv6:{v6.compressed}]", 0, (v6.compressed,))
        v4 = ipaddress.IPv4Address(inner)  # the untagged form is IPv4 only
        return MXHost(f"[{v4}]", 0, (str(v4),))
    except ValueError:
        raise PermanentError(Reply(550, "5.1.2", f"Malformed address literal: {text}")) from None


def _record(rd: Any) -> tuple[int, str] | str:
    """The part of an rdata we keep: (preference, exchange) for MX, the address for A/AAAA."""
    if rd.rdtype == dns.rdatatype.MX:
        if rd.exchange == dns.name.root:
            return (rd.preference, ".")
        return (rd.preference, rd.exchange.to_text(omit_final_dot=True).lower())
    return str(rd.address)


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) from the authority section."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL_WITHOUT_SOA


def _not_found(name: str, rdtype: str) -> str:
    return f"Host or domain name not found. Name service error for name={name} type={rdtype}: Host not found"
