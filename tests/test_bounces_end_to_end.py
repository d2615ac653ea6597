"""Bounces end to end: the DSN that reaches the sender's MX, parsed with the email package."""

from __future__ import annotations

import asyncio
import email
import email.policy
import sqlite3
import time

import pytest

from mta.errors import StoreError
from mta.model import NewMessage, RcptState, Recipient
from mta.store.api import RecipientUpdate
from mta.store.sqlite.store import SQLiteStore
from tests.support.fakedns import mx
from tests.support.in_process import queue_rows, submit
from tests.support.smtp_peer import END_OF_DATA, RecordingPeer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

BODY = b"Subject: will bounce\r\nMessage-ID: <orig@lab.test>\r\n\r\nsecret body text\r\n"


def refuse_rcpt(verb, arg, conn):
    if verb == "RCPT" and "@example.test" in arg:
        return f"550 5.1.1 <{arg.split('<')[1].split('>')[0]}>: Recipient address rejected: User unknown"
    return None


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def zones(dns, port):
    mx(dns, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    mx(dns, "lab.test", (10, "mx.lab.test", "127.0.0.3"))


async def test_failed_recipients_get_one_dsn(relay_config, dns_server, peer_port):
    zones(dns_server, peer_port)
    config = relay_config(connection_cache={"idle_timeout": "0.2s"})
    async with RecordingPeer("127.0.0.2", peer_port, replies=refuse_rcpt), \
            RecordingPeer("127.0.0.3", peer_port) as sender_mx, relay_running(config):
        queue_id = await submit(config, ["a@example.test", "b@example.test", "c@example.test"], BODY,
                                sender="lab@lab.test")
        [dsn] = await sender_mx.wait_for_messages(1, timeout=10)
        await wait_until(lambda: queue_rows(config) == [])
        await asyncio.sleep(0.3)
    assert len(sender_mx.messages) == 1  # one DSN for the batch of three failures
    assert dsn.sender == "" and dsn.rcpts == ["lab@lab.test"]
    assert sender_mx.connections[0].transcript[1].startswith("MAIL FROM:<>")
    msg = parse(dsn.data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "lab@lab.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    human, status, headers = msg.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert "a@example.test" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    per_message, *per_rcpt = blocks
    assert per_message["Reporting-MTA"] == "dns; relay.lab.test"
    assert per_message["X-Mta-Queue-ID"] == queue_id
    email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
    assert [b["Final-Recipient"] for b in per_rcpt] == [
        "rfc822; a@example.test", "rfc822; b@example.test", "rfc822; c@example.test"]
    for block in per_rcpt:
        assert block["Action"] == "failed"
        assert block["Status"] == "5.1.1"
        assert block["Remote-MTA"] == "dns; mx1.example.test"
        assert block["Diagnostic-Code"].startswith("smtp; 550 5.1.1 <")
        email.utils.parsedate_to_datetime(block["Last-Attempt-Date"])
    assert headers.get_content_type() == "text/rfc822-headers"
    returned = headers.get_payload() if isinstance(headers.get_payload(), str) else headers.as_string()
    assert "Message-ID: <orig@lab.test>" in returned and "secret body text" not in returned


async def test_no_bounce_for_null_sender(relay_config, dns_server, peer_port, caplog):
    zones(dns_server, peer_port)
    config = relay_config()
    async with RecordingPeer("127.0.0.2", peer_port, replies=refuse_rcpt), \
            RecordingPeer("127.0.0.3", peer_port) as sender_mx, relay_running(config):
        await submit(config, ["a@example.test"], BODY, sender="")
        await wait_until(lambda: queue_rows(config) == [])
        await asyncio.sleep(0.5)
    assert sender_mx.messages == []
    assert "undeliverable notification to <a@example.test> discarded" in caplog.text


async def test_double_bounce_goes_once_to_postmaster(relay_config, dns_server, peer_port):
    zones(dns_server, peer_port)
    mx(dns_server, "ops.test", (10, "mx.ops.test", "127.0.0.4"))
    config = relay_with_bounce(relay_config, "postmaster@ops.test")
    async with RecordingPeer("127.0.0.2", peer_port, replies=refuse_rcpt), \
            RecordingPeer("127.0.0.4", peer_port, replies=lambda v, a, c: "550 5.1.1 no postmaster"
                          if v == "RCPT" else None) as ops, relay_running(config):
        await submit(config, ["a@example.test"], BODY, sender="")
        await wait_until(lambda: queue_rows(config) == [])
        await asyncio.sleep(0.5)
    # The double bounce was tried once, refused, and nothing further was generated.
    rcpts = [line for conn in ops.connections for line in conn.transcript if line.startswith("RCPT")]
    assert rcpts == ["RCPT TO:<postmaster@ops.test>"]


def relay_with_bounce(relay, target):
    config = relay()
    from dataclasses import replace

    from mta.config import BounceConfig
    return replace(config, bounce=BounceConfig(double_bounce_to=target))


async def test_notify_never_suppresses_the_bounce(relay_config, dns_server, peer_port):
    zones(dns_server, peer_port)
    config = relay_config()
    from tests.support.in_process import listener_port
    from tests.support.wire import Wire
    async with RecordingPeer("127.0.0.2", peer_port, replies=refuse_rcpt), \
            RecordingPeer("127.0.0.3", peer_port) as sender_mx, relay_running(config):
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            await w.ehlo()
            await w.cmd("MAIL FROM:<lab@lab.test>")
            assert await w.cmd("RCPT TO:<a@example.test> NOTIFY=NEVER") == "250 2.1.5 Ok"
            await w.cmd("DATA")
            await w.send(BODY + b".")
            await w.reply()
        await wait_until(lambda: queue_rows(config) == [])
        await asyncio.sleep(0.5)
    assert sender_mx.messages == []


async def test_dsn_parameters_passed_to_a_dsn_capable_hop(relay_config, dns_server, peer_port):
    zones(dns_server, peer_port)
    config = relay_config()
    from tests.support.in_process import listener_port
    from tests.support.wire import Wire
    exts = ("PIPELINING", "SIZE 10240000", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES")
    async with RecordingPeer("127.0.0.2", peer_port, extensions=exts) as peer, \
            RecordingPeer("127.0.0.3", peer_port) as sender_mx, relay_running(config):
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            await w.ehlo()
            await w.cmd("MAIL FROM:<lab@lab.test> RET=HDRS ENVID=env+2B1")
            await w.cmd("RCPT TO:<ok@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;ok@example.test")
            await w.cmd("DATA")
            await w.send(BODY + b".")
            await w.reply()
        await peer.wait_for_messages(1)
        await asyncio.sleep(0.3)
    mail, rcpt = peer.connections[0].transcript[1:3]
    assert mail.endswith(" RET=HDRS ENVID=env+2B1")
    assert rcpt == "RCPT TO:<ok@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;ok@example.test"
    assert sender_mx.messages == []  # the next hop reports success itself


async def test_notify_success_to_a_hop_without_dsn_gets_relayed_report(relay_config, dns_server, peer_port):
    zones(dns_server, peer_port)
    config = relay_config()
    from tests.support.in_process import listener_port
    from tests.support.wire import Wire
    async with RecordingPeer("127.0.0.2", peer_port) as peer, RecordingPeer("127.0.0.3", peer_port) as sender_mx, \
            relay_running(config):
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            await w.ehlo()
            await w.cmd("MAIL FROM:<lab@lab.test> ENVID=abc")
            await w.cmd("RCPT TO:<ok@example.test> NOTIFY=SUCCESS")
            await w.cmd("DATA")
            await w.send(BODY + b".")
            await w.reply()
        await peer.wait_for_messages(1)
        [report] = await sender_mx.wait_for_messages(1, timeout=10)
    assert "NOTIFY" not in peer.connections[0].transcript[2]
    msg = parse(report.data)
    status = msg.get_payload()[1].get_payload()
    assert status[0]["Original-Envelope-Id"] == "abc"
    assert status[1]["Action"] == "relayed" and status[1]["Status"] == "2.0.0"


async def test_delay_warning_sent_once(relay_config, dns_server, peer_port):
    zones(dns_server, peer_port)
    config = relay_config(retry={"min_backoff": "0.3s", "max_backoff": "0.3s", "delay_warning": "0.2s"},
                   connection_cache={"idle_timeout": "0.1s"})

    def later(verb, arg, conn):
        return "451 4.3.2 try later" if verb == END_OF_DATA else None

    async with RecordingPeer("127.0.0.2", peer_port, replies=later) as peer, \
            RecordingPeer("127.0.0.3", peer_port) as sender_mx, relay_running(config):
        await submit(config, ["a@example.test"], BODY)
        await peer.wait_for(lambda: peer.counts["DATA"] >= 4, timeout=10)
        await asyncio.sleep(0.3)
    assert len(sender_mx.messages) == 1
    msg = parse(sender_mx.messages[0].data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Action"] == "delayed" and block["Status"] == "4.3.2"
    assert "Will-Retry-Until" in block


async def test_max_lifetime_bounces_with_last_error(relay_config, dns_server, peer_port):
    """Time by data: a row that arrived six days ago fails at its next 4xx."""
    zones(dns_server, peer_port)
    config = relay_config(retry={"max_lifetime": "5d"})
    store = SQLiteStore(config.queue.path)
    await store.open()
    old = time.time() - 6 * 86400
    await store.queue.enqueue(NewMessage(id="0000OLD00001", sender="lab@lab.test",
                                   recipients=(Recipient("a@example.test"),), data=BODY, arrival=old))
    await store.close()

    def later(verb, arg, conn):
        return "451 4.3.2 still busy" if verb == END_OF_DATA else None

    async with RecordingPeer("127.0.0.2", peer_port, replies=later), \
            RecordingPeer("127.0.0.3", peer_port) as sender_mx, relay_running(config):
        [dsn] = await sender_mx.wait_for_messages(1, timeout=10)
        await wait_until(lambda: queue_rows(config) == [])
    block = parse(dsn.data).get_payload()[1].get_payload()[1]
    assert block["Action"] == "failed" and block["Status"] == "4.3.2"
    assert "still busy" in block["Diagnostic-Code"]


async def test_failure_and_bounce_are_one_commit(tmp_path):
    """If the commit that records a failure fails, neither the failure nor its bounce exists."""
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    await store.queue.enqueue(NewMessage(id="AAAA00000001", sender="lab@lab.test",
                                   recipients=(Recipient("a@example.test"),), data=BODY, arrival=time.time()))
    [claimed] = (await store.queue.claim(time.time(), 10)).due
    bounce = NewMessage(id="AAAA00000001", sender="", recipients=(Recipient("lab@lab.test"),),
                        data=b"dsn", arrival=time.time())  # same id: the insert fails inside the commit
    failed = RecipientUpdate(claimed.rcpt_no, RcptState.BOUNCED, 1, time.time(), "550 5.1.1 nope")
    with pytest.raises(StoreError):   # the commit fails whole
        await store.queue.record_outcomes("AAAA00000001", [failed], time.time(), new_messages=[bounce])
    await store.close()
    with sqlite3.connect(tmp_path / "queue.db") as db:
        assert db.execute("SELECT id, sender FROM messages").fetchall() == [("AAAA00000001", "lab@lab.test")]
        assert db.execute("SELECT state, attempts FROM recipients").fetchall() == [("active", 0)]
    # After a restart the recipient is due again: the failure and its bounce will be made once, together.
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    assert await store.queue.recover_in_flight() == 1
    await store.close()


def relay_running(config):
    from tests.support.in_process import running
    return running(config, deliver=True)
