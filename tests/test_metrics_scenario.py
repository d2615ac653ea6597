"""The daemon's /metrics after a scenario: every listed name present and counting what happened."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fakedns import mx
from tests.support.in_process import listener_port, queue_rows, running, submit
from tests.support.ports import free_port
from tests.support.smtp_peer import RecordingPeer
from tests.support.waiting import wait_until
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(60)


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_metrics_count_a_scenario(relay_config, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    mx(dns_server, "lab.test", (10, "mx.lab.test", "127.0.0.3"))
    metrics_port = free_port()
    from dataclasses import replace

    from mta.config import MetricsConfig
    config = replace(relay_config(connection_cache={"idle_timeout": "5s"}),
                     metrics=MetricsConfig(host="127.0.0.1", port=metrics_port),
                     mynetworks=(__import__("ipaddress").ip_network("127.0.0.1/32"),))

    def answer(verb, arg, conn):
        return "550 5.1.1 no such user" if verb == "RCPT" and "gone" in arg else None

    async with RecordingPeer("127.0.0.2", peer_port, replies=answer), RecordingPeer("127.0.0.3", peer_port) as sender_mx, \
            running(config, deliver=True):
        for i in range(3):
            await submit(config, [f"ok{i}@example.test"])
        await submit(config, ["gone@example.test"])
        async with await Wire.connect("127.0.0.1", listener_port(config), local_addr=("127.0.0.9", 0)) as w:
            await w.ehlo()
            await w.cmd("MAIL FROM:<x@remote.test>")
            assert await w.cmd("RCPT TO:<y@remote.test>") == "554 5.7.1 <y@remote.test>: Relay access denied"
        await sender_mx.wait_for_messages(1, timeout=10)
        await wait_until(lambda: queue_rows(config) == [])
        m = await scrape(metrics_port)
    assert m[("mta_messages_received_total", (("listener", "mta"),))] == 4
    assert m[("mta_smtp_rejections_total", (("code", "554"), ("listener", "mta")))] == 1
    assert m[("mta_smtp_rejections_total", (("code", "452"), ("listener", "mta")))] == 0
    assert m[("mta_recipients_delivered_total", (("transport", "smtp"),))] == 4  # three messages and the bounce
    assert m[("mta_recipients_delivered_total", (("transport", "local"),))] == 0
    assert m[("mta_smtp_connections_total", (("listener", "mta"),))] >= 2
    assert m[("mta_recipients_bounced_total", ())] == 1
    assert m[("mta_recipients_deferred_total", ())] == 0
    assert m[("mta_bounces_generated_total", ())] == 1
    assert m[("mta_delivery_duration_seconds_count", ())] == 5
    assert m[("mta_smtp_connections_opened_total", ())] >= 2
    assert m[("mta_smtp_connections_reused_total", ())] >= 1
    for state in ("active", "deferred", "hold"):
        assert m[("mta_queue_messages", (("state", state),))] == 0
    assert m[("mta_queue_oldest_message_age_seconds", ())] == 0
    assert ("mta_build_info", (("version", "0.1.0"),)) in m
    assert ("process_cpu_seconds_total", ()) in m


async def test_queue_gauges_match_the_queue(make_config):
    metrics_port = free_port()
    from dataclasses import replace

    from mta.config import MetricsConfig
    config = replace(make_config(), metrics=MetricsConfig(host="127.0.0.1", port=metrics_port))
    async with running(config) as app:
        await submit(config, ["a@example.org"])
        await submit(config, ["b@example.org"])
        await app.store.engine.db.execute("UPDATE recipients SET state='deferred' WHERE address='b@example.org'")
        await asyncio.sleep(0.2)
        m = await scrape(metrics_port)
    assert m[("mta_queue_messages", (("state", "active"),))] == 1
    assert m[("mta_queue_messages", (("state", "deferred"),))] == 1
    assert 0 < m[("mta_queue_oldest_message_age_seconds", ())] < 30
