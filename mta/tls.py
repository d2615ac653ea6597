"""Server-side TLS handshakes, and what to say when a client abandons one.

Scanners and health probes open TLS ports all day and drop the handshake:
garbage instead of a ClientHello, a close or a reset half-way. That is an
expected event, so it is one INFO line naming the client, in Postfix's words
(``SSL_accept error from unknown[192.0.2.7]: lost connection``) -- never an
ERROR with a traceback (issue 12), and never nothing at all, which is what
asyncio and uvloop do with a failed handshake on a ``create_server(ssl=...)``
socket (they log it only in debug mode).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

# What a client can make a handshake fail with: its own doing, not a fault of ours.
HANDSHAKE_ERRORS = (OSError, ssl.SSLError, TimeoutError, EOFError)


def handshake_error(exc: BaseException | None) -> str:
    """A short reason for the log line: "lost connection", "timed out", "http request"..."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc) if exc is not None else ""
    # asyncio reports an EOF during the handshake as a bare ConnectionResetError.
    return text or "lost connection"


class ImplicitTLS(asyncio.Protocol):
    """Port-465 style TLS (RFC 8314 §3.3) for a protocol that expects a ready TLS
    transport in connection_made: the handshake runs here, through loop.start_tls,
    so that its failure can be logged as one line."""

    def __init__(self, app_factory: Callable[[], asyncio.Protocol], context: ssl.SSLContext, timeout: float,
                 log: logging.Logger, what: str, tasks: set[asyncio.Task[None]]):
        self.app_factory = app_factory
        self.context = context
        self.timeout = timeout
        self.log = log
        self.what = what           # "listener smtps", for the log line
        self.tasks = tasks         # the listener cancels handshakes still running at shutdown

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The ClientHello stays in the socket until the TLS layer reads it.
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._handshake(transport),  # type: ignore[arg-type]
                                                      name=f"tls {self.what}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        pass   # before start_tls took the transport over: _handshake sees it closing

    async def _handshake(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else "unknown"
        # Until the handshake is done the TLS layer talks to a stand-in: asyncio tells its
        # protocol about a failed handshake (connection_lost), which an SMTP session not
        # yet started cannot take.
        pending = _Pending()
        try:
            if transport.is_closing():
                raise ConnectionResetError()
            tls = await asyncio.get_running_loop().start_tls(
                transport, pending, self.context, server_side=True, ssl_handshake_timeout=self.timeout)
        except HANDSHAKE_ERRORS as exc:
            self.log.info("SSL_accept error from unknown[%s]: %s (%s)", ip, handshake_error(exc), self.what)
            transport.abort()
            return
        if tls is None:   # start_tls returns None when the connection is already gone
            self.log.info("SSL_accept error from unknown[%s]: lost connection (%s)", ip, self.what)
            transport.abort()
            return
        app = self.app_factory()
        tls.set_protocol(app)
        app.connection_made(tls)
        pending.hand_over(app)


class _Pending(asyncio.Protocol):
    """Keeps what arrives between the end of the handshake and the real protocol's start."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def hand_over(self, app: asyncio.Protocol) -> None:
        for chunk in self.data:
            app.data_received(chunk)
        if self.eof:
            app.eof_received()
        if self.lost is not None:
            app.connection_lost(self.lost[0])
