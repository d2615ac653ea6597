"""Third-party Mailpit clients, unmodified, against a real `mta serve` with an http listener.

* PyPI's ``mailpit-api-client`` (1.0.0, the only Mailpit client on PyPI): list with
  paging, one message, an attachment, the header fields, read status, delete. It has
  no search and no raw source, was written against Mailpit of 2023 (its Message needs
  the Read field Mailpit has since dropped: mta sends it), sends read status and
  delete as a form body, and its Headers model requires Content-Type, Date,
  Delivered-To, From and Message-Id (the test message has them).
* npm's ``mailpit-api`` (2.1.0, a TypeScript Mailpit client with no
  dependencies of its own, run by Node.js): everything else -- search, raw source, ``latest``,
  headers, parts, the text view, read status, tags, info, release, waiting for a
  message, delete by search and by IDs. Installed from tests/clients/mailpit-api's
  lock file into a temporary directory (``npm ci``); skipped where there is no npm.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from mailpit.client.api import API
from mailpit.client.models import Contact

from tests.support.web_lab import WebLab, web_lab

pytestmark = pytest.mark.timeout(90)

CLIENTS = Path(__file__).parent / "clients" / "mailpit-api"

INVOICE = (b"From: App <app@lab.test>\r\nTo: Alice <alice@lab.test>\r\nSubject: Invoice 42\r\n"
           b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <invoice-42@app.lab.test>\r\n"
           b"Delivered-To: alice@lab.test\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
           b"--b1\r\nContent-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n"
           b"--b2\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYour invoice 42 is attached.\r\n"
           b"--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Your invoice <b>42</b> is attached.</p>\r\n"
           b"--b2--\r\n"
           b"--b1\r\nContent-Type: text/plain; name=\"invoice.txt\"\r\n"
           b"Content-Disposition: attachment; filename=\"invoice.txt\"\r\n\r\nInvoice 42: 10 EUR\r\n"
           b"--b1--\r\n")
WELCOME = (b"From: App <app@lab.test>\r\nTo: bob@lab.test\r\nSubject: Welcome\r\n"
           b"Message-ID: <welcome@app.lab.test>\r\n\r\nHello Bob.\r\n")


async def two_messages(lab: WebLab) -> dict[str, dict[str, Any]]:
    """The invoice to Alice, then the welcome to Bob; their summaries by subject."""
    await lab.send(["alice@lab.test"], INVOICE)
    await lab.wait_for_messages(1)
    await lab.send(["bob@lab.test"], WELCOME)
    return {m["Subject"]: m for m in await lab.wait_for_messages(2)}


# --------------------------------------------------------------------------- PyPI: mailpit-api-client

async def test_pypi_mailpit_api_client_lists_reads_and_downloads(tmp_path):
    async with web_lab(tmp_path) as lab:
        by_subject = await two_messages(lab)
        invoice_id = by_subject["Invoice 42"]["ID"]
        api = API(lab.base, timeout=10)

        listing = await asyncio.to_thread(api.get_messages)
        assert (listing.total, listing.unread, listing.count, listing.start) == (2, 2, 2, 0)
        assert [m.subject for m in listing.messages] == ["Welcome", "Invoice 42"]
        invoice = listing.messages[1]
        assert (invoice.id, invoice.message_id, invoice.read) == (invoice_id, "invoice-42@app.lab.test", False)
        assert invoice.from_ == Contact("App", "app@lab.test")
        assert invoice.to == [Contact("Alice", "alice@lab.test")]
        assert (invoice.attachments, invoice.size) == (1, by_subject["Invoice 42"]["Size"])
        assert abs(invoice.created.timestamp() - time.time()) < 60

        second_page = await asyncio.to_thread(api.get_messages, limit=1, start=1)
        assert (second_page.count, second_page.start, second_page.total) == (1, 1, 2)
        assert [m.id for m in second_page.messages] == [invoice_id]

        message = await asyncio.to_thread(api.get_message, invoice_id)
        assert (message.id, message.subject, message.read) == (invoice_id, "Invoice 42", True)
        assert message.date == datetime.datetime(2026, 12, 2, 10, 0, tzinfo=datetime.UTC)
        assert message.text.strip() == "Your invoice 42 is attached."
        assert message.html.strip() == "<p>Your invoice <b>42</b> is attached.</p>"
        [attachment] = message.attachments
        assert (attachment.part_id, attachment.file_name, attachment.content_type, attachment.size) == \
            ("2", "invoice.txt", "text/plain", len(b"Invoice 42: 10 EUR"))
        # Opening it marked it read, as in Mailpit.
        assert (await asyncio.to_thread(api.get_messages)).unread == 1

        content = await asyncio.to_thread(api.get_message_attachment, invoice_id, "2")
        assert content == "Invoice 42: 10 EUR"     # RFC 2046 §5.1.1: the CRLF before a boundary is the boundary's

        headers = await asyncio.to_thread(api.get_message_headers, invoice_id)
        assert headers.message_id == ["<invoice-42@app.lab.test>"]
        assert headers.from_ == ["App <app@lab.test>"]
        assert headers.delivered_to == ["alice@lab.test"]
        assert headers.date == [datetime.datetime(2026, 12, 2, 10, 0, tzinfo=datetime.UTC)]
        assert headers.additional["Subject"] == ["Invoice 42"]
        assert headers.additional["Return-Path"] == ["<ci@lab.test>"]

        # An unknown ID: Mailpit's 404, which the client raises.
        with pytest.raises(httpx.HTTPStatusError) as missing:
            await asyncio.to_thread(api.get_message_headers, "NOSUCHID")
        assert missing.value.response.status_code == 404


async def test_pypi_mailpit_api_client_marks_and_deletes_by_id(tmp_path):
    # The client sends these as a form body (ids=...&Read=...), not JSON: Mailpit answers
    # its PUT with 400 and reads its DELETE as "no IDs", deleting every message; mta reads
    # the form (mailpit_api.read_body) and does what the client asks.
    async with web_lab(tmp_path) as lab:
        by_subject = await two_messages(lab)
        invoice_id, welcome_id = by_subject["Invoice 42"]["ID"], by_subject["Welcome"]["ID"]
        api = API(lab.base, timeout=10)
        await asyncio.to_thread(api.put_messages, [invoice_id], "Read", True)
        assert {m.id: m.read for m in (await asyncio.to_thread(api.get_messages)).messages} == \
            {invoice_id: True, welcome_id: False}
        await asyncio.to_thread(api.delete_messages, [welcome_id])
        assert [m.id for m in (await asyncio.to_thread(api.get_messages)).messages] == [invoice_id]
        await asyncio.to_thread(api.delete_messages, [])      # the client's "delete all"
        assert (await asyncio.to_thread(api.get_messages)).total == 0


# --------------------------------------------------------------------------- npm: mailpit-api

@pytest.fixture(scope="session")
def mailpit_api_js(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/clients/mailpit-api installed (npm ci from its lock file); the driver's path."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm and node are needed for the npm mailpit-api client")
    where = tmp_path_factory.mktemp("mailpit-api")
    for name in ("package.json", "package-lock.json", "driver.mjs"):
        shutil.copy(CLIENTS / name, where / name)
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=where, check=True,
                   timeout=300, stdout=subprocess.DEVNULL)
    return where / "driver.mjs"


async def drive(driver: Path, lab: WebLab, *calls: list[Any]) -> list[Any]:
    """Run ``calls`` through the npm client in one Node.js process; each call's result
    (an error fails the test, naming the call)."""
    argument = json.dumps({"base": lab.base, "auth": None, "calls": list(calls)})
    proc = await asyncio.create_subprocess_exec("node", str(driver), argument, stdout=asyncio.subprocess.PIPE,
                                                cwd=driver.parent)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    results = json.loads(out)
    for call, result in zip(calls, results, strict=True):
        assert "error" not in result, (call, result["error"])
    return [result["ok"] for result in results]


async def test_npm_mailpit_api_client_searches_reads_releases_and_deletes(tmp_path, mailpit_api_js):
    async with web_lab(tmp_path) as lab:
        by_subject = await two_messages(lab)
        invoice_id, welcome_id = by_subject["Invoice 42"]["ID"], by_subject["Welcome"]["ID"]
        status, _, raw = await lab.request("GET", f"/api/v1/message/{invoice_id}/raw")
        assert status == 200
        expected_listing = await lab.get_json("/api/v1/messages")
        (listing, found, attached, source, latest_source, latest, headers, part, text, info) = await drive(
            mailpit_api_js, lab,
            ["listMessages"],
            ["searchMessages", {"query": "subject:invoice"}],
            ["searchMessages", {"query": "has:attachment from:app@lab.test -subject:welcome"}],
            ["getMessageSource", invoice_id],
            ["getMessageSource"],                       # the client's default: latest
            ["getMessageSummary"],
            ["getMessageHeaders", invoice_id],
            ["getMessageAttachment", invoice_id, "2"],
            ["renderMessageText", invoice_id],
            ["getInfo"])
        assert listing == expected_listing
        assert [m["ID"] for m in found["messages"]] == [invoice_id]
        assert (found["messages_count"], found["total"]) == (1, 2)
        assert [m["ID"] for m in attached["messages"]] == [invoice_id]
        assert source.encode() == raw
        assert latest_source.encode().startswith(b"Return-Path: <ci@lab.test>\r\n") and b"Hello Bob." in \
            latest_source.encode()
        assert (latest["ID"], latest["Subject"]) == (welcome_id, "Welcome")
        assert headers["Message-Id"] == ["<invoice-42@app.lab.test>"]
        assert part == {"type": "text/plain", "size": 18, "text": "Invoice 42: 10 EUR"}
        assert text.strip() == "Your invoice 42 is attached."
        assert (info["Messages"], info["Unread"]) == (2, 1)   # getMessageSummary read the welcome

        # Read status, tags, and a release to a lab mailbox (through the queue, to Bob),
        # which the client then waits for.
        (marked, tagged, tags, released, arrived) = await drive(
            mailpit_api_js, lab,
            ["setReadStatus", {"IDs": [invoice_id], "Read": True}],
            ["setTags", {"IDs": [invoice_id], "Tags": ["billing"]}],
            ["getTags"],
            ["releaseMessage", invoice_id, {"To": ["bob@lab.test"]}],
            ["waitForMessages", {"query": "mailbox:bob@lab.test subject:invoice", "count": 1},
             {"timeout": 15000, "interval": 100}])
        assert (marked, tagged, tags, released) == ("ok", "ok", ["billing"], "ok")
        [copy] = arrived["messages"]
        assert copy["ID"] not in (invoice_id, welcome_id) and copy["Mailboxes"] == ["bob@lab.test"]
        summary = (await lab.get_json("/api/v1/search?query=tag:billing"))["messages"]
        assert [(m["ID"], m["Read"], m["Tags"]) for m in summary] == [(invoice_id, True, ["billing"])]

        # Delete by search, by IDs, then everything (no body).
        (by_search, after_search, by_ids, after_ids, everything, empty) = await drive(
            mailpit_api_js, lab,
            ["deleteMessagesBySearch", {"query": "subject:welcome"}],
            ["listMessages"],
            ["deleteMessages", {"IDs": [invoice_id]}],
            ["listMessages"],
            ["deleteMessages"],
            ["listMessages"])
        assert (by_search, by_ids, everything) == ("ok", "ok", "ok")
        assert [m["ID"] for m in after_search["messages"]] == [copy["ID"], invoice_id]
        assert [m["ID"] for m in after_ids["messages"]] == [copy["ID"]]
        assert (empty["total"], empty["messages"]) == (0, [])
