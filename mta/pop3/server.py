"""POP3 listeners: a socket per configured pop3 listener, a session task per client.

Sessions run on the daemon's loop as asyncio streams. Limits and TLS come from
the same places as for SMTP (ConnectionLimiter, make_tls_context); the lock
set and the login throttle are passed in so that every POP3 listener of the
daemon (say a 110 and a 995) shares them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from mta.config import Config, ListenerConfig
from mta.inbound.limiter import ConnectionLimiter
from mta.inbound.server import BoundServer, make_tls_context
from mta.mailbox.users import MailboxUsers
from mta.passwords import AuthThrottle
from mta.pop3 import replies as R
from mta.pop3.session import POP3Session, SessionContext
from mta.store.api import Mailboxes
from mta.tls import ImplicitTLS, handshake_error

if TYPE_CHECKING:
    from mta.metrics import Metrics

log = logging.getLogger("mta.pop3")

# How long a session cut off at the end of the shutdown grace has to finish its clean-up.
ABORT_WAIT = 2.0


class POP3Listener(BoundServer):
    """One configured POP3 listening socket and the sessions it spawns."""

    def __init__(self, config: Config, listener: ListenerConfig, store: Mailboxes, users: MailboxUsers,
                 *, locks: set[str] | None = None, throttle: AuthThrottle | None = None, metrics: Metrics | None = None):
        self.config = config        # replaced by the app on reload; each new session reads it
        self.listener = listener
        self.store = store
        self.users = users
        self.locks: set[str] = locks if locks is not None else set()
        self.throttle = throttle or AuthThrottle()
        self.metrics = metrics
        self.tls_context = make_tls_context(listener.tls) if listener.tls else None
        self.limiter = ConnectionLimiter(config.limits.max_connections, config.limits.max_connections_per_ip)
        self.server: asyncio.Server | None = None
        self.sessions: dict[asyncio.Task[None], POP3Session | None] = {}
        self.implicit: ImplicitTLS | None = None

    @property
    def implicit_tls(self) -> bool:
        return bool(self.listener.tls and self.listener.tls.implicit)

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.listener.host else socket.AF_UNSPEC
        if self.implicit_tls:
            # Port-995 style, TLS from the first byte (RFC 8314 §3.3). Not start_server(ssl=...):
            # a failed handshake is then one log line instead of nothing (see mta/tls.py).
            assert self.tls_context is not None
            loop = asyncio.get_running_loop()

            def stream_protocol() -> asyncio.StreamReaderProtocol:   # what start_server builds
                return asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), self._accept, loop=loop)

            self.implicit = ImplicitTLS(stream_protocol, self.tls_context, self.config.limits.idle_timeout,
                                        self._handshake_failed)
            self.server = await loop.create_server(self.implicit, host=self.listener.host, port=self.listener.port,
                                                   reuse_address=True, backlog=1024, family=family)
        else:
            self.server = await asyncio.start_server(self._accept, host=self.listener.host, port=self.listener.port,
                                                     reuse_address=True, backlog=1024, family=family)
        log.info("listening on %s (%s, %s%s)", self.listener.address, self.listener.name, self.listener.mode,
                 ", implicit TLS" if self.implicit_tls else ", STLS" if self.tls_context else "")

    def _handshake_failed(self, peer: tuple[str, int] | None, sockname: tuple[str, int] | None,
                          exc: BaseException | None) -> None:
        # Dovecot's line for the same event.
        log.info("pop3-login: Disconnected (no auth attempts in 0 secs): rip=%s, lip=%s, TLS handshaking: %s",
                 peer[0] if peer else "unknown", sockname[0] if sockname else "unknown", handshake_error(exc))

    async def drain(self, grace: float) -> None:
        """After stop_accepting: end every session and wait up to ``grace`` for them.

        A session in the middle of a command (a RETR being sent, QUIT's deletions
        being committed) finishes it first; one waiting for the client is told
        "-ERR [SYS/TEMP] server shutting down" at once. Sessions in TRANSACTION
        delete nothing: the client never said QUIT (RFC 1939 §6)."""
        if self.implicit is not None:
            self.implicit.abort_handshakes()
        for session in list(self.sessions.values()):
            if session is not None:
                session.stop()
        tasks = list(self.sessions)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace)
        for task in late:
            session = self.sessions.get(task)
            if session is not None:
                session.abort()
            else:
                task.cancel()
        if late:
            await asyncio.wait(late, timeout=ABORT_WAIT)

    # ------------------------------------------------------------------ connections
    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's connection callback: start the session as a task of our own, so
        drain() can find it and its end is never reported as an unhandled error."""
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else "unknown"
        limits = self.config.limits
        # Reloaded limits apply to new connections.
        self.limiter.max_total, self.limiter.max_per_ip = limits.max_connections, limits.max_connections_per_ip
        if self.limiter.admit(ip):
            session = POP3Session(reader, writer, SessionContext(
                config=self.config, listener=self.listener, store=self.store, users=self.users,
                locks=self.locks, throttle=self.throttle, tls_context=self.tls_context, metrics=self.metrics))
            task = asyncio.create_task(self._serve(session, ip), name=f"pop3 {ip}")
            self.sessions[task] = session
        else:
            log.warning("pop3-login: connection from %s refused: too many connections", ip)
            task = asyncio.create_task(self._refuse(writer), name=f"pop3 refuse {ip}")
            self.sessions[task] = None
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.sessions.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Sessions catch their own failures; this would be a bug in the clean-up itself.
            log.error("pop3: session task failed", exc_info=exc)

    async def _serve(self, session: POP3Session, ip: str) -> None:
        try:
            await session.run()
        finally:
            self.limiter.release(ip)

    async def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """RFC 2449 §8 [SYS/TEMP]: a transient condition; the client may try again later."""
        writer.write(R.TOO_MANY_CONNECTIONS)
        writer.close()
        try:
            async with asyncio.timeout(5.0):
                await writer.wait_closed()
        except (TimeoutError, OSError):
            writer.transport.abort()
