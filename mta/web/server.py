"""The daemon's HTTP server: one aiohttp application on the daemon's own loop.

It serves what the metrics address has always served -- ``GET /metrics`` for
Prometheus (:meth:`mta.metrics.Metrics.scrape`: the refresh hook, then the
registry), ``GET /`` and ``GET /healthz`` answering "ok" (or 503 with the
faults of mta/health.py) for the Docker HEALTHCHECK and systemd -- and the
probes issue 15 names: ``/livez`` (200 while the process runs) and ``/readyz``
(the same answer as ``/healthz``). HEAD works wherever GET does; another
method on a known path is 405 with ``Allow``; any other path is 404.

Parsing, limits on request lines and headers (400), keep-alive and
shutdown are aiohttp's. Ours: every connection closes after its response
(``Connection: close``, as before), a connection that does not complete its
request within :data:`READ_TIMEOUT` is closed (aiohttp's keep-alive timer,
which also runs before the first request), and more than
:data:`MAX_CONNECTIONS` at once get 503.

Metrics records and renders; this module only serves.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mta.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("mta.metrics")

READ_TIMEOUT = 10.0       # seconds a connection may sit without a complete request
MAX_CONNECTIONS = 64      # concurrent HTTP connections; a request on one more gets 503
SHUTDOWN_TIMEOUT = 1.0    # seconds stop() lets a request in progress finish

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _ServerLog(logging.Logger):
    """aiohttp's server logger, with requests it could not parse (scanners, TLS on the
    plain port, half a request line) at debug level: aiohttp logs most of them as
    errors with a traceback, and the old server logged none."""

    def exception(self, msg: object, *args: object, exc_info: object = True, **kwargs: object) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.debug(msg, *args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]
        else:
            self.error(msg, *args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]


def _server_log() -> logging.Logger:
    logger = _ServerLog("mta.metrics.http")
    logger.parent = log
    return logger


class HttpServer:
    """``await start(host, port)``, ``await stop()``; :attr:`addresses` once started."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._runner: web.AppRunner | None = None
        self.addresses: list[tuple[str, int]] = []

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._health)
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/readyz", self._health)
        app.router.add_get("/livez", self._live)
        return app

    async def start(self, host: str, port: int) -> list[tuple[str, int]]:
        """Listen for HTTP on ``host:port`` (port 0: any free port; see :attr:`addresses`).

        ``host`` None is refused rather than meaning "every interface" as it
        does for asyncio: ``MetricsConfig.host`` None means metrics are off.
        Raises OSError when the address cannot be bound (nothing is left running).
        """
        if host is None:
            raise ValueError("metrics: no listen address (metrics are disabled)")
        self._runner, self.addresses = await serve(self.application(), host, port, keepalive_timeout=READ_TIMEOUT)
        for addr in self.addresses:
            log.info("metrics listening on http://%s/metrics", _format_addr(addr))
        return self.addresses

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and end the connections still open."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -------------------------------------------------------------- handlers
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        runner = self._runner
        if runner is not None and runner.server is not None and len(runner.server.connections) > MAX_CONNECTIONS:
            response: web.StreamResponse = _text(503, "too many connections\n")
        else:
            try:
                response = await handler(request)
            except web.HTTPMethodNotAllowed as exc:
                response = _text(405, "method not allowed\n")
                response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
            except web.HTTPNotFound:
                response = _text(404, "not found\n")
        response.force_close()       # one request per connection (Connection: close)
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self.metrics.scrape()
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def _health(self, request: web.Request) -> web.Response:
        # 503 with one line per fault: Docker's HEALTHCHECK, load balancers and people see why.
        health = self.metrics.health
        return _text(200 if health.ok else 503, health.report())

    async def _live(self, request: web.Request) -> web.Response:
        return _text(200, "ok\n")


async def serve(app: web.Application, host: str, port: int, *, keepalive_timeout: float,
                ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, list[tuple[str, int]]]:
    """Serve ``app`` on ``host:port`` (TLS with ``ssl_context``): its runner, to clean up,
    and the addresses bound. OSError when the address cannot be bound (nothing is left running)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=_server_log(),
                           keepalive_timeout=keepalive_timeout, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    server = site._server                                # noqa: SLF001  (aiohttp has no public accessor)
    return runner, [sock.getsockname()[:2] for sock in getattr(server, "sockets", None) or ()]


def _text(status: int, text: str) -> web.Response:
    response = web.Response(status=status, body=text.encode("utf-8", "replace"))
    response.headers["Content-Type"] = "text/plain; charset=utf-8"
    return response


def _format_addr(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)
