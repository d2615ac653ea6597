"""Mailpit's v1 message API over the lab inbox, end to end in one process: mail
sent with smtplib to lab mailboxes, delivered locally, read back over a real
HTTP connection. Each endpoint's JSON is compared whole with Mailpit's shapes."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import poplib
import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.in_process import running
from tests.support.web import MAILBOX_PASSWORDS, Http, lab_config, port_of, send

pytestmark = pytest.mark.timeout(60)

CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,3})?Z")

PLAIN = (b"From: Carol Sender <carol@remote.test>\r\n"
         b"To: Alice <alice@lab.test>\r\n"
         b"Cc: dave@elsewhere.test\r\n"
         b"Reply-To: replies@remote.test\r\n"
         b"Subject: first plain\r\n"
         b"Message-ID: <one@remote.test>\r\n"
         b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\n"
         b"List-Unsubscribe: <mailto:leave@remote.test>, <https://remote.test/leave>\r\n"
         b"\r\n"
         b"Hello Alice,\r\nthe build is green.\r\n")

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
PDF = b"%PDF-1.4\n" + b"x" * 300 + b"\n%%EOF\n"
MULTI = (b"From: ci@remote.test\r\n"
         b"To: bob@lab.test\r\n"
         b"Subject: =?utf-8?q?r=C3=A9port?= attached\r\n"
         b"Message-ID: <two@remote.test>\r\n"
         b"MIME-Version: 1.0\r\n"
         b'Content-Type: multipart/mixed; boundary="outer"\r\n'
         b"\r\n"
         b"--outer\r\n"
         b'Content-Type: multipart/alternative; boundary="alt"\r\n'
         b"\r\n"
         b"--alt\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\n"
         b"\r\n"
         b"See the report.\r\n"
         b"--alt\r\n"
         b'Content-Type: multipart/related; boundary="rel"\r\n'
         b"\r\n"
         b"--rel\r\n"
         b"Content-Type: text/html; charset=utf-8\r\n"
         b"\r\n"
         b'<p>See the <b>report</b>.</p><img src="cid:logo@lab">\r\n'
         b"--rel\r\n"
         b"Content-Type: image/png\r\n"
         b"Content-ID: <logo@lab>\r\n"
         b"Content-Transfer-Encoding: base64\r\n"
         b"\r\n" + base64.encodebytes(PNG).replace(b"\n", b"\r\n") +
         b"--rel--\r\n"
         b"--alt--\r\n"
         b"--outer\r\n"
         b"Content-Type: application/pdf\r\n"
         b'Content-Disposition: attachment; filename="report.pdf"\r\n'
         b"Content-Transfer-Encoding: base64\r\n"
         b"\r\n" + base64.encodebytes(PDF).replace(b"\n", b"\r\n") +
         b"--outer\r\n"
         b"Content-Type: text/html\r\n"
         b'Content-Disposition: attachment; filename="page.html"\r\n'
         b"\r\n"
         b"<script>alert(1)</script>\r\n"
         b"--outer--\r\n")

HOSTILE = (b"From: spam@remote.test\r\n"
           b"To: alice@lab.test\r\n"
           b"Subject: hostile html\r\n"
           b"Content-Type: text/html; charset=utf-8\r\n"
           b"\r\n"
           b'<p>hi</p><script>fetch("/api/v1/messages",{method:"DELETE"})</script>'
           b'<img src="http://198.51.100.7/track.gif">\r\n')

SUMMARY_FIELDS = {"ID", "MessageID", "Read", "From", "To", "Cc", "Bcc", "ReplyTo", "Subject", "Created", "Tags",
                  "Size", "Attachments", "Snippet", "Mailboxes"}


@pytest.fixture
def lab(make_config: Any, tmp_path: Path) -> Any:
    return lab_config(make_config, tmp_path)


async def deliver(config: Any, http: Http, messages: list[tuple[bytes, list[str]]]) -> Any:
    """Send each message (in order, one at a time so Created orders them); the list after."""
    for n, (data, recipients) in enumerate(messages, 1):
        await asyncio.to_thread(send, config, data, recipients)
        await http.wait_for_total(n)
    return await http.messages()


async def raw_of(http: Http, entry_id: str) -> bytes:
    reply = await http.get(f"/api/v1/message/{entry_id}/raw")
    assert reply.status == 200
    return reply.body


# --------------------------------------------------------------------------- the list

async def test_list_envelope_and_summaries(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        listed = await deliver(lab, http, [(PLAIN, ["alice@lab.test", "bob@lab.test"]),
                                           (MULTI, ["bob@lab.test"])])
        assert set(listed) == {"total", "unread", "count", "messages_count", "messages_unread", "start", "tags",
                               "messages"}
        assert {k: v for k, v in listed.items() if k != "messages"} == {
            "total": 2, "unread": 2, "count": 2, "messages_count": 2, "messages_unread": 2, "start": 0, "tags": []}
        multi, plain = listed["messages"]      # newest first
        assert set(plain) == SUMMARY_FIELDS
        raw = await raw_of(http, plain["ID"])
        assert {k: v for k, v in plain.items() if k not in ("ID", "Created")} == {
            "MessageID": "one@remote.test",
            "Read": False,
            "From": {"Name": "Carol Sender", "Address": "carol@remote.test"},
            "To": [{"Name": "Alice", "Address": "alice@lab.test"}],
            "Cc": [{"Name": "", "Address": "dave@elsewhere.test"}],
            # bob got it without being named: Mailpit lists such recipients as Bcc.
            "Bcc": [{"Name": "", "Address": "bob@lab.test"}],
            "ReplyTo": [{"Name": "", "Address": "replies@remote.test"}],
            "Subject": "first plain",
            "Tags": [],
            "Size": len(raw),
            "Attachments": 0,
            "Snippet": "Hello Alice, the build is green.",
            "Mailboxes": ["alice@lab.test", "bob@lab.test"],
        }
        assert {k: v for k, v in multi.items() if k not in ("ID", "Created", "Size")} == {
            "MessageID": "two@remote.test", "Read": False, "From": {"Name": "", "Address": "ci@remote.test"},
            "To": [{"Name": "", "Address": "bob@lab.test"}], "Cc": [], "Bcc": [], "ReplyTo": [],
            "Subject": "réport attached", "Tags": [], "Attachments": 2, "Snippet": "See the report.",
            "Mailboxes": ["bob@lab.test"]}
        for summary in (plain, multi):
            assert CREATED.fullmatch(summary["Created"]), summary["Created"]
        # As times, not strings: Mailpit's format drops trailing zeros ("17.78Z" is 17.780).
        assert datetime.datetime.fromisoformat(multi["Created"]) >= datetime.datetime.fromisoformat(plain["Created"])


async def test_paging_and_mailbox_filter(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        sent = [(b"Subject: n%d\r\n\r\nbody %d\r\n" % (n, n), ["alice@lab.test" if n % 2 else "bob@lab.test"])
                for n in range(5)]
        listed = await deliver(lab, http, sent)
        subjects = [m["Subject"] for m in listed["messages"]]
        assert subjects == ["n4", "n3", "n2", "n1", "n0"]
        page = await http.messages("?start=1&limit=2")
        assert [m["Subject"] for m in page["messages"]] == ["n3", "n2"]
        assert (page["start"], page["count"], page["total"], page["messages_count"]) == (1, 2, 5, 5)
        assert (await http.messages("?start=9"))["messages"] == []
        # Mailpit ignores paging values that are not numbers.
        assert [m["Subject"] for m in (await http.messages("?start=x&limit=-3"))["messages"]] == subjects
        alice = await http.messages("?mailbox=alice@lab.test")
        assert [m["Subject"] for m in alice["messages"]] == ["n3", "n1"]
        assert (alice["total"], alice["messages_count"]) == (2, 2)


# --------------------------------------------------------------------------- one message

async def test_message_in_full_and_read_marking(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        listed = await deliver(lab, http, [(MULTI, ["bob@lab.test"]), (PLAIN, ["alice@lab.test"])])
        plain_id, multi_id = (m["ID"] for m in listed["messages"])
        reply = await http.get(f"/api/v1/message/{multi_id}")
        assert reply.status == 200
        message = reply.json()
        raw = await raw_of(http, multi_id)
        assert message == {
            "ID": multi_id, "MessageID": "two@remote.test", "Read": True,
            "From": {"Name": "", "Address": "ci@remote.test"},
            "To": [{"Name": "", "Address": "bob@lab.test"}], "Cc": [], "Bcc": [], "ReplyTo": [],
            "ReturnPath": "ci@remote.test", "Subject": "réport attached",
            "ListUnsubscribe": {"Header": "", "Links": [], "Errors": "", "HeaderPost": ""},
            "Date": listed["messages"][1]["Created"], "Tags": [],
            # RFC 2046 §5.1.1: the CRLF before a boundary belongs to the boundary.
            "Text": "See the report.",
            "HTML": '<p>See the <b>report</b>.</p><img src="cid:logo@lab">',
            "Size": len(raw),
            "Inline": [_attachment("1.2.2", "logo@lab", "image/png", "logo@lab", PNG)],
            "Attachments": [_attachment("2", "report.pdf", "application/pdf", "", PDF),
                            _attachment("3", "page.html", "text/html", "", b"<script>alert(1)</script>")],
            "Mailboxes": ["bob@lab.test"],
        }
        # Reading it marked it read, and only it.
        after = await http.messages()
        assert [(m["ID"], m["Read"]) for m in after["messages"]] == [(plain_id, False), (multi_id, True)]
        assert after["unread"] == 1
        plain = (await http.get(f"/api/v1/message/{plain_id}")).json()
        assert plain["ListUnsubscribe"] == {"Header": "<mailto:leave@remote.test>, <https://remote.test/leave>",
                                            "Links": ["mailto:leave@remote.test", "https://remote.test/leave"],
                                            "Errors": "", "HeaderPost": ""}
        assert plain["Date"] == "2026-12-02T10:00:00Z"
        assert plain["Text"] == "Hello Alice,\nthe build is green.\n"
        assert (plain["HTML"], plain["Inline"], plain["Attachments"]) == ("", [], [])


def _attachment(part_id: str, name: str, ctype: str, cid: str, payload: bytes) -> dict[str, Any]:
    return {"PartID": part_id, "FileName": name, "ContentType": ctype, "ContentID": cid, "Size": len(payload),
            "Checksums": {"MD5": hashlib.md5(payload).hexdigest(), "SHA1": hashlib.sha1(payload).hexdigest(),
                          "SHA256": hashlib.sha256(payload).hexdigest()}}


async def test_headers_raw_and_parts(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        listed = await deliver(lab, http, [(MULTI, ["bob@lab.test"]), (PLAIN, ["alice@lab.test", "bob@lab.test"])])
        plain_id, multi_id = (m["ID"] for m in listed["messages"])

        # raw: the message as sent under our Return-Path and Received, without the per-mailbox lines.
        reply = await http.get(f"/api/v1/message/{plain_id}/raw")
        assert (reply.status, reply.headers["Content-Type"]) == (200, "text/plain; charset=utf-8")
        assert reply.body.startswith(b"Return-Path: <ci@remote.test>\r\nReceived: from ")
        assert reply.body.endswith(b"\r\n" + PLAIN)
        assert b"Delivered-To" not in reply.body and b"X-Original-To" not in reply.body
        download = await http.get(f"/api/v1/message/{plain_id}/raw?dl=1")
        assert download.body == reply.body
        assert download.headers["Content-Disposition"] == f'attachment; filename="{plain_id}.eml"'

        headers = (await http.get(f"/api/v1/message/{plain_id}/headers")).json()
        assert list(headers) == sorted(headers)
        assert {k: v for k, v in headers.items() if k != "Received"} == {
            "Cc": ["dave@elsewhere.test"], "Date": ["Wed, 02 Dec 2026 10:00:00 +0000"],
            "From": ["Carol Sender <carol@remote.test>"],
            "List-Unsubscribe": ["<mailto:leave@remote.test>, <https://remote.test/leave>"],
            "Message-Id": ["<one@remote.test>"], "Reply-To": ["replies@remote.test"],
            "Return-Path": ["<ci@remote.test>"], "Subject": ["first plain"], "To": ["Alice <alice@lab.test>"]}
        [received] = headers["Received"]
        assert received.startswith("from ") and "\r" not in received and "\n" not in received

        pdf = await http.get(f"/api/v1/message/{multi_id}/part/2")
        assert (pdf.status, pdf.body, pdf.headers["Content-Type"]) == (200, PDF, "application/pdf")
        assert pdf.headers["Content-Disposition"] == "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"
        png = await http.get(f"/api/v1/message/{multi_id}/part/1.2.2")
        assert (png.body, png.headers["Content-Type"]) == (PNG, "image/png")
        assert png.headers["Content-Disposition"].startswith('inline; filename="logo@lab"')
        # An HTML attachment is a download, never a page of this origin.
        html = await http.get(f"/api/v1/message/{multi_id}/part/3")
        assert (html.body, html.headers["Content-Type"]) == (b"<script>alert(1)</script>",
                                                            "application/octet-stream")
        assert html.headers["Content-Disposition"].startswith('attachment; filename="page.html"')
        assert html.headers["X-Content-Type-Options"] == "nosniff"
        assert (await http.get(f"/api/v1/message/{multi_id}/part/9")).status == 404


async def test_latest(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        for path in ("/api/v1/message/latest", "/api/v1/message/latest/raw", "/view/latest.txt"):
            reply = await http.get(path)
            assert (reply.status, reply.text) == (404, "Message not found"), path
        empty = await http.get("/view/latest")
        assert (empty.status, empty.headers["Location"]) == (302, "/")
        listed = await deliver(lab, http, [(PLAIN, ["alice@lab.test"]), (MULTI, ["bob@lab.test"])])
        newest, older = (m["ID"] for m in listed["messages"])
        assert (await http.get("/api/v1/message/latest")).json()["ID"] == newest
        assert (await http.get("/api/v1/message/latest/headers")).json()["Message-Id"] == ["<two@remote.test>"]
        assert (await http.get("/api/v1/message/latest/raw")).body == await raw_of(http, newest)
        assert (await http.get("/api/v1/message/latest/part/2")).body == PDF
        # Narrowed by a search (Mailpit's ?query=) or a mailbox (ours).
        assert (await http.get("/api/v1/message/latest?query=subject:plain")).json()["ID"] == older
        assert (await http.get("/api/v1/message/latest?mailbox=alice@lab.test")).json()["ID"] == older
        view = await http.get("/view/latest")
        assert (view.status, view.headers["Location"]) == (302, f"/view/{newest}")
        assert (await http.get("/view/latest.txt")).text == "See the report."


# --------------------------------------------------------------------------- views

async def test_html_view_is_sandboxed(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        listed = await deliver(lab, http, [(HOSTILE, ["alice@lab.test"]), (MULTI, ["bob@lab.test"]),
                                           (PLAIN, ["alice@lab.test"])])
        plain_id, multi_id, hostile_id = (m["ID"] for m in listed["messages"])
        reply = await http.get(f"/view/{hostile_id}.html")
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
        csp = reply.headers["Content-Security-Policy"]
        directives = dict((d.strip().split(" ", 1) + [""])[:2] for d in csp.split(";"))
        assert directives["default-src"] == "'none'"        # no script, no remote fetch of anything
        assert "sandbox" in directives and "script-src" not in directives
        assert "http:" not in csp and "https:" not in csp and "*" not in csp
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.text == HOSTILE.split(b"\r\n\r\n", 1)[1].decode()
        # Inline images point at their part on this server.
        multi = await http.get(f"/view/{multi_id}.html")
        assert f'<img src="/api/v1/message/{multi_id}/part/1.2.2">' in multi.text
        text = await http.get(f"/view/{plain_id}.txt")
        assert (text.status, text.text) == (200, "Hello Alice,\nthe build is green.\n")
        no_html = await http.get(f"/view/{plain_id}.html")
        assert (no_html.status, no_html.text) == (404, "This message does not contain a HTML part")
        unknown = await http.get("/view/NOSUCHID.html")
        assert (unknown.status, unknown.text) == (404, "Message not found")


# --------------------------------------------------------------------------- search, read status, delete

async def test_search_over_http(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        await deliver(lab, http, [(PLAIN, ["alice@lab.test"]), (MULTI, ["bob@lab.test"]),
                                  (HOSTILE, ["alice@lab.test"])])
        cases = {
            "subject:plain": ["first plain"],
            'subject:"hostile html"': ["hostile html"],
            "to:bob@lab.test": ["réport attached"],
            "from:carol": ["first plain"],
            "has:attachment": ["réport attached"],
            "-subject:plain": ["hostile html", "réport attached"],
            "green": ["first plain"],
            "mailbox:alice@lab.test": ["hostile html", "first plain"],
        }
        for query, subjects in cases.items():
            reply = await http.get("/api/v1/search", params={"query": query})
            assert reply.status == 200, (query, reply.text)
            found = reply.json()
            assert [m["Subject"] for m in found["messages"]] == subjects, query
            assert (found["total"], found["messages_count"], found["count"]) == (3, len(subjects), len(subjects))
        await http.get("/api/v1/message/latest")     # reads "hostile html"
        unread = (await http.get("/api/v1/search", params={"query": "is:unread"})).json()
        assert [m["Subject"] for m in unread["messages"]] == ["réport attached", "first plain"]
        assert (unread["unread"], unread["messages_unread"]) == (2, 2)
        paged = (await http.get("/api/v1/search", params={"query": "lab.test", "start": "1", "limit": "1"})).json()
        assert ([m["Subject"] for m in paged["messages"]], paged["messages_count"], paged["start"]) == \
            (["réport attached"], 3, 1)
        narrowed = (await http.get("/api/v1/search", params={"query": "lab.test", "mailbox": "bob@lab.test"})).json()
        assert [m["Subject"] for m in narrowed["messages"]] == ["réport attached"]


async def test_bad_searches_are_400_with_the_reason(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        for method in ("GET", "DELETE"):
            for params in ({}, {"query": "  "}):
                reply = await http.request(method, "/api/v1/search", params=params)
                assert (reply.status, reply.text) == (400, "Error: no search query")
            reply = await http.request(method, "/api/v1/search", params={"query": "before:yesterdayish"})
            assert reply.status == 400
            assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert "before:" in reply.text and "\n" not in reply.text
            assert reply.text == reply.text.strip()
        reply = await http.get("/api/v1/search", params={"query": "a", "tz": "Mars/Olympus"})
        assert (reply.status, reply.text) == (400, "unknown time zone: Mars/Olympus")


async def test_read_status(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        listed = await deliver(lab, http, [(PLAIN, ["alice@lab.test"]), (MULTI, ["bob@lab.test"]),
                                           (HOSTILE, ["alice@lab.test"])])
        hostile, multi, plain = (m["ID"] for m in listed["messages"])

        async def put(body: Any, **kwargs: Any) -> tuple[int, str]:
            reply = await http.request("PUT", "/api/v1/messages", json=body, **kwargs)
            return reply.status, reply.text

        async def read_flags() -> list[bool]:
            return [m["Read"] for m in (await http.messages())["messages"]]

        assert await put({"IDs": [multi], "Read": True}) == (200, "ok")
        assert await read_flags() == [False, True, False]
        assert await put({"Search": "subject:plain", "Read": True}) == (200, "ok")
        assert await read_flags() == [False, True, True]
        assert await put({"ids": [multi], "read": False}) == (200, "ok")   # Go's decoder ignores case
        assert await read_flags() == [False, False, True]
        assert await put({"Read": True}) == (200, "ok")                    # neither: every message
        assert await read_flags() == [True, True, True]
        assert (await http.messages())["unread"] == 0
        assert await put({}) == (200, "ok")                                # Read defaults to false
        assert await read_flags() == [False, False, False]
        assert await put({"IDs": [hostile], "Search": "x", "Read": True}) == \
            (400, "You may specify either IDs or a search query, not both")
        assert await put({"IDs": "one", "Read": True}) == (400, "IDs must be an array of strings")
        assert await put({"IDs": [hostile], "Read": "yes"}) == (400, "Read must be true or false")
        assert await put({"Search": "larger:huge", "Read": True}) == \
            (400, (await http.get("/api/v1/search", params={"query": "larger:huge"})).text)
        bad = await http.request("PUT", "/api/v1/messages", data=b'{"IDs": [', headers={"Content-Type": "application/json"})
        assert bad.status == 400 and bad.text.startswith("invalid JSON body: ") and "\n" not in bad.text
        assert await read_flags() == [False, False, False]


def pop3_count(config: Any, user: str) -> int:
    pop = poplib.POP3("127.0.0.1", port_of(config, "pop3"), timeout=10)
    try:
        pop.user(user)
        pop.pass_(MAILBOX_PASSWORDS[user])
        return int(pop.stat()[0])
    finally:
        pop.quit()


async def test_delete_over_http_removes_every_mailbox_copy(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        listed = await deliver(lab, http, [(PLAIN, ["alice@lab.test", "bob@lab.test"]), (MULTI, ["bob@lab.test"]),
                                           (HOSTILE, ["alice@lab.test"])])
        hostile, multi, plain = (m["ID"] for m in listed["messages"])
        assert await asyncio.to_thread(pop3_count, lab, "alice@lab.test") == 2
        assert await asyncio.to_thread(pop3_count, lab, "bob@lab.test") == 2

        reply = await http.request("DELETE", "/api/v1/messages", json={"IDs": [plain, "NOSUCHID"]})
        assert (reply.status, reply.text) == (200, "ok")
        assert [m["ID"] for m in (await http.messages())["messages"]] == [hostile, multi]
        assert await asyncio.to_thread(pop3_count, lab, "alice@lab.test") == 1
        assert await asyncio.to_thread(pop3_count, lab, "bob@lab.test") == 1
        assert (await http.get(f"/api/v1/message/{plain}")).status == 404

        reply = await http.request("DELETE", "/api/v1/search", params={"query": "subject:hostile"})
        assert (reply.status, reply.text) == (200, "ok")
        assert [m["ID"] for m in (await http.messages())["messages"]] == [multi]
        assert await asyncio.to_thread(pop3_count, lab, "alice@lab.test") == 0

        bad = await http.request("DELETE", "/api/v1/messages", data=b"{nope", headers={"Content-Type": "application/json"})
        assert bad.status == 400      # a garbled body deletes nothing
        assert (await http.messages())["total"] == 1
        reply = await http.request("DELETE", "/api/v1/messages")      # no body: every message
        assert (reply.status, reply.text) == (200, "ok")
        assert (await http.messages())["total"] == 0
        assert await asyncio.to_thread(pop3_count, lab, "bob@lab.test") == 0


async def test_pop3_dele_keeps_the_entry_while_another_copy_remains(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        await deliver(lab, http, [(PLAIN, ["alice@lab.test", "bob@lab.test"])])

        def dele_alice() -> None:
            pop = poplib.POP3("127.0.0.1", port_of(lab, "pop3"), timeout=10)
            pop.user("alice@lab.test")
            pop.pass_(MAILBOX_PASSWORDS["alice@lab.test"])
            pop.dele(1)
            pop.quit()

        await asyncio.to_thread(dele_alice)
        [entry] = (await http.messages())["messages"]
        assert entry["Mailboxes"] == ["bob@lab.test"]
        assert (await http.messages("?mailbox=alice@lab.test"))["total"] == 0


# --------------------------------------------------------------------------- errors, tags, info

async def test_unknown_ids_are_404(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        for path in ("/api/v1/message/NOSUCHID", "/api/v1/message/NOSUCHID/headers", "/api/v1/message/NOSUCHID/raw",
                     "/api/v1/message/NOSUCHID/part/1"):
            reply = await http.get(path)
            assert (reply.status, reply.text) == (404, "404 page not found"), path
        reply = await http.request("PATCH", "/api/v1/messages")
        assert (reply.status, reply.text) == (405, "method not allowed")


async def test_tags(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        listed = await deliver(lab, http, [(PLAIN, ["alice@lab.test"]), (MULTI, ["bob@lab.test"])])
        multi, plain = (m["ID"] for m in listed["messages"])
        reply = await http.request("PUT", "/api/v1/tags", json={"IDs": [plain, multi], "Tags": ["ci", "nightly"]})
        assert (reply.status, reply.text) == (200, "ok")
        await http.request("PUT", "/api/v1/tags", json={"IDs": [multi], "Tags": ["ci"]})
        assert (await http.get("/api/v1/tags")).json() == ["ci", "nightly"]
        listed = await http.messages()
        assert [m["Tags"] for m in listed["messages"]] == [["ci"], ["ci", "nightly"]]
        assert listed["tags"] == ["ci", "nightly"]
        found = (await http.get("/api/v1/search", params={"query": "tag:nightly"})).json()
        assert [m["ID"] for m in found["messages"]] == [plain]
        info = (await http.get("/api/v1/info")).json()
        assert info["Tags"] == {"ci": 2, "nightly": 1}


async def test_info(lab: Any) -> None:
    async with running(lab, deliver=True), Http(lab) as http:
        listed = await deliver(lab, http, [(PLAIN, ["alice@lab.test"]), (MULTI, ["bob@lab.test"])])
        await http.get(f"/api/v1/message/{listed['messages'][0]['ID']}")
        await http.request("DELETE", "/api/v1/messages", json={"IDs": [listed["messages"][1]["ID"]]})
        info = (await http.get("/api/v1/info")).json()
        assert set(info) == {"Version", "LatestVersion", "Database", "DatabaseSize", "Messages", "Unread", "Tags",
                             "RuntimeStats"}
        assert set(info["RuntimeStats"]) == {"Uptime", "Memory", "MessagesDeleted", "SMTPAccepted",
                                             "SMTPAcceptedSize", "SMTPRejected", "SMTPIgnored"}
        from mta import __version__
        assert (info["Version"], info["LatestVersion"], info["Database"]) == (__version__, "", lab.queue.path)
        assert info["DatabaseSize"] > 0 and info["RuntimeStats"]["Memory"] > 0
        assert (info["Messages"], info["Unread"], info["Tags"]) == (1, 0, {})
        assert (info["RuntimeStats"]["MessagesDeleted"], info["RuntimeStats"]["SMTPAccepted"]) == (1, 2)


# --------------------------------------------------------------------------- NUL

NUL_SUBJECT = (b"From: =?utf-8?q?Nul=00Name?= <carol@remote.test>\r\nTo: alice@lab.test\r\n"
               b"Subject: =?utf-8?q?before=00after?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: quoted-printable\r\n\r\nbody=00text\r\n")


async def test_nul_never_reaches_the_store(lab: Any) -> None:
    """A decoded NUL in a message reads as U+FFFD; a NUL in a request is a 400 (PostgreSQL's
    text refuses NUL, and both backends must answer alike)."""
    async with running(lab, deliver=True), Http(lab) as http:
        listed = await deliver(lab, http, [(NUL_SUBJECT, ["alice@lab.test"])])
        [summary] = listed["messages"]
        assert summary["Subject"] == "before\ufffdafter"
        assert summary["From"] == {"Name": "Nul\ufffdName", "Address": "carol@remote.test"}
        assert summary["Snippet"] == "body\ufffdtext"
        for path in ("/api/v1/message/A%00B", "/api/v1/search?query=a%00b", "/api/v1/messages?query=%00"):
            reply = await http.get(path)
            assert (reply.status, reply.text) == (400, "NUL character in the request"), path
        for body, reason in (({"IDs": ["A\u0000B"], "Read": True}, "IDs: NUL character in a string"),
                             ({"Search": "a\u0000b", "Read": True}, "NUL character in the search")):
            reply = await http.request("PUT", "/api/v1/messages", json=body)
            assert (reply.status, reply.text) == (400, reason)
        tagged = await http.request("PUT", "/api/v1/tags", json={"IDs": [summary["ID"]], "Tags": ["a\u0000"]})
        assert (tagged.status, tagged.text) == (400, "Tags: NUL character in a string")
