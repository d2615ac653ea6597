"""mta.metrics: the registry's contents, what the recording methods count, and the HTTP side.

Network tests run a real server on a free loopback port and talk to it with raw
asyncio streams (so garbage can be sent) and, once, with urllib in a thread.
The alert rules file is checked for shape, for metric names that exist, and --
when promtool is installed -- with ``promtool check rules`` and a
``promtool test rules`` unit test that makes each alert fire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import mta
from mta import metrics as metrics_module
from mta.metrics import DELIVERY_BUCKETS, REJECTION_CODES, Metrics
from mta.model import RcptState, Reply
from mta.queue.manager import RecipientResult
from mta.web import server as server_module
from mta.web.server import HttpServer

pytestmark = pytest.mark.timeout(10)

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "config" / "prometheus-alerts.yml"
LISTENERS = ("mta", "submission")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ---------------------------------------------------------------- helpers
def parse(text: str | bytes) -> Samples:
    if isinstance(text, bytes):
        text = text.decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def result(state: RcptState, delay: float) -> RecipientResult:
    return RecipientResult(message_id="3F2A9C1B7D01", recipient="user@example.test", state=state,
                           reply=Reply(250, "2.0.0", "ok"), relay="mx.example.test[192.0.2.1]:25",
                           delay=delay, attempts=1)


@dataclass
class FakePool:
    opened: int = 0
    reused: int = 0


@dataclass(frozen=True)
class Summary:
    active: int = 0
    deferred: int = 0
    hold: int = 0
    oldest_arrival: float | None = None


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def parse_response(data: bytes) -> Response:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version in ("HTTP/1.1", "HTTP/1.0"), version   # aiohttp answers what it cannot parse in 1.0
    headers = {}
    for line in lines[1:]:
        name, _, val = line.partition(":")
        headers[name.strip().lower()] = val.strip()
    return Response(int(status), headers, body)


async def request(port: int, path: str = "/metrics", method: str = "GET") -> Response:
    data = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: test\r\n\r\n".encode()
    response = parse_response(await raw(port, data))
    assert response.headers["connection"] == "close"
    if method != "HEAD":
        assert int(response.headers["content-length"]) == len(response.body)
    return response


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def metrics() -> Metrics:
    return Metrics(LISTENERS)


@pytest.fixture
async def port(metrics: Metrics) -> AsyncIterator[int]:
    server = HttpServer(metrics)
    await server.start("127.0.0.1", 0)
    try:
        yield server.port
    finally:
        await server.stop()


# ---------------------------------------------------------------- contents
COUNTERS = (
    "mta_recipients_deferred_total", "mta_recipients_bounced_total",
    "mta_bounces_generated_total", "mta_smtp_connections_opened_total",
    "mta_smtp_connections_reused_total", "mta_metrics_refresh_failures_total",
    "mta_delivery_process_restarts_total",
)


def test_every_name_is_present_and_preinitialised(metrics: Metrics) -> None:
    samples = parse(metrics.render())
    for listener in LISTENERS:
        assert value(samples, "mta_messages_received_total", listener=listener) == 0
        for code in REJECTION_CODES:
            assert value(samples, "mta_smtp_rejections_total", listener=listener, code=code) == 0
    for name in COUNTERS:
        assert value(samples, name) == 0
    for transport in ("smtp", "local"):
        assert value(samples, "mta_recipients_delivered_total", transport=transport) == 0
    for listener in LISTENERS:
        assert value(samples, "mta_smtp_connections_total", listener=listener) == 0
    assert not [name for name, _ in samples if name.endswith("_created")]   # off: they double the output
    for state in ("active", "deferred", "hold"):
        assert value(samples, "mta_queue_messages", state=state) == 0
    assert value(samples, "mta_queue_oldest_message_age_seconds") == 0
    assert value(samples, "mta_delivery_duration_seconds_count") == 0
    assert value(samples, "mta_delivery_duration_seconds_sum") == 0
    for bound in (*DELIVERY_BUCKETS, float("inf")):
        le = "+Inf" if bound == float("inf") else str(float(bound))
        assert value(samples, "mta_delivery_duration_seconds_bucket", le=le) == 0
    assert value(samples, "mta_build_info", version=mta.__version__) == 1


def test_metric_types(metrics: Metrics) -> None:
    types = {family.name: family.type for family in text_string_to_metric_families(metrics.render().decode())}
    for name in ("mta_messages_received", "mta_smtp_rejections", "mta_recipients_delivered",
                 "mta_recipients_deferred", "mta_recipients_bounced", "mta_bounces_generated",
                 "mta_smtp_connections_opened", "mta_smtp_connections_reused",
                 "mta_delivery_process_restarts", "mta_chaos_triggered"):
        assert types[name] == "counter", name
    assert types["mta_queue_messages"] == "gauge"
    assert types["mta_queue_oldest_message_age_seconds"] == "gauge"
    assert types["mta_build_info"] == "gauge"
    assert types["mta_delivery_process_up"] == "gauge"
    assert types["mta_delivery_duration_seconds"] == "histogram"


def test_no_addresses_or_ids_in_labels(metrics: Metrics) -> None:
    metrics.message_received("mta")
    metrics.rejected("mta", 550)
    metrics.recipient_result(result(RcptState.DELIVERED, 3.0))
    metrics.recipient_result(result(RcptState.BOUNCED, 3.0))
    label_names = {name for (metric, labels) in parse(metrics.render()) for name, _ in labels
                   if metric.startswith("mta_")}
    assert label_names <= {"listener", "code", "state", "le", "version", "component", "transport", "trigger"}
    assert "3F2A9C1B7D01" not in metrics.render().decode()
    assert "user@example.test" not in metrics.render().decode()


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(["mta"]), Metrics(["mta"])
    first.message_received("mta")
    assert value(parse(first.render()), "mta_messages_received_total", listener="mta") == 1
    assert value(parse(second.render()), "mta_messages_received_total", listener="mta") == 0


def test_build_info_version_can_be_given() -> None:
    samples = parse(Metrics(version="9.9.9").render())
    assert value(samples, "mta_build_info", version="9.9.9") == 1
    assert ("mta_build_info", frozenset({("version", mta.__version__)})) not in samples


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process metrics read /proc")
def test_process_and_platform_collectors(metrics: Metrics) -> None:
    samples = parse(metrics.render())
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "process_resident_memory_bytes") > 0
    assert {"process_open_fds", "process_start_time_seconds"} <= names(samples)
    assert "python_info" in names(samples)


def test_process_collectors_can_be_left_out() -> None:
    assert not {n for n in names(parse(Metrics(process=False).render())) if not n.startswith("mta_")}


# ---------------------------------------------------------------- recording
def test_received_and_rejected_count_per_label(metrics: Metrics) -> None:
    metrics.message_received("mta")
    metrics.message_received("mta")
    metrics.message_received("submission")
    metrics.rejected("mta", 550)
    metrics.rejected("mta", 550)
    metrics.rejected("submission", 535)
    metrics.rejected("mta", 421)
    samples = parse(metrics.render())
    assert value(samples, "mta_messages_received_total", listener="mta") == 2
    assert value(samples, "mta_messages_received_total", listener="submission") == 1
    assert value(samples, "mta_smtp_rejections_total", listener="mta", code="550") == 2
    assert value(samples, "mta_smtp_rejections_total", listener="mta", code="421") == 1
    assert value(samples, "mta_smtp_rejections_total", listener="submission", code="535") == 1
    assert value(samples, "mta_smtp_rejections_total", listener="submission", code="550") == 0


def test_rejection_codes_outside_4xx_5xx_are_bucketed(metrics: Metrics) -> None:
    metrics.rejected("mta", 551)        # not pre-initialised, still a valid code
    metrics.rejected("mta", 250)
    metrics.rejected("mta", 99999)
    metrics.rejected("mta", "junk")     # type: ignore[arg-type]
    samples = parse(metrics.render())
    assert value(samples, "mta_smtp_rejections_total", listener="mta", code="551") == 1
    assert value(samples, "mta_smtp_rejections_total", listener="mta", code="other") == 3


def test_unknown_listener_is_counted_lazily(metrics: Metrics) -> None:
    metrics.message_received("other")
    assert value(parse(metrics.render()), "mta_messages_received_total", listener="other") == 1


def test_recipient_results(metrics: Metrics) -> None:
    metrics.recipient_result(result(RcptState.DELIVERED, 10.0))
    metrics.recipient_result(result(RcptState.DELIVERED, 2.0))
    metrics.recipient_result(result(RcptState.DEFERRED, 30.0))
    metrics.recipient_result(result(RcptState.DEFERRED, 900.0))
    metrics.recipient_result(result(RcptState.DEFERRED, 4000.0))
    metrics.recipient_result(result(RcptState.BOUNCED, 100000.0))
    metrics.recipient_result(result(RcptState.HELD, 5.0))        # not an outcome: ignored
    samples = parse(metrics.render())
    assert value(samples, "mta_recipients_delivered_total", transport="smtp") == 2
    assert value(samples, "mta_recipients_delivered_total", transport="local") == 0
    metrics.recipient_result(dataclasses.replace(result(RcptState.DELIVERED, 1.0), relay="local"))
    assert value(parse(metrics.render()), "mta_recipients_delivered_total", transport="local") == 1
    assert value(samples, "mta_recipients_deferred_total") == 3
    assert value(samples, "mta_recipients_bounced_total") == 1
    # the histogram sees final outcomes only
    assert value(samples, "mta_delivery_duration_seconds_count") == 3
    assert value(samples, "mta_delivery_duration_seconds_sum") == pytest.approx(100012.0)
    assert value(samples, "mta_delivery_duration_seconds_bucket", le="1.0") == 0
    assert value(samples, "mta_delivery_duration_seconds_bucket", le="5.0") == 1
    assert value(samples, "mta_delivery_duration_seconds_bucket", le="15.0") == 2
    assert value(samples, "mta_delivery_duration_seconds_bucket", le="86400.0") == 2
    assert value(samples, "mta_delivery_duration_seconds_bucket", le="172800.0") == 3
    assert value(samples, "mta_delivery_duration_seconds_bucket", le="+Inf") == 3


def test_negative_delay_is_observed_as_zero(metrics: Metrics) -> None:
    metrics.recipient_result(result(RcptState.DELIVERED, -3.0))    # clock stepped back
    samples = parse(metrics.render())
    assert value(samples, "mta_delivery_duration_seconds_sum") == 0
    assert value(samples, "mta_delivery_duration_seconds_bucket", le="1.0") == 1


def test_recipient_result_fits_the_scheduler_hook(metrics: Metrics) -> None:
    import inspect

    from mta.queue.manager import QueueManager
    hook = inspect.signature(QueueManager.__init__).parameters["on_result"]
    assert hook.kind is inspect.Parameter.KEYWORD_ONLY
    metrics.recipient_result(result(RcptState.DELIVERED, 1.0))     # a RecipientResult is accepted


def test_bounces_generated(metrics: Metrics) -> None:
    metrics.bounce_generated()
    metrics.bounce_generated()
    assert value(parse(metrics.render()), "mta_bounces_generated_total") == 2


def test_pool_counters_follow_the_pool(metrics: Metrics) -> None:
    pool = FakePool(opened=3, reused=7)
    metrics.attach_pool(pool)
    samples = parse(metrics.render())
    assert value(samples, "mta_smtp_connections_opened_total") == 3
    assert value(samples, "mta_smtp_connections_reused_total") == 7
    pool.opened, pool.reused = 5, 20
    samples = parse(metrics.render())
    assert value(samples, "mta_smtp_connections_opened_total") == 5
    assert value(samples, "mta_smtp_connections_reused_total") == 20


def test_pool_counters_stay_monotonic(metrics: Metrics) -> None:
    metrics.attach_pool(FakePool(opened=5, reused=2))
    metrics.render()
    replacement = FakePool()                  # a new pool starts from 0
    metrics.attach_pool(replacement)
    replacement.opened, replacement.reused = 1, 1
    samples = parse(metrics.render())
    assert value(samples, "mta_smtp_connections_opened_total") == 6
    assert value(samples, "mta_smtp_connections_reused_total") == 3
    replacement.opened = 0                    # a counter going down is never exposed
    assert value(parse(metrics.render()), "mta_smtp_connections_opened_total") == 6
    metrics.attach_pool(None)
    samples = parse(metrics.render())
    assert value(samples, "mta_smtp_connections_opened_total") == 6
    assert value(samples, "mta_smtp_connections_reused_total") == 3


def test_pool_counters_work_with_the_real_pool(metrics: Metrics) -> None:
    from mta.delivery.pool import ConnectionPool
    pool = ConnectionPool(max_messages=10, idle_timeout=1.0, per_destination=1, max_idle_total=1)
    metrics.attach_pool(pool)
    pool.note_opened()
    assert value(parse(metrics.render()), "mta_smtp_connections_opened_total") == 1


def test_queue_gauges(metrics: Metrics) -> None:
    metrics.update_queue(Summary(active=3, deferred=10, hold=1, oldest_arrival=1000.0), now=1600.5)
    samples = parse(metrics.render())
    assert value(samples, "mta_queue_messages", state="active") == 3
    assert value(samples, "mta_queue_messages", state="deferred") == 10
    assert value(samples, "mta_queue_messages", state="hold") == 1
    assert value(samples, "mta_queue_oldest_message_age_seconds") == 600.5
    metrics.update_queue(SimpleNamespace(active=0, deferred=0, hold=0, oldest_arrival=None), now=2000.0)
    samples = parse(metrics.render())
    assert value(samples, "mta_queue_messages", state="deferred") == 0
    assert value(samples, "mta_queue_oldest_message_age_seconds") == 0
    metrics.update_queue(Summary(active=1, oldest_arrival=2005.0), now=2000.0)   # clock skew
    assert value(parse(metrics.render()), "mta_queue_oldest_message_age_seconds") == 0


# ---------------------------------------------------------------- HTTP
async def test_metrics_endpoint(metrics: Metrics, port: int) -> None:
    metrics.message_received("mta")
    response = await request(port, "/metrics")
    assert response.status == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse(response.body)
    assert value(samples, "mta_messages_received_total", listener="mta") == 1
    assert value(samples, "mta_smtp_rejections_total", listener="submission", code="554") == 0
    assert value(samples, "mta_build_info", version=mta.__version__) == 1


async def test_metrics_with_query_string(port: int) -> None:
    response = await request(port, "/metrics?name[]=up")
    assert response.status == 200
    assert b"mta_build_info" in response.body


async def test_with_urllib(metrics: Metrics, port: int) -> None:
    """A stock HTTP client in a thread (what Prometheus and curl look like)."""
    metrics.bounce_generated()

    def fetch(path: str) -> tuple[int, str, bytes]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()

    status, ctype, body = await asyncio.to_thread(fetch, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert value(parse(body), "mta_bounces_generated_total") == 1
    assert await asyncio.to_thread(fetch, "/healthz") == (200, "text/plain; charset=utf-8", b"ok\n")

    def missing() -> int:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code
        return 200

    assert await asyncio.to_thread(missing) == 404


@pytest.mark.parametrize("path", ["/", "/healthz"])
async def test_health(port: int, path: str) -> None:
    response = await request(port, path)
    assert response.status == 200
    assert response.body == b"ok\n"


async def test_health_is_503_with_one_line_per_fault(metrics: Metrics, port: int) -> None:
    metrics.health.fail("queue_database", "/q/queue.db is damaged:\n database disk image is malformed")
    metrics.health.fail("delivery_process", "exited with status 1")
    response = await request(port, "/healthz")
    assert response.status == 503
    assert response.body == (b"delivery_process: exited with status 1\n"
                             b"queue_database: /q/queue.db is damaged: database disk image is malformed\n")
    samples = parse((await request(port, "/metrics")).body)
    assert value(samples, "mta_health_status", component="queue_database") == 0
    assert value(samples, "mta_health_status", component="delivery_process") == 0
    assert value(samples, "mta_health_status", component="auth_users_file") == 1
    metrics.health.clear("queue_database")
    metrics.health.clear("delivery_process")
    response = await request(port, "/healthz")
    assert (response.status, response.body) == (200, b"ok\n")


async def test_health_does_not_run_the_refresh_hook(metrics: Metrics, port: int) -> None:
    calls = 0

    async def refresh() -> None:
        nonlocal calls
        calls += 1

    metrics.refresh = refresh
    await request(port, "/healthz")
    assert calls == 0


@pytest.mark.parametrize("path", ["/nope", "/metrics/", "/metricsx", "/healthz/x"])
async def test_not_found(port: int, path: str) -> None:
    response = await request(port, path)
    assert response.status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
async def test_method_not_allowed(port: int, method: str) -> None:
    response = await request(port, "/metrics", method)
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


async def test_unknown_method_is_a_bad_request(port: int) -> None:
    # aiohttp's parser (llhttp) knows the registered methods only: 400, not 405.
    response = parse_response(await raw(port, b"BREW /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert response.status == 400
    assert (await request(port, "/healthz")).status == 200


@pytest.mark.parametrize("path", ["/livez", "/readyz"])
async def test_probes(metrics: Metrics, port: int, path: str) -> None:
    assert ((r := await request(port, path)).status, r.body) == (200, b"ok\n")
    metrics.health.fail("queue_database", "damaged")
    response = await request(port, path)
    if path == "/livez":          # the process runs: alive, whatever its faults
        assert (response.status, response.body) == (200, b"ok\n")
    else:                         # not ready while it has a fault: as /healthz
        assert (response.status, response.body) == (503, b"queue_database: damaged\n")


async def test_head(port: int) -> None:
    response = await request(port, "/metrics", "HEAD")
    assert response.status == 200
    assert response.body == b""
    assert int(response.headers["content-length"]) > 0


async def test_http_1_0_and_bare_newlines(port: int) -> None:
    response = parse_response(await raw(port, b"GET /healthz HTTP/1.0\r\n\r\n"))
    assert response.status == 200 and response.body == b"ok\n"
    # aiohttp (llhttp, strict) refuses bare LF line ends with 400 (RFC 9112 2.2 allows either);
    # the old server took them. It then keeps serving.
    assert parse_response(await raw(port, b"GET /healthz HTTP/1.0\n\n")).status == 400
    assert (await request(port, "/healthz")).status == 200


async def test_http_1_1_needs_host(port: int) -> None:
    # RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host (aiohttp does).
    assert parse_response(await raw(port, b"GET /healthz HTTP/1.1\r\n\r\n")).status == 400
    assert (await request(port, "/healthz")).status == 200


@pytest.mark.parametrize("data", [
    b"hello\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /metrics HTTP/1.1 extra\r\n\r\n",
    b"GET /metrics SMTP/1.0\r\n\r\n",
    b"G\x00T /metrics HTTP/1.1\r\n\r\n",
    b"\xff\xfe\xfd\x00\x01 \x80 \x90\r\n\r\n",
    b"GET  HTTP/1.1\r\n\r\n",
    b"EHLO client.example\r\n\r\n",
])
async def test_garbage_gets_400(port: int, data: bytes) -> None:
    response = parse_response(await raw(port, data))
    assert response.status == 400
    assert (await request(port, "/healthz")).status == 200


async def test_oversized_request(port: int) -> None:
    # aiohttp's limits (8190-byte lines, 128 headers) answer 400, where the old server said 431.
    long_line = b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"
    assert parse_response(await raw(port, long_line)).status == 400
    many_headers = b"GET /metrics HTTP/1.1\r\n" + (b"X-Filler: " + b"b" * 100 + b"\r\n") * 200 + b"\r\n"
    assert parse_response(await raw(port, many_headers)).status == 400
    assert (await request(port, "/healthz")).status == 200


async def test_client_closing_early(port: int) -> None:
    assert await raw(port, b"", half_close=True) == b""
    assert await raw(port, b"GET /metrics HTT", half_close=True) == b""
    assert await raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n", half_close=True) == b""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.abort()                  # reset, no FIN
    assert (await request(port, "/healthz")).status == 200


@pytest.mark.parametrize("sent", [b"", b"GET /metrics HTTP/1.1\r\n"])
async def test_read_timeout(metrics: Metrics, monkeypatch: pytest.MonkeyPatch, sent: bytes) -> None:
    # aiohttp's keep-alive timer (armed from the connection's start) closes a connection
    # without a complete request; it sends no 408, as the old server did.
    monkeypatch.setattr(server_module, "READ_TIMEOUT", 0.2)
    server = HttpServer(metrics)
    await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(sent)                   # and then nothing
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 3) == b""
        finally:
            writer.close()
            await writer.wait_closed()
        assert (await request(server.port, "/healthz")).status == 200
    finally:
        await server.stop()


async def test_connection_cap(metrics: Metrics, port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 2)
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        await asyncio.sleep(0.05)             # let the server accept them
        assert parse_response(await raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).status == 503
    finally:
        for _, writer in idle:
            writer.close()
            await writer.wait_closed()
    await asyncio.sleep(0.05)
    assert (await request(port, "/healthz")).status == 200


async def test_stop_server_ends_idle_connections(metrics: Metrics) -> None:
    server = HttpServer(metrics)
    await server.start("127.0.0.1", 0)
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.stop(), 3)
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    await writer.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_start_server_refuses_no_host(metrics: Metrics) -> None:
    with pytest.raises(ValueError):
        await HttpServer(metrics).start(None, 0)  # type: ignore[arg-type]


async def test_concurrent_scrapes(metrics: Metrics, port: int) -> None:
    responses = await asyncio.gather(*(request(port, "/metrics") for _ in range(20)))
    assert all(r.status == 200 and b"mta_build_info" in r.body for r in responses)


# ---------------------------------------------------------------- refresh hook
async def test_refresh_hook_updates_queue_gauges_at_scrape(metrics: Metrics, port: int) -> None:
    queue = {"active": 1, "deferred": 0}

    async def refresh() -> None:
        await asyncio.sleep(0)
        metrics.update_queue(Summary(active=queue["active"], deferred=queue["deferred"], hold=2,
                                     oldest_arrival=100.0), now=160.0)

    metrics.refresh = refresh
    samples = parse((await request(port)).body)
    assert value(samples, "mta_queue_messages", state="active") == 1
    assert value(samples, "mta_queue_messages", state="hold") == 2
    assert value(samples, "mta_queue_oldest_message_age_seconds") == 60
    queue.update(active=0, deferred=7)
    samples = parse((await request(port)).body)
    assert value(samples, "mta_queue_messages", state="active") == 0
    assert value(samples, "mta_queue_messages", state="deferred") == 7


async def test_refresh_hook_given_to_constructor() -> None:
    calls = []

    async def refresh() -> None:
        calls.append(1)

    metrics = Metrics(refresh=refresh)
    assert b"mta_build_info" in await metrics.scrape()
    assert calls == [1]


async def test_failing_refresh_still_serves(metrics: Metrics, port: int,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mta.metrics")
    metrics.update_queue(Summary(deferred=4), now=0.0)

    async def refresh() -> None:
        raise RuntimeError("database is locked")

    metrics.refresh = refresh
    response = await request(port)
    assert response.status == 200
    samples = parse(response.body)
    assert value(samples, "mta_queue_messages", state="deferred") == 4     # the last values
    assert value(samples, "mta_metrics_refresh_failures_total") == 1
    assert "database is locked" in caplog.text


async def test_slow_refresh_times_out(metrics: Metrics, port: int, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mta.metrics")
    monkeypatch.setattr(metrics_module, "REFRESH_TIMEOUT", 0.1)
    cancelled = asyncio.Event()

    async def refresh() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    metrics.refresh = refresh
    response = await asyncio.wait_for(request(port), 3)
    assert response.status == 200
    assert value(parse(response.body), "mta_metrics_refresh_failures_total") == 1
    assert cancelled.is_set()
    assert "refresh took longer" in caplog.text


# ---------------------------------------------------------------- alert rules
def load_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert isinstance(doc, dict) and set(doc) == {"groups"}
    rules = []
    group_names = [group["name"] for group in doc["groups"]]
    assert len(group_names) == len(set(group_names))
    for group in doc["groups"]:
        assert group["rules"], group["name"]
        rules.extend(group["rules"])
    return rules


def test_alert_rules_shape() -> None:
    rules = load_rules()
    alerts = [rule["alert"] for rule in rules]
    assert len(alerts) == len(set(alerts))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    expected = {"MTADown", "MTAQueueLarge", "MTADeferredQueueGrowing", "MTAOldestMessageTooOld",
                "MTAHighBounceRate", "MTANoDeliveries", "MTARejectionSpike", "MTAUnhealthy",
                "MTADeliveryProcessRestarting"}
    assert expected <= set(alerts)


def test_alert_rules_use_existing_metrics() -> None:
    exposed = names(parse(Metrics(["mta"]).render()))
    used = set()
    for rule in load_rules():
        expr = re.sub(r'"[^"]*"', '""', rule["expr"])          # label values are not names
        used |= set(re.findall(r"\b((?:mta|process|python)_[a-zA-Z0-9_]+)\b", expr))
    assert used, "no metric names found"
    assert used <= exposed, used - exposed


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")


@needs_promtool
@pytest.mark.timeout(60)
def test_promtool_check_rules() -> None:
    done = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True,
                          timeout=50)
    assert done.returncode == 0, done.stdout + done.stderr


# Each alert made to fire from synthetic series (and not fire where it should not).
# Annotations are stripped from a copy of the rules, so the cases check expressions,
# `for:` and labels without repeating the texts.
PROMTOOL_TESTS = """
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="mta", instance="relay:9101"}'
        values: '0x20'
    alert_rule_test:
      - {eval_time: 3m, alertname: MTADown, exp_alerts: []}
      - eval_time: 10m
        alertname: MTADown
        exp_alerts:
          - exp_labels: {severity: critical, job: mta, instance: "relay:9101"}

  - interval: 1m
    input_series:
      - series: 'mta_queue_oldest_message_age_seconds{job="mta", instance="relay:9101"}'
        values: '14000+60x40'
    alert_rule_test:
      - {eval_time: 10m, alertname: MTAOldestMessageTooOld, exp_alerts: []}
      - eval_time: 30m
        alertname: MTAOldestMessageTooOld
        exp_alerts:
          - exp_labels: {severity: warning, job: mta, instance: "relay:9101"}

  - interval: 1m
    input_series:
      - series: 'mta_queue_messages{job="mta", instance="relay:9101", state="active"}'
        values: '900x120'
      - series: 'mta_queue_messages{job="mta", instance="relay:9101", state="deferred"}'
        values: '0+2x120'
      - series: 'mta_queue_messages{job="mta", instance="relay:9101", state="hold"}'
        values: '5000x120'
      - series: 'mta_recipients_delivered_total{job="mta", instance="relay:9101"}'
        values: '0+10x120'
      - series: 'mta_recipients_deferred_total{job="mta", instance="relay:9101"}'
        values: '0+2x120'
      - series: 'mta_recipients_bounced_total{job="mta", instance="relay:9101"}'
        values: '0x120'
    alert_rule_test:
      - {eval_time: 10m, alertname: MTAQueueLarge, exp_alerts: []}
      - eval_time: 100m
        alertname: MTAQueueLarge
        exp_alerts:
          - exp_labels: {severity: warning, job: mta, instance: "relay:9101"}
      - {eval_time: 30m, alertname: MTADeferredQueueGrowing, exp_alerts: []}
      - eval_time: 100m
        alertname: MTADeferredQueueGrowing
        exp_alerts:
          - exp_labels: {severity: warning, job: mta, instance: "relay:9101", state: deferred}
      - {eval_time: 100m, alertname: MTANoDeliveries, exp_alerts: []}
      - {eval_time: 100m, alertname: MTAQueueManagerStalled, exp_alerts: []}
      - {eval_time: 100m, alertname: MTAHighBounceRate, exp_alerts: []}

  - interval: 1m
    input_series:
      - series: 'mta_queue_messages{job="mta", instance="relay:9101", state="active"}'
        values: '3x180'
      - series: 'mta_queue_messages{job="mta", instance="relay:9101", state="deferred"}'
        values: '0x180'
      - series: 'mta_recipients_delivered_total{job="mta", instance="relay:9101"}'
        values: '5x180'
      - series: 'mta_recipients_deferred_total{job="mta", instance="relay:9101"}'
        values: '0x180'
      - series: 'mta_recipients_bounced_total{job="mta", instance="relay:9101"}'
        values: '0x180'
    alert_rule_test:
      - {eval_time: 50m, alertname: MTANoDeliveries, exp_alerts: []}
      - eval_time: 90m
        alertname: MTANoDeliveries
        exp_alerts:
          - exp_labels: {severity: warning, job: mta, instance: "relay:9101"}
      - {eval_time: 10m, alertname: MTAQueueManagerStalled, exp_alerts: []}
      - eval_time: 30m
        alertname: MTAQueueManagerStalled
        exp_alerts:
          - exp_labels: {severity: critical, job: mta, instance: "relay:9101"}

  - interval: 1m
    input_series:
      - series: 'mta_recipients_delivered_total{job="mta", instance="busy:9101"}'
        values: '0+10x120'
      - series: 'mta_recipients_bounced_total{job="mta", instance="busy:9101"}'
        values: '0+5x120'
      - series: 'mta_recipients_delivered_total{job="mta", instance="quiet:9101"}'
        values: '0x120'
      - series: 'mta_recipients_bounced_total{job="mta", instance="quiet:9101"}'
        values: '0+0.1x120'
    alert_rule_test:
      - eval_time: 90m
        alertname: MTAHighBounceRate
        exp_alerts:
          - exp_labels: {severity: warning, job: mta, instance: "busy:9101"}

  - interval: 5m                  # a day of baseline, then a spike of 1/s on listener "mta"
    input_series:
      - series: 'mta_smtp_rejections_total{job="mta", instance="relay:9101", listener="mta", code="550"}'
        values: '0+5x288 1740+300x12'
      - series: 'mta_smtp_rejections_total{job="mta", instance="relay:9101", listener="submission", code="550"}'
        values: '0+5x300'
      - series: 'mta_smtp_rejections_total{job="mta", instance="relay:9101", listener="submission", code="535"}'
        values: '0x288 0+25x12'
    alert_rule_test:
      - {eval_time: 1430m, alertname: MTARejectionSpike, exp_alerts: []}
      - eval_time: 1470m
        alertname: MTARejectionSpike
        exp_alerts:
          - exp_labels: {severity: warning, job: mta, instance: "relay:9101", listener: mta}
      - {eval_time: 1430m, alertname: MTAAuthFailures, exp_alerts: []}
      - eval_time: 1470m
        alertname: MTAAuthFailures
        exp_alerts:
          - exp_labels: {severity: warning, job: mta, instance: "relay:9101", listener: submission}

  - interval: 1m
    input_series:
      - series: 'mta_health_status{job="mta", instance="relay:9101", component="queue_database"}'
        values: '1x5 0x10'
      - series: 'mta_health_status{job="mta", instance="relay:9101", component="delivery_process"}'
        values: '1x15'
    alert_rule_test:
      - {eval_time: 6m, alertname: MTAUnhealthy, exp_alerts: []}
      - eval_time: 10m
        alertname: MTAUnhealthy
        exp_alerts:
          - exp_labels: {severity: critical, job: mta, instance: "relay:9101", component: queue_database}

  - interval: 1m                  # a child crash-looping from minute 10; another restarted once
    input_series:
      - series: 'mta_delivery_process_restarts_total{job="mta", instance="relay:9101"}'
        values: '0x10 1 3 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22'
      - series: 'mta_delivery_process_restarts_total{job="mta", instance="calm:9101"}'
        values: '0x10 1x20'
    alert_rule_test:
      - {eval_time: 10m, alertname: MTADeliveryProcessRestarting, exp_alerts: []}
      - eval_time: 20m
        alertname: MTADeliveryProcessRestarting
        exp_alerts:
          - exp_labels: {severity: critical, job: mta, instance: "relay:9101"}

  - interval: 1m
    input_series:
      - series: 'mta_metrics_refresh_failures_total{job="mta", instance="relay:9101"}'
        values: '0+1x40'
    alert_rule_test:
      - eval_time: 35m
        alertname: MTAMetricsRefreshFailing
        exp_alerts:
          - exp_labels: {severity: warning, job: mta, instance: "relay:9101"}
"""


@needs_promtool
@pytest.mark.timeout(60)
def test_promtool_alerts_fire(tmp_path: Path) -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(doc))
    tests = yaml.safe_load(PROMTOOL_TESTS)
    tests["rule_files"] = [str(rules)]
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in load_rules()}, "every alert has a case"
    unit = tmp_path / "tests.yml"
    unit.write_text(yaml.safe_dump(tests))
    done = subprocess.run([PROMTOOL, "test", "rules", str(unit)], capture_output=True, text=True,
                          timeout=50)
    assert done.returncode == 0, done.stdout + done.stderr
