"""Prometheus metrics and the small HTTP server that exposes them.

One :class:`Metrics` object owns its own ``CollectorRegistry`` (nothing is
registered in prometheus_client's global registry), so tests and several
daemons in one process never share counters. The composition root builds it
and passes the recording methods to the parts that produce events:

* inbound: :meth:`Metrics.message_received`, :meth:`Metrics.rejected`
* queue manager: :meth:`Metrics.recipient_result` (the scheduler's
  ``on_result`` hook), :meth:`Metrics.bounce_generated`
* delivery: :meth:`Metrics.attach_pool` (the pool's ``opened``/``reused``
  counters are read at scrape time), :meth:`Metrics.delivery_process_running`,
  :meth:`Metrics.delivery_process_restarted`
* queue: :meth:`Metrics.update_queue`, usually from the ``refresh`` hook that
  runs before every scrape.

Every label value we know in advance is created at start-up, so a series
exists (at 0) before its first event and ``rate()``/``increase()`` see the
first increment. Labels never carry addresses, message ids or client IPs:
their values come from the configuration (listener names) or from a small
fixed set (SMTP reply codes, queue states).

The HTTP side is deliberately tiny: ``GET /metrics`` for Prometheus,
``GET /`` and ``GET /healthz`` answering "ok" (or 503 with the faults of
mta/health.py) for the Docker HEALTHCHECK and systemd, one request per
connection (``Connection: close``), bounded request
size, a read timeout and a cap on concurrent connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Protocol
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

import mta
from mta.health import COMPONENTS, Health
from mta.model import LOCAL_RELAY, RcptState

log = logging.getLogger("mta.metrics")

# No *_created series: they double the output, and Prometheus reads counter resets from
# the values themselves. (A process-wide setting of prometheus_client, >= 0.17.)
disable_created_metrics()   # type: ignore[no-untyped-call]   # (untyped in prometheus_client)

# generate_latest() writes the classic text format; prometheus_client >= 0.22
# names 1.0.0 as CONTENT_TYPE_LATEST, so spell out the version we really send.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The SMTP codes our inbound side sends in negative replies.
REJECTION_CODES: tuple[str, ...] = (
    "421", "450", "451", "452",
    "500", "501", "502", "503", "504", "530", "535", "538",
    "550", "552", "553", "554", "555",
)

QUEUE_STATES: tuple[str, ...] = ("active", "deferred", "hold")
TRANSPORTS: tuple[str, ...] = ("smtp", "local")
POP3_LOGIN_RESULTS: tuple[str, ...] = ("ok", "failed", "in_use")

# Arrival to final outcome; retries run for days, so do the buckets.
DELIVERY_BUCKETS: tuple[float, ...] = (
    1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 172800, 432000,
)

MAX_REQUEST = 8192        # bytes of request line + headers we accept
READ_TIMEOUT = 10.0       # seconds a client gets to send its request head
WRITE_TIMEOUT = 10.0      # seconds a client gets to take the response
REFRESH_TIMEOUT = 5.0     # seconds the refresh hook may take before we serve without it
MAX_CONNECTIONS = 64      # concurrent HTTP connections; more get 503
LINGER_TIMEOUT = 1.0      # seconds spent discarding input after the response (see _close)
LINGER_BYTES = 65536      # bytes discarded at most after the response

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")   # RFC 9110 token (a method)
_VERSION = re.compile(r"^HTTP/\d\.\d$")

_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable",
}


class QueueSummaryLike(Protocol):
    """What :meth:`Metrics.update_queue` reads (``QueueAdmin.queue_summary``)."""

    @property
    def active(self) -> int: ...
    @property
    def deferred(self) -> int: ...
    @property
    def hold(self) -> int: ...
    @property
    def oldest_arrival(self) -> float | None: ...


class PoolLike(Protocol):
    """What :meth:`Metrics.attach_pool` reads (``delivery.pool.ConnectionPool``)."""

    @property
    def opened(self) -> int: ...
    @property
    def reused(self) -> int: ...


class RecipientResultLike(Protocol):
    """What :meth:`Metrics.recipient_result` reads (``queue.scheduler.RecipientResult``)."""

    @property
    def state(self) -> RcptState: ...
    @property
    def delay(self) -> float: ...
    @property
    def relay(self) -> str: ...


RefreshHook = Callable[[], Awaitable[None]]


class _PoolCollector:
    """Outbound connection counters, read from the pool at scrape time.

    They stay monotonic across a pool being replaced (a new pool starts at 0):
    what the old pool had counted is carried over, and a value never goes down.
    """

    def __init__(self) -> None:
        self.pool: PoolLike | None = None
        self._base = [0, 0]       # counted by pools attached earlier
        self._last = [0, 0]       # last values exposed

    def attach(self, pool: PoolLike | None) -> None:
        self._base = list(self._current())
        self.pool = pool

    def _current(self) -> tuple[int, int]:
        opened, reused = self._base
        if self.pool is not None:
            opened += int(self.pool.opened)
            reused += int(self.pool.reused)
        self._last = [max(opened, self._last[0]), max(reused, self._last[1])]
        return self._last[0], self._last[1]

    def _families(self, opened: int | None, reused: int | None) -> list[Metric]:
        out: list[Metric] = []
        for name, doc, value in (
            ("mta_smtp_connections_opened", "Outbound SMTP connections opened.", opened),
            ("mta_smtp_connections_reused", "Outbound SMTP connections reused from the cache.", reused),
        ):
            family = CounterMetricFamily(name, doc)
            if value is not None:
                family.add_metric([], value)
            out.append(family)
        return out

    def describe(self) -> list[Metric]:
        return self._families(None, None)

    def collect(self) -> Iterator[Metric]:
        opened, reused = self._current()
        yield from self._families(opened, reused)


class _HealthCollector:
    """mta_health_status{component}: 1 while the component works, 0 while it has a fault."""

    def __init__(self, health: Health):
        self.health = health

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> Metric:
        family = GaugeMetricFamily(
            "mta_health_status", "1 while the component works, 0 while it has a fault (see /healthz).",
            labels=["component"])
        for component in COMPONENTS:
            family.add_metric([component], 0.0 if self.health.failing(component) else 1.0)
        return family


class Metrics:
    def __init__(self, listeners: Iterable[str] = (), *, version: str = mta.__version__,
                 refresh: RefreshHook | None = None, process: bool = True, pop3_listeners: Iterable[str] = (),
                 health: Health | None = None):
        self.registry = CollectorRegistry()
        # The daemon's faults (mta/health.py): /healthz answers 503 with them.
        self.health = health if health is not None else Health()
        self.refresh: RefreshHook | None = refresh
        self.listeners = tuple(dict.fromkeys(listeners))
        self._inbound_metrics()
        self._pop3_metrics(tuple(dict.fromkeys(pop3_listeners)))
        self._delivery_metrics()
        self._queue_metrics()
        reg = self.registry
        self.refresh_failures = Counter(
            "mta_metrics_refresh_failures",
            "Scrapes whose refresh hook failed or timed out (queue gauges may be stale).",
            registry=reg)
        self.build_info = Gauge(
            "mta_build_info", "Build information; the value is always 1.", ["version"], registry=reg)
        self.build_info.labels(version).set(1)
        self._pool = _PoolCollector()
        reg.register(self._pool)
        reg.register(_HealthCollector(self.health))
        if process:
            ProcessCollector(registry=reg)   # process_*; Linux only, empty elsewhere
            PlatformCollector(registry=reg)  # python_info

        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[object]] = set()
        self._refresh_lock = asyncio.Lock()

    def _inbound_metrics(self) -> None:
        reg = self.registry
        self.received = Counter(
            "mta_messages_received", "Messages accepted and queued, by listener.",
            ["listener"], registry=reg)
        self.rejections = Counter(
            "mta_smtp_rejections", "Negative SMTP replies sent to clients, by listener and reply code.",
            ["listener", "code"], registry=reg)
        self.smtp_connections = Counter(
            "mta_smtp_connections", "Inbound SMTP connections accepted, by listener.", ["listener"], registry=reg)
        for name in self.listeners:
            self.received.labels(name)
            self.smtp_connections.labels(name)
            for code in REJECTION_CODES:
                self.rejections.labels(name, code)

    def _pop3_metrics(self, listeners: tuple[str, ...]) -> None:
        """Lab mailboxes (issue 7): POP3 activity per pop3 listener."""
        reg = self.registry
        self.pop3_logins = Counter(
            "mta_pop3_logins", "POP3 logins, by listener and result (ok, failed, in_use).",
            ["listener", "result"], registry=reg)
        self.pop3_retrieved = Counter(
            "mta_pop3_messages_retrieved", "Messages sent to POP3 clients by RETR, by listener.",
            ["listener"], registry=reg)
        self.pop3_deleted = Counter(
            "mta_pop3_messages_deleted", "Messages POP3 clients deleted (at QUIT), by listener.",
            ["listener"], registry=reg)
        for name in listeners:
            for result in POP3_LOGIN_RESULTS:
                self.pop3_logins.labels(name, result)
            self.pop3_retrieved.labels(name)
            self.pop3_deleted.labels(name)

    def _delivery_metrics(self) -> None:
        reg = self.registry
        self.delivered = Counter(
            "mta_recipients_delivered", "Recipients delivered, by transport (smtp: to a next hop, local: to a "
            "lab mailbox).", ["transport"], registry=reg)
        for transport in TRANSPORTS:
            self.delivered.labels(transport)
        self.deferred = Counter(
            "mta_recipients_deferred", "Delivery attempts that ended in a deferral (one per recipient).",
            registry=reg)
        self.bounced = Counter(
            "mta_recipients_bounced", "Recipients that failed for good.", registry=reg)
        self.bounces = Counter(
            "mta_bounces_generated", "Delivery status notifications (bounce messages) generated.",
            registry=reg)
        self.delivery_duration = Histogram(
            "mta_delivery_duration_seconds",
            "Time from arrival to final outcome (delivered or bounced), per recipient.",
            buckets=DELIVERY_BUCKETS, registry=reg)
        # The delivery side (mta/daemon/delivery_process.py): a child that keeps dying shows here, on
        # /healthz (component delivery_process) and in config/prometheus-alerts.yml.
        self.delivery_process_up = Gauge(
            "mta_delivery_process_up",
            "1 while the queue manager runs (the delivery process has reported ready), 0 while it is down.",
            registry=reg)
        self.delivery_process_restarts = Counter(
            "mta_delivery_process_restarts",
            "Times the delivery process was started again after it exited.", registry=reg)

    def _queue_metrics(self) -> None:
        reg = self.registry
        self.queue_messages = Gauge(
            "mta_queue_messages", "Messages in the queue, by state (as in `mta queue list`).",
            ["state"], registry=reg)
        for state in QUEUE_STATES:
            self.queue_messages.labels(state)
        self.queue_oldest_age = Gauge(
            "mta_queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue; 0 when the queue is empty.", registry=reg)

    # -------------------------------------------------------------- recording
    def message_received(self, listener: str) -> None:
        self.received.labels(listener).inc()

    def smtp_connection(self, listener: str) -> None:
        self.smtp_connections.labels(listener).inc()

    def pop3_login(self, listener: str, result: str) -> None:
        self.pop3_logins.labels(listener, result).inc()

    def pop3_message_retrieved(self, listener: str) -> None:
        self.pop3_retrieved.labels(listener).inc()

    def pop3_messages_deleted(self, listener: str, count: int) -> None:
        self.pop3_deleted.labels(listener).inc(count)

    def rejected(self, listener: str, code: int) -> None:
        """Count one negative reply (4xx/5xx) sent on ``listener``."""
        try:
            number = int(code)
        except (TypeError, ValueError):
            number = 0
        label = str(number) if 400 <= number <= 599 else "other"
        self.rejections.labels(listener, label).inc()

    def recipient_result(self, result: RecipientResultLike) -> None:
        """The scheduler's ``on_result`` hook: one recipient's delivery attempt."""
        state = result.state
        if state == RcptState.DELIVERED:
            self.delivered.labels("local" if result.relay == LOCAL_RELAY else "smtp").inc()
        elif state == RcptState.DEFERRED:
            self.deferred.inc()
            return
        elif state == RcptState.BOUNCED:
            self.bounced.inc()
        else:
            return
        self.delivery_duration.observe(max(0.0, float(result.delay)))

    def bounce_generated(self) -> None:
        self.bounces.inc()

    def delivery_process_running(self, up: bool) -> None:
        self.delivery_process_up.set(1 if up else 0)

    def delivery_process_restarted(self) -> None:
        self.delivery_process_restarts.inc()

    def attach_pool(self, pool: PoolLike | None) -> None:
        """Expose ``pool.opened``/``pool.reused``; a replaced pool's counts carry over."""
        self._pool.attach(pool)

    def update_queue(self, summary: QueueSummaryLike, now: float) -> None:
        self.queue_messages.labels("active").set(summary.active)
        self.queue_messages.labels("deferred").set(summary.deferred)
        self.queue_messages.labels("hold").set(summary.hold)
        oldest = summary.oldest_arrival
        self.queue_oldest_age.set(0.0 if oldest is None else max(0.0, now - oldest))

    # -------------------------------------------------------------- exposing
    def render(self) -> bytes:
        """The registry in the Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry)

    async def run_refresh(self) -> None:
        """Run the refresh hook (if any); failures are logged and counted, never raised."""
        hook = self.refresh
        if hook is None:
            return
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT):
                async with self._refresh_lock:   # concurrent scrapes: one refresh at a time
                    await hook()
        except TimeoutError:
            self.refresh_failures.inc()
            log.warning("metrics refresh took longer than %.0fs; serving the last values",
                        REFRESH_TIMEOUT)
        except Exception as exc:
            self.refresh_failures.inc()
            log.warning("metrics refresh failed, serving the last values: %r", exc)

    async def scrape(self) -> bytes:
        """Refresh, then render: what ``GET /metrics`` returns."""
        await self.run_refresh()
        return self.render()

    async def start_server(self, host: str, port: int) -> asyncio.Server:
        """Listen for HTTP on ``host:port`` (port 0: any free port; see ``server.sockets``).

        ``host`` None is refused rather than meaning "every interface" as it
        does for asyncio: ``MetricsConfig.host`` None means metrics are off.
        """
        if host is None:
            raise ValueError("metrics: no listen address (metrics are disabled)")
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST)
        for sock in self._server.sockets:
            log.info("metrics listening on http://%s/metrics", _format_addr(sock.getsockname()))
        return self._server

    async def stop_server(self) -> None:
        """Stop listening and end connections still being served."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()

    # -------------------------------------------------------------- HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if len(self._connections) > MAX_CONNECTIONS:
                await _respond(writer, 503, b"too many connections\n")
                return
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    head = await _read_head(reader)
            except TimeoutError:
                await _respond(writer, 408, b"request timeout\n")
                return
            except _TooLarge:
                await _respond(writer, 431, b"request too large\n")
                return
            if head is None:              # the client went away before finishing its request
                return
            status, body, headers, method = await self._route(head)
            await _respond(writer, status, body, headers, send_body=method != "HEAD")
        except (ConnectionError, TimeoutError) as exc:
            log.debug("metrics connection: %r", exc)
        except Exception:
            log.exception("metrics connection failed")
        finally:
            try:
                await _close(reader, writer, linger=not task.cancelling())   # no lingering on shutdown
            finally:
                self._connections.discard(task)

    async def _route(self, head: list[bytes]) -> tuple[int, bytes, list[tuple[str, str]], str]:
        parts = head[0].decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _VERSION.match(parts[2]) or not parts[1]:
            return 400, b"bad request\n", [], "GET"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", [("Allow", "GET, HEAD")], "GET"
        try:
            path = urlsplit(target).path
        except ValueError:
            return 400, b"bad request\n", [], method
        if path == "/metrics":
            body = await self.scrape()
            return 200, body, [("Content-Type", CONTENT_TYPE)], method
        if path in ("/", "/healthz"):
            # 503 with one line per fault: Docker's HEALTHCHECK, load balancers and people see why.
            status = 200 if self.health.ok else 503
            return status, self.health.report().encode("utf-8", "replace"), [], method
        return 404, b"not found\n", [], method


class _TooLarge(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> list[bytes] | None:
    """Request line and header lines, or None when the client closes early."""
    lines: list[bytes] = []
    total = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:                # one line longer than the stream limit
            raise _TooLarge from None
        total += len(line)
        if total > MAX_REQUEST:
            raise _TooLarge
        if not line.endswith(b"\n"):      # EOF (possibly mid-line)
            return None
        if line in (b"\r\n", b"\n"):
            if lines:
                return lines
            continue                      # RFC 9112 2.2: ignore empty lines before the request line
        lines.append(line)


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes,
                   headers: list[tuple[str, str]] | None = None, *, send_body: bool = True) -> None:
    fields = dict(headers or [])
    fields.setdefault("Content-Type", "text/plain; charset=utf-8")
    fields["Content-Length"] = str(len(body))
    fields["Connection"] = "close"
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in fields.items()) + "\r\n"
    async with asyncio.timeout(WRITE_TIMEOUT):
        writer.write(head.encode("latin-1") + (body if send_body else b""))
        await writer.drain()


async def _close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, linger: bool = True) -> None:
    """Lingering close: send FIN, discard what the client still sends, then close.

    Closing a socket with unread input makes the kernel send RST, which can
    destroy our response before the client reads it (error replies go out
    before the whole request was read).
    """
    try:
        if linger and not writer.is_closing() and writer.can_write_eof():
            writer.write_eof()
            async with asyncio.timeout(LINGER_TIMEOUT):
                discarded = 0
                while discarded < LINGER_BYTES and (chunk := await reader.read(4096)):
                    discarded += len(chunk)
    except (Exception, asyncio.CancelledError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()


def _format_addr(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)
