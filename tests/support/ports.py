"""Free TCP ports for listeners and recording peers.

A port is probed by binding it without SO_REUSEADDR, which is stricter than the
servers under test (asyncio's create_server sets SO_REUSEADDR): a port found
here can be bound by them. It is released again before the test uses it, so two
calls may in principle return the same number; tests ask for ports just before
starting what listens on them.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence

# The loopback addresses tests listen on: the daemon on 127.0.0.1, next hops on the others.
LOOPBACKS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
PEER_HOSTS = LOOPBACKS[1:]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (bound and released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_all(hosts: Sequence[str] = LOOPBACKS) -> int:
    """One port number free on every one of ``hosts`` (for peers found through DNS
    on 127.0.0.2, 127.0.0.3, ... that all listen on the delivery port)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            with contextlib.ExitStack() as stack:
                for host in hosts:
                    s = stack.enter_context(socket.socket())
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {tuple(hosts)}")
