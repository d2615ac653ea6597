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
import functools
import ssl
import weakref
from asyncio import sslproto
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


class _ServerTLS(sslproto.SSLProtocol):
    """asyncio's own TLS layer (what create_server(ssl=...) uses, and aiosmtpd's
    STARTTLS), remembering who the client is for the log line."""

    peer: tuple[str, int] | None = None
    sockname: tuple[str, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        super().connection_made(transport)


FailureHook = Callable[[tuple[str, int] | None, tuple[str, int] | None, BaseException | None], None]


class ImplicitTLS:
    """A protocol factory for create_server: port-465/995 style TLS (RFC 8314 §3.3)
    whose handshake outcome we see. On success the protocol from ``app_factory``
    gets the TLS transport, as with create_server(ssl=...); on failure
    ``on_failure(peer, sockname, exc)`` is called to log it.

    The TLS layer is the protocol from the first byte: with loop.start_tls after
    accept, uvloop starts reading as soon as connection_made returns, and the
    ClientHello went to the wrong protocol."""

    def __init__(self, app_factory: Callable[[], asyncio.BaseProtocol], context: ssl.SSLContext, timeout: float,
                 on_failure: FailureHook):
        self.app_factory = app_factory
        self.context = context
        self.timeout = timeout
        self.on_failure = on_failure
        self.in_handshake: weakref.WeakSet[_ServerTLS] = weakref.WeakSet()

    def __call__(self) -> asyncio.BaseProtocol:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        # Until the handshake is done the TLS layer talks to a stand-in: asyncio tells its
        # protocol about a failed handshake (connection_lost), which a session not yet
        # started cannot take.
        pending = _Pending()
        tls = _ServerTLS(loop, pending, self.context, waiter, server_side=True, call_connection_made=False,
                         ssl_handshake_timeout=self.timeout)   # type: ignore[arg-type]  # typeshed: int
        self.in_handshake.add(tls)
        waiter.add_done_callback(functools.partial(self._done, tls, pending))
        return tls

    def _done(self, tls: _ServerTLS, pending: _Pending, waiter: asyncio.Future[None]) -> None:
        self.in_handshake.discard(tls)
        if waiter.cancelled():
            return
        exc = waiter.exception()
        transport = tls._app_transport
        if exc is not None or transport is None or tls._transport is None:
            self.on_failure(tls.peer, tls.sockname, exc)
            return
        app = self.app_factory()
        transport.set_protocol(app)
        app.connection_made(transport)
        pending.hand_over(app)

    def abort_handshakes(self) -> None:
        """Shutdown: connections still in their handshake are dropped."""
        for tls in list(self.in_handshake):
            transport = tls._transport
            if isinstance(transport, asyncio.Transport):
                transport.abort()


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

    def hand_over(self, app: asyncio.BaseProtocol) -> None:
        assert isinstance(app, asyncio.Protocol)
        for chunk in self.data:
            app.data_received(chunk)
        if self.eof:
            app.eof_received()
        if self.lost is not None:
            app.connection_lost(self.lost[0])
