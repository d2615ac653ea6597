"""Deliver one message to one destination: pick next hops, try them in order.

Next hops come from the smarthost, a per-domain route, or MX records (RFC 5321
5.1). Candidates are tried in order -- each host, each of its addresses -- and
we move on after a connection failure, a timeout, a 421 or any other 4xx
before the recipients were looked at (greeting, EHLO, MAIL), and after a 5xx
greeting (it refuses service, not the mail: Postfix's smtp_skip_5xx_greeting);
a 5xx to EHLO+HELO or MAIL stops the search. RCPT and DATA replies are per-recipient outcomes.

Problems never escape ``deliver()``: they become Outcomes carrying the Reply
to log, defer or bounce with (texts follow Postfix's wording).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mta.config import DeliveryConfig
from mta.delivery.client import ConnectFailed, ConnectionLost, Session, connect
from mta.delivery.pool import ConnectionPool
from mta.errors import PermanentError, TransientError
from mta.model import Outcome, Reply, domain_of
from mta.queue.courier import Delivery

if TYPE_CHECKING:
    from mta.delivery.mx import MXHost, MXResolver

log = logging.getLogger("mta.delivery")


def _mail_params(delivery: Delivery) -> str:
    """RFC 3461 RET and ENVID for MAIL FROM."""
    return " ".join(p for p in (f"RET={delivery.ret}" if delivery.ret else "",
                                f"ENVID={delivery.envid}" if delivery.envid else "") if p)


def _rcpt_params(delivery: Delivery) -> dict[str, str]:
    """RFC 3461 NOTIFY and ORCPT per recipient, for RCPT TO."""
    params = {}
    for i, rcpt in enumerate(delivery.recipients):
        notify = delivery.notify[i] if i < len(delivery.notify) else None
        orcpt = delivery.orcpt[i] if i < len(delivery.orcpt) else None
        text = " ".join(p for p in (f"NOTIFY={notify}" if notify else "",
                                    f"ORCPT={orcpt}" if orcpt else "") if p)
        if text:
            params[rcpt] = text
    return params


@dataclass(frozen=True, slots=True)
class _Hop:
    name: str
    preference: int
    addresses: tuple[str, ...]
    port: int
    smarthost: bool = False   # the relayhost: its credentials apply (never to a route or an MX)


class _Next(Exception):
    """This candidate failed transiently; try the next one (``reply`` if none is left)."""

    def __init__(self, reply: Reply, relay: str = "none", *, lost: bool = False):
        super().__init__(str(reply))
        self.reply = reply
        self.relay = relay
        self.lost = lost   # the session broke (network error, timeout, 421)


class _Stop(Exception):
    """Every recipient gets ``reply`` and no further candidate is tried."""

    def __init__(self, reply: Reply, relay: str = "none"):
        super().__init__(str(reply))
        self.reply = reply
        self.relay = relay


@functools.lru_cache(maxsize=1024)  # the same few hosts for every message
def _normal_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def _is_local_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True if ``ip`` belongs to this machine: the kernel lets us bind to it."""
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


class Router:
    """The SMTP courier (mta.queue.courier.Courier): it takes every recipient, so the
    queue manager asks it last."""

    def __init__(self, config: DeliveryConfig, hostname: str, resolver: MXResolver, pool: ConnectionPool,
                 own_sockets: frozenset[tuple[str, int]] = frozenset()):
        self.config = config
        self.hostname = hostname
        self.resolver = resolver
        self.pool = pool
        # Our listening sockets, IPs normalised (a name stays a lower-cased string).
        self._own: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | str, int]] = []
        for host, port in own_sockets:
            ip = _normal_ip(host)
            self._own.append((ip if ip is not None else host.lower(), port))

    # ------------------------------------------------------------------ routing

    def destination(self, recipient: str) -> str:
        """The grouping key: recipients with the same key share one delivery.

        A route for the recipient's domain wins over the smarthost, as Postfix's
        transport_maps win over relayhost."""
        domain = domain_of(recipient)
        route = self.config.route_for(domain)
        if route is not None:
            return f"route:{route[0]}:{route[1]}"
        smarthost = self.config.smarthost
        if smarthost is not None:
            return f"smarthost:{smarthost.host}:{smarthost.port}"
        return domain

    async def _hops(self, domain: str) -> list[_Hop]:
        target = self.config.route_for(domain)   # transport_maps before relayhost
        via_smarthost = target is None and self.config.smarthost is not None
        if via_smarthost:
            assert self.config.smarthost is not None
            target = (self.config.smarthost.host, self.config.smarthost.port)
        if target is not None:
            host, port = target
            addresses = await self.resolver.resolve_host(host)
            if not addresses:
                raise TransientError(Reply(451, "4.4.4", f"Host or domain name not found. "
                                           f"Name service error for name={host} type=A: Host not found"))
            return [_Hop(host, 0, tuple(addresses), port, smarthost=via_smarthost)]
        hosts: list[MXHost] = await self.resolver.resolve(domain)
        # An address literal's host is shown as Postfix does: "192.0.2.1[192.0.2.1]:25".
        return [_Hop(h.addresses[0] if h.name.startswith("[") and h.addresses else h.name,
                     h.preference, tuple(h.addresses), self.config.port) for h in hosts]

    def _is_own(self, address: str, port: int) -> bool:
        ip = _normal_ip(address)
        for host, own_port in self._own:
            if own_port != port:
                continue
            if host == ip or host == address.lower():
                return True
            if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and host.is_unspecified \
                    and ip is not None and _is_local_address(ip):
                return True   # a 0.0.0.0 / :: listener answers on every local address
        return False

    def _without_loops(self, hops: list[_Hop], domain: str) -> list[_Hop]:
        """Drop hops that are ourselves, and every hop not better than such a one.

        Like Postfix: when we are one of the MX hosts, only hosts with a lower
        preference than ours may be used; with none left the mail loops.
        """
        for i, hop in enumerate(hops):
            if any(self._is_own(address, hop.port) for address in hop.addresses):
                kept = [h for h in hops[:i] if h.preference < hop.preference]
                if not kept:
                    raise _Stop(Reply(554, "5.4.6", f"mail for {domain} loops back to myself"))
                return kept
        return hops

    # ------------------------------------------------------------------ delivery

    async def deliver(self, delivery: Delivery) -> list[Outcome]:
        """Deliver to every recipient (all with the same destination()); one Outcome each."""
        recipients = list(delivery.recipients)
        if not recipients:
            return []
        domain = domain_of(recipients[0])
        started = time.monotonic()   # delays= c (set-up) counts from here: DNS, failed hops, connect
        try:
            hops = self._without_loops(await self._hops(domain), domain)
            return await self._try_hops(delivery, hops, started)
        except _Stop as stop:
            return [Outcome(r, stop.reply, stop.relay) for r in recipients]
        except (PermanentError, TransientError) as exc:   # from the resolver
            return [Outcome(r, exc.reply, "none") for r in recipients]
        except Exception:
            log.exception("delivery of %s to %s failed unexpectedly", delivery.message_id, domain)
            reply = Reply(451, "4.3.0", "internal error during delivery")
            return [Outcome(r, reply, "none") for r in recipients]

    async def _try_hops(self, delivery: Delivery, hops: list[_Hop], started: float) -> list[Outcome]:
        last = _Next(Reply(451, "4.4.1", "no next hop available"))
        for hop in hops:
            for address in hop.addresses:
                try:
                    return await self._try_address(delivery, hop, address, started)
                except _Next as failure:
                    last = failure
                    log.debug("%s: %s; trying the next host", delivery.message_id, failure.reply)
        setup = time.monotonic() - started
        return [Outcome(r, last.reply, last.relay, setup=setup) for r in delivery.recipients]

    async def _try_address(self, delivery: Delivery, hop: _Hop, address: str, started: float) -> list[Outcome]:
        key = f"{address}:{hop.port}"
        session = await self.pool.acquire(key)
        if session is not None:
            log.debug("%s: reusing cached connection to %s", delivery.message_id, session.peer)
            try:
                return await self._timed_transaction(key, session, delivery, started)
            except _Next as failure:
                if not failure.lost:
                    raise
                # A cached session can die while idle in ways we could not see; that
                # says nothing about the host, so retry once on a fresh connection.
                log.debug("%s: cached connection to %s failed (%s); retrying on a new one",
                          delivery.message_id, session.peer, failure.reply)
        return await self._timed_transaction(key, await self._connect(hop, address), delivery, started)

    async def _timed_transaction(self, key: str, session: Session, delivery: Delivery,
                                 started: float) -> list[Outcome]:
        ready = time.monotonic()
        outcomes = await self._transaction(key, session, delivery)
        setup, transmission = ready - started, time.monotonic() - ready
        return [replace(o, setup=setup, transmission=transmission) for o in outcomes]

    async def _connect(self, hop: _Hop, address: str) -> Session:
        smarthost = self.config.smarthost
        auth = None
        if hop.smarthost and smarthost is not None and smarthost.username is not None:
            auth = (smarthost.username, smarthost.password or "")
        relay = f"{hop.name}[{address}]:{hop.port}"
        try:
            session = await connect(address, hop.port, server_name=hop.name, helo_name=self.hostname,
                                    tls=self.config.tls, timeouts=self.config.timeouts, auth=auth)
        except ConnectFailed as exc:
            raise _Next(exc.reply) from None
        except TransientError as exc:   # 4xx/421/timeout at greeting, EHLO, STARTTLS or AUTH
            raise _Next(exc.reply, relay) from None
        except PermanentError as exc:   # 5xx to EHLO and then HELO
            raise _Stop(exc.reply, relay) from None
        self.pool.note_opened()
        return session

    async def _transaction(self, key: str, session: Session, delivery: Delivery) -> list[Outcome]:
        try:
            dsn = session.has("DSN")
            results = await session.send(delivery.sender, list(delivery.recipients), delivery.data,
                                         smtputf8=delivery.smtputf8, body_8bit=delivery.body_8bit,
                                         mail_params=_mail_params(delivery) if dsn else "",
                                         rcpt_params=_rcpt_params(delivery) if dsn else None)
        except ConnectionLost as exc:
            await self.pool.release(key, session, reusable=False)
            raise _Next(exc.reply, session.peer, lost=True) from None
        except TransientError as exc:   # MAIL 4xx: the session is fine after RSET, the host is not
            await self.pool.release(key, session)
            raise _Next(exc.reply, session.peer) from None
        except PermanentError as exc:   # MAIL 5xx, too big, needs SMTPUTF8
            await self.pool.release(key, session)
            raise _Stop(exc.reply, session.peer) from None
        except BaseException:           # a bug or cancellation: never leak the socket
            session.abort()
            raise
        await self.pool.release(key, session)
        return [Outcome(r, results[r], session.peer, dsn_passed=dsn) for r in delivery.recipients]

    async def close(self) -> None:
        await self.pool.close()
