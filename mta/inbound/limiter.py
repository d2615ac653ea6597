"""How many sessions a listener has open, in all and per client address.

The SMTP listeners (mta/inbound/server.py) and the POP3 ones (mta/pop3/server.py)
refuse a connection beyond limits.max_connections / max_connections_per_ip.
"""

from __future__ import annotations

import collections


class ConnectionLimiter:
    """Counts a listener's open sessions, in all and per client address."""

    def __init__(self, max_total: int, max_per_ip: int):
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: collections.Counter[str] = collections.Counter()

    def admit(self, ip: str) -> bool:
        if self.total >= self.max_total or self.per_ip[ip] >= self.max_per_ip:
            return False
        self.total += 1
        self.per_ip[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
