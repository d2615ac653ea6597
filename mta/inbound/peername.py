"""The client's verified host name, as Postfix's smtpd looks it up (smtpd_peername_lookup).

A client's name is its reverse-DNS (PTR) name only when that name resolves back
to the client's address (forward-confirmed, as Postfix requires); otherwise it
is "unknown". It shows in the Received: header ("from helo (name [ip])") and
in the log lines that parsers read (``client=name[ip]``, ``reject: RCPT from
name[ip]``). The system resolver answers (getnameinfo/getaddrinfo: /etc/hosts
first, then DNS), in the loop's threads, within LOOKUP_TIMEOUT; answers are
kept for CACHE_TTL per address, so a client that connects often costs one
look-up a minute.
"""

from __future__ import annotations

import asyncio
import socket
import time

LOOKUP_TIMEOUT = 2.0   # seconds: a slow resolver makes the name "unknown", never a slow session
CACHE_TTL = 60.0
CACHE_SIZE = 4096
UNKNOWN = "unknown"


class PeerNames:
    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, asyncio.Future[str]]] = {}

    def prefetch(self, ip: str) -> None:
        """Start the look-up when the client connects (as Postfix's smtpd does), so that
        it runs while the session does and the message's commit does not wait for it."""
        self._lookup(ip)

    async def name(self, ip: str) -> str:
        """The verified name of ``ip``, or "unknown"; never raises."""
        return await asyncio.shield(self._lookup(ip))

    def _lookup(self, ip: str) -> asyncio.Future[str]:
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]   # an IPv4 client on a dual-stack socket
        now = time.monotonic()
        hit = self._cache.get(ip)
        if hit is None or hit[0] < now:
            if len(self._cache) >= CACHE_SIZE:
                self._cache = {k: v for k, v in self._cache.items() if v[0] >= now}
                if len(self._cache) >= CACHE_SIZE:
                    self._cache.clear()
            hit = (now + CACHE_TTL, asyncio.ensure_future(_verified_name(ip)))
            self._cache[ip] = hit
        return hit[1]


async def _verified_name(ip: str) -> str:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT):
            host, _ = await loop.getnameinfo((ip, 0), socket.NI_NAMEREQD)
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError, ValueError):
        return UNKNOWN
    if host == ip or not any(_same_address(str(info[4][0]), ip) for info in infos):
        return UNKNOWN   # not forward-confirmed: the PTR record alone proves nothing
    return host


def _same_address(a: str, b: str) -> bool:
    try:
        return socket.inet_pton(_family(a), a) == socket.inet_pton(_family(b), b)
    except OSError:
        return False


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET
