"""POST /api/v1/message/{ID}/release on a real `mta serve`: the message goes through the
queue to a recording SMTP peer found by MX on a loopback DNS server, with the original
envelope sender and a Received field of its own; a 451 is retried; the relay rules of
an SMTP listener apply; bad IDs and bodies get Mailpit's codes with a one-line reason."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.support.fakedns import mx
from tests.support.smtp_peer import END_OF_DATA, RecordingPeer
from tests.support.users import write_users
from tests.support.waiting import wait_until
from tests.support.web_lab import WebLab, basic, web_lab

pytestmark = pytest.mark.timeout(60)

BODY = (b"From: App <app@lab.test>\r\nTo: alice@lab.test\r\nSubject: your code\r\n"
        b"Message-ID: <code-1@app.lab.test>\r\n\r\nYour code is 1234.\r\n")


def delivery(dns_server, peer_port, **extra):
    """Delivery through the loopback DNS to the peers' port, with quick retries."""
    return {"port": peer_port, "dns": {"nameservers": ["127.0.0.1"], "port": dns_server.port, "timeout": "2s"},
            "retry": {"min_backoff": "0.4s", "max_backoff": "2s"}, "connection_cache": {"idle_timeout": "0.1s"},
            "timeouts": {"connect": "2s", "command": "5s"}, **extra}


async def one_entry(lab: WebLab) -> tuple[str, bytes]:
    """Mail from ci@lab.test to alice's lab mailbox; its entry's ID and raw bytes."""
    await lab.send(["alice@lab.test"], BODY)
    [summary] = await lab.wait_for_messages(1)
    status, _, raw = await lab.request("GET", f"/api/v1/message/{summary['ID']}/raw")
    assert status == 200
    return summary["ID"], raw


async def release(lab: WebLab, entry_id: str, body: object, **headers: str | None) -> tuple[int, dict[str, str], str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, headers, text = await lab.request("POST", f"/api/v1/message/{entry_id}/release", data=data,
                                              headers={"Content-Type": "application/json", **headers})
    return status, headers, text.decode()


async def test_release_goes_through_the_queue_to_the_next_hop(tmp_path, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    async with RecordingPeer("127.0.0.2", peer_port) as peer, \
            web_lab(tmp_path, delivery=delivery(dns_server, peer_port)) as lab:
        entry_id, raw = await one_entry(lab)
        status, headers, text = await release(lab, entry_id, {"To": ["Bob <bob@example.test>"]})
        assert (status, text) == (200, "ok")
        queue_id = headers["X-Queue-Id"]
        [received] = await peer.wait_for_messages(1, timeout=15)
        # The original envelope sender; the bytes the API serves, without the lab
        # mailbox's Return-Path, under a Received field naming the release.
        assert raw.startswith(b"Return-Path: <ci@lab.test>\r\n")
        assert (received.sender, received.rcpts) == ("ci@lab.test", ["bob@example.test"])
        trace, _, rest = received.data.partition(b"\r\nReceived: ")
        assert re.fullmatch(
            rb"Received: from \[127\.0\.0\.1\]\r\n\tby relay\.lab\.test \(mta\) with HTTP id " + queue_id.encode()
            + rb"\r\n\t\(released from inbox entry " + entry_id.encode() + rb"\)\r\n\tfor <bob@example\.test>; "
            rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000", trace), trace
        assert b"Received: " + rest == raw.removeprefix(b"Return-Path: <ci@lab.test>\r\n")
        await wait_until(lambda: f"{queue_id}: removed" in lab.log_text(), 10)
        log = lab.log_text()
        assert (f"{queue_id}: released from inbox by http: entry={entry_id}, client=127.0.0.1, "
                "to=<bob@example.test>") in log
        assert re.search(rf"{queue_id}: from=<ci@lab\.test>, size=\d+, nrcpt=1 \(queue active\)", log)
        assert re.search(rf"{queue_id}: to=<bob@example\.test>, relay=mx1\.example\.test\[127\.0\.0\.2\]:"
                         rf"{peer_port}, .*status=sent", log)
        # The lab entry stays where it was.
        assert [m["ID"] for m in (await lab.get_json("/api/v1/messages"))["messages"]] == [entry_id]


async def test_a_451_is_retried_from_the_queue(tmp_path, dns_server, peer_port):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    answers: list[str] = []

    def first_451(verb, arg, conn):
        if verb == END_OF_DATA:
            answers.append("451" if not answers else "250")
            return "451 4.3.0 Try again later" if len(answers) == 1 else None
        return None

    async with RecordingPeer("127.0.0.2", peer_port, replies=first_451) as peer, \
            web_lab(tmp_path, delivery=delivery(dns_server, peer_port)) as lab:
        entry_id, raw = await one_entry(lab)
        status, headers, _ = await release(lab, "latest", {"To": ["bob@example.test"]})
        assert status == 200
        queue_id = headers["X-Queue-Id"]
        [received] = await peer.wait_for_messages(1, timeout=20)
        assert answers == ["451", "250"]
        assert received.data.endswith(raw.removeprefix(b"Return-Path: <ci@lab.test>\r\n"))
        await wait_until(lambda: f"{queue_id}: removed" in lab.log_text(), 10)
        log = lab.log_text()
        assert re.search(rf"{queue_id}: to=<bob@example\.test>, relay=mx1\.example\.test\[127\.0\.0\.2\]:{peer_port}, "
                         r".*dsn=4\.3\.0, status=deferred \(451 4\.3\.0 Try again later\)", log), log
        assert re.search(rf"{queue_id}: to=<bob@example\.test>, .*status=sent", log)


async def test_relay_rules_of_an_smtp_listener_apply(tmp_path, dns_server, peer_port):
    mx(dns_server, "partner.test", (10, "mx1.partner.test", "127.0.0.2"))
    # 127.0.0.1 is not in mynetworks: this client may release to relay_domains and lab mailboxes only.
    async with RecordingPeer("127.0.0.2", peer_port) as peer, \
            web_lab(tmp_path, delivery=delivery(dns_server, peer_port), mynetworks=["192.0.2.0/24"],
                    relay_domains=["partner.test"]) as lab:
        entry_id, _ = await one_entry(lab)
        status, _, text = await release(lab, entry_id, {"To": ["x@elsewhere.test"]})
        assert (status, text) == (400, "<x@elsewhere.test>: Relay access denied")
        status, _, text = await release(lab, entry_id, {"To": ["ok@partner.test", "x@elsewhere.test"]})
        assert (status, text) == (400, "<x@elsewhere.test>: Relay access denied")   # nothing queued
        status, _, text = await release(lab, entry_id, {"To": ["nobody@lab.test"]})
        assert (status, text) == (400, "<nobody@lab.test>: Recipient address rejected: "
                                       "User unknown in local recipient table")
        status, _, text = await release(lab, entry_id, {"To": ["ok@partner.test"]})
        assert (status, text) == (200, "ok")
        [received] = await peer.wait_for_messages(1, timeout=15)
        assert received.rcpts == ["ok@partner.test"]
        # A lab mailbox is a local recipient: the release lands there as a new entry.
        status, _, _ = await release(lab, entry_id, {"To": ["bob@lab.test"]})
        assert status == 200
        summaries = await lab.wait_for_messages(2)
        assert summaries[0]["Mailboxes"] == ["bob@lab.test"]
        assert "NOQUEUE" not in lab.log_text()
        assert len(peer.messages) == 1


async def test_a_client_that_passed_basic_auth_may_release_anywhere(tmp_path, dns_server, peer_port):
    mx(dns_server, "elsewhere.test", (10, "mx1.elsewhere.test", "127.0.0.2"))
    web_users = tmp_path / "web.users"
    write_users(web_users, {"tester": "web pw"})
    async with RecordingPeer("127.0.0.2", peer_port) as peer, \
            web_lab(tmp_path, delivery=delivery(dns_server, peer_port), mynetworks=["192.0.2.0/24"],
                    web={"users_file": str(web_users)}) as lab:
        lab.authorization = basic("tester", "web pw")
        entry_id, _ = await one_entry(lab)
        status, headers, text = await release(lab, entry_id, {"To": ["x@elsewhere.test"]})
        assert (status, text) == (200, "ok")
        await peer.wait_for_messages(1, timeout=15)
        assert (f"{headers['X-Queue-Id']}: released from inbox by http: entry={entry_id}, client=127.0.0.1, "
                "user=tester, to=<x@elsewhere.test>") in lab.log_text()
        status, _, _ = await release(lab, entry_id, {"To": ["x@elsewhere.test"]}, Authorization=None)
        assert status == 401


async def test_bad_ids_and_bodies_get_mailpits_codes(tmp_path):
    async with web_lab(tmp_path) as lab:
        status, _, text = await release(lab, "latest", {"To": ["alice@lab.test"]})
        assert (status, text) == (404, "Message not found")     # Mailpit's words for latest in an empty inbox
        entry_id, _ = await one_entry(lab)
        cases = [
            ("NOSUCHID", {"To": ["alice@lab.test"]}, 404, "404 page not found"),
            (entry_id, b"{not json", 400, None),
            (entry_id, {}, 400, "No valid addresses found"),
            (entry_id, {"To": []}, 400, "No valid addresses found"),
            (entry_id, b"", 400, "No valid addresses found"),
            (entry_id, [], 400, "the JSON body must be an object"),
            (entry_id, {"To": "alice@lab.test"}, 400, "To must be an array of strings"),
            (entry_id, {"To": [7]}, 400, "To must be an array of strings"),
            (entry_id, {"To": ["not an address"]}, 400, "Invalid email address: not an address"),
            (entry_id, {"To": ["a@x.test, b@x.test"]}, 400, "Invalid email address: a@x.test, b@x.test"),
            (entry_id, {"To": ["a@x.test\r\nRCPT TO:<b@x.test>"]}, 400,
             "Invalid email address: 'a@x.test\\r\\nRCPT TO:<b@x.test>'"),
        ]
        for target, body, want_status, want_text in cases:
            status, headers, text = await release(lab, target, body)
            assert status == want_status, (target, body, text)
            assert "\n" not in text and headers["Content-Type"].startswith("text/plain"), text
            if want_text is None:
                assert text.startswith("invalid JSON body: "), text
            else:
                assert text == want_text, (body, text)
        status, headers, _ = await lab.request("GET", f"/api/v1/message/{entry_id}/release")
        assert status == 405 and headers["Allow"] == "POST"
        await asyncio.sleep(0.2)
        assert "released from inbox" not in lab.log_text()
        assert "Traceback" not in lab.log_text()


async def test_one_hop_too_many_is_refused_as_a_loop(tmp_path):
    # Inbound accepts up to max_hops Received fields; the release adds one more of its own.
    async with web_lab(tmp_path, limits={"max_hops": 2}) as lab:
        await lab.send(["alice@lab.test"], b"Received: from elsewhere.test; Wed, 02 Dec 2026 10:00:00 +0000\r\n" + BODY)
        [summary] = await lab.wait_for_messages(1)
        status, _, text = await release(lab, summary["ID"], {"To": ["bob@lab.test"]})
        assert (status, text) == (400, "Too many hops (mail loop?)")
