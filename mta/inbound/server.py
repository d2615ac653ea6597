"""Inbound listeners: aiosmtpd protocol objects served on the daemon's own loop."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import weakref
from collections.abc import Callable
from typing import Any

from mta.config import Config, ListenerConfig, TLSConfig
from mta.inbound.handler import InboundHandler
from mta.inbound.limiter import ConnectionLimiter
from mta.inbound.session import InboundSMTP
from mta.tls import ImplicitTLS, handshake_error

log = logging.getLogger("mta.smtpd")

SHUTDOWN_REPLY = b"421 4.3.2 Service shutting down\r\n"


def make_tls_context(tls: TLSConfig) -> ssl.SSLContext:
    """The server side of STARTTLS and implicit TLS (SMTP and POP3): TLS 1.2 or later
    with AEAD suites only unless the listener's tls.min_version / tls.ciphers say otherwise."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    context.set_ciphers(tls.ciphers)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    context.load_cert_chain(tls.cert, tls.key)
    return context


class BoundServer:
    """What every listener (SMTP here, POP3 in mta/pop3/server.py) does with its socket."""

    server: asyncio.Server | None = None

    def sockets(self) -> list[tuple[str, int]]:
        if self.server is None:
            return []
        return [(s.getsockname()[0], s.getsockname()[1]) for s in self.server.sockets]

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()


class Listener(BoundServer):
    """One configured listening socket and the sessions it spawns."""

    def __init__(self, config: Config, listener: ListenerConfig, handler: InboundHandler,
                 on_connection: Callable[[str], None] | None = None):
        self.config = config
        self.on_connection = on_connection or (lambda name: None)   # mta_smtp_connections_total
        self.listener = listener
        self.handler = handler
        self.limiter = ConnectionLimiter(config.limits.max_connections, config.limits.max_connections_per_ip)
        self.tls_context = make_tls_context(listener.tls) if listener.tls else None
        self.server: asyncio.Server | None = None
        self.sessions: weakref.WeakSet[InboundSMTP] = weakref.WeakSet()
        self.implicit: ImplicitTLS | None = None

    def _protocol(self) -> InboundSMTP:
        implicit = bool(self.listener.tls and self.listener.tls.implicit)
        has_users = self.handler.users is not None
        protocol = InboundSMTP(
            self.handler,
            limiter=self.limiter,
            implicit_tls=implicit,
            hostname=self.config.hostname,
            ident="ESMTP mta",
            data_size_limit=self.config.limits.message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if implicit else self.tls_context,
            timeout=self.config.limits.idle_timeout,
            hard_error_limit=self.config.limits.hard_error_limit,
            junk_command_limit=self.config.limits.junk_command_limit,
            auth_required=self.listener.mode == "submission",
            auth_require_tls=not self.listener.allow_insecure_auth,
            auth_exclude_mechanism=() if has_users else ("PLAIN", "LOGIN"),
            loop=asyncio.get_running_loop(),
        )
        self.sessions.add(protocol)
        self.on_connection(self.listener.name)
        return protocol

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        implicit = bool(self.listener.tls and self.listener.tls.implicit)
        factory: Any = self._protocol
        if implicit:
            assert self.tls_context is not None
            # Not create_server(ssl=...): a failed handshake is then one log line naming
            # the client instead of nothing at all (see mta/tls.py).
            self.implicit = factory = ImplicitTLS(self._protocol, self.tls_context,
                                                  self.config.limits.idle_timeout, self._handshake_failed)
        self.server = await loop.create_server(
            factory, host=self.listener.host, port=self.listener.port, reuse_address=True, backlog=1024,
            family=socket.AF_INET6 if ":" in self.listener.host else socket.AF_UNSPEC,
        )
        log.info("listening on %s (%s, %s)", self.listener.address, self.listener.name, self.listener.mode)

    def _handshake_failed(self, peer: tuple[str, int] | None, sockname: object, exc: BaseException | None) -> None:
        log.info("SSL_accept error from unknown[%s]: %s (listener %s)", peer[0] if peer else "unknown",
                 handshake_error(exc), self.listener.name)

    async def drain(self, grace: float) -> None:
        """After stop_accepting: let transactions in progress finish for up to
        ``grace`` seconds; idle sessions (and, at the end, all) get 421 and close."""
        if self.implicit is not None:
            self.implicit.abort_handshakes()
        deadline = time.monotonic() + grace
        while True:
            late = time.monotonic() >= deadline
            open_sessions = [s for s in self.sessions if s.transport is not None and not s.transport.is_closing()]
            if not open_sessions:
                return
            for session in open_sessions:
                if late or session.idle_between_transactions():
                    session.close_with(SHUTDOWN_REPLY)
            if late:
                return
            await asyncio.sleep(0.05)
