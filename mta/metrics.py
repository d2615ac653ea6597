"""Prometheus metrics: the registry, what records into it, and rendering it.

One :class:`Metrics` object owns its own ``CollectorRegistry`` (nothing is
registered in prometheus_client's global registry), so tests and several
daemons in one process never share counters. The composition root builds it
and passes the recording methods to the parts that produce events:

* inbound: :meth:`Metrics.message_received`, :meth:`Metrics.rejected`,
  :meth:`Metrics.chaos_triggered`
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

Serving it over HTTP (``GET /metrics``, ``/healthz`` ...) is mta/web/server.py's job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Protocol

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
CHAOS_TRIGGERS: tuple[str, ...] = ("sender", "recipient", "authentication")   # mta/inbound/chaos.py

# Arrival to final outcome; retries run for days, so do the buckets.
DELIVERY_BUCKETS: tuple[float, ...] = (
    1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 172800, 432000,
)

REFRESH_TIMEOUT = 5.0     # seconds the refresh hook may take before we serve without it


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
        self.chaos = Counter(
            "mta_chaos_triggered", "Chaos triggers that fired (fault injection, `chaos: true`), by trigger "
            "(sender, recipient, authentication) and listener.", ["trigger", "listener"], registry=reg)
        for name in self.listeners:
            self.received.labels(name)
            self.smtp_connections.labels(name)
            for trigger in CHAOS_TRIGGERS:
                self.chaos.labels(trigger, name)
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

    def chaos_triggered(self, listener: str, trigger: str) -> None:
        """A chaos trigger (sender, recipient, authentication) answered a client on ``listener``."""
        self.chaos.labels(trigger, listener).inc()

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
