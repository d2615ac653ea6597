"""The web UI in a real browser: Debian's chromium driven by Playwright (issue 15).

One `mta serve` for the module, with an SMTP listener for mail from the lab
(local domain lab.test, every address a mailbox) and an http listener serving
the UI and the API. Mail arrives over real SMTP; released and relayed mail goes
to a RecordingPeer on 127.0.0.2 (its own thread and loop: Playwright's sync API
owns this one) whose RCPT replies a test can script, to keep mail deferred in
the queue. A plain HTTP listener on loopback counts every request: hostile HTML
that tries to load from it must not reach it.

One headless browser for the module, a fresh context (cookies, storage) per test.
Playwright downloads nothing: it drives /usr/bin/chromium (.ci/run installs it).
``MTA_UPDATE_SCREENSHOT=1`` writes the README's docs/screenshot.png from the
screenshot test (otherwise it goes to the test's temporary folder).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import shutil
import smtplib
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.support.daemon import ROOT, start_daemon
from tests.support.ports import free_port
from tests.support.smtp_peer import RecordingPeer
from tests.support.users import write_users
from tests.support.waiting import wait_until_sync

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "docs" / "screenshot.png"
TITLE = "mta lab inbox"
UNREAD = re.compile(r"\bunread\b")
WAIT_MS = 10_000      # what the page may take to show a change (events, a reload, delivery)

# Every expectation and action may wait this long: CI runs these beside other tests on two cores.
expect.set_options(timeout=WAIT_MS)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"),
]


# --------------------------------------------------------------------------- the lab

@dataclass
class Script:
    """The peer's RCPT reply per recipient address (250 when not named)."""

    rcpt: dict[str, str] = field(default_factory=dict)

    def __call__(self, verb: str, arg: str, conn: object) -> str | None:
        if verb != "RCPT":
            return None
        return self.rcpt.get(arg.partition("<")[2].partition(">")[0])


class ThreadedPeer:
    """A RecordingPeer on its own event loop in a thread."""

    def __init__(self, script: Script):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="peer", daemon=True)
        self.thread.start()
        self.peer = RecordingPeer("127.0.0.2", free_port("127.0.0.2"), replies=script)
        asyncio.run_coroutine_threadsafe(self.peer.start(), self.loop).result(5)

    def received(self) -> list[tuple[list[str], bytes]]:
        return [(m.rcpts, m.data) for m in list(self.peer.messages)]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.peer.stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class CountingServer(http.server.ThreadingHTTPServer):
    """Answers every GET with a 1x1 PNG and records the path: a remote image or a
    script's fetch() that got through would show up here."""

    daemon_threads = True

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                body = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                     "1f15c4890000000d49444154789c6360000000000200015e2eb5b40000000049454e44ae426082")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@dataclass
class Lab:
    smtp_port: int
    base: str
    script: Script
    peer: ThreadedPeer
    counter: CountingServer
    log_path: Path

    def send(self, msg: EmailMessage, to: list[str] | None = None) -> None:
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as smtp:
            smtp.send_message(msg, to_addrs=to)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return json.loads(raw) if resp.headers.get_content_type() == "application/json" else raw.decode()

    def subjects(self, query: str = "") -> list[str]:
        path = f"/api/v1/search?query={urllib.request.quote(query)}" if query else "/api/v1/messages"
        return [m["Subject"] for m in self.api("GET", path + ("&" if query else "?") + "limit=500")["messages"]]

    def wait_listed(self, subject: str) -> None:
        wait_until_sync(lambda: subject in self.subjects(), 10, f"{subject!r} in the inbox\n{self.log_tail()}")

    def queued(self) -> dict[str, dict[str, Any]]:
        return {m["ID"]: m for m in self.api("GET", "/api/mta/queue")["messages"]}

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])


def message(subject: str, to: str = "alice@lab.test", *, text: str = "Hello from the lab.\n",
            html: str | None = None, sender: str = "CI Runner <ci@lab.test>",
            attachments: tuple[tuple[str, str, bytes], ...] = ()) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for name, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg


@contextlib.contextmanager
def running_lab(tmp: Path, **web: Any) -> Iterator[Lab]:
    """`mta serve` with an SMTP and an http listener (``web``: more keys of the latter),
    its peer and the counting listener; all stopped on leaving."""
    script = Script()
    peer = ThreadedPeer(script)
    counter = CountingServer()
    smtp_port, web_port = free_port(), free_port()
    config = tmp / "mta.yaml"
    config.write_text(yaml.safe_dump({
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{smtp_port}", "mode": "relay"},
                      {"name": "web", "address": f"127.0.0.1:{web_port}", "mode": "http", **web}],
        "local_domains": ["lab.test"],
        "mailboxes": {"catch_all": True},
        "queue": {"path": str(tmp / "queue.db")},
        "metrics": {"address": None},
        "delivery": {
            "smarthost": f"127.0.0.2:{peer.peer.port}",
            "retry": {"min_backoff": "1h", "max_backoff": "1h"},
            "connection_cache": {"idle_timeout": "0.2s"},
            "timeouts": {"connect": "2s", "command": "10s"},
        },
    }))
    log_path = tmp / "mta.log"
    proc = start_daemon(config, log_path)
    base = f"http://127.0.0.1:{web_port}"

    def up() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            with urllib.request.urlopen(base + "/livez", timeout=2):
                return True
        except (OSError, urllib.error.URLError):
            return False

    try:
        wait_until_sync(up, 20, "the http listener")
        yield Lab(smtp_port, base, script, peer, counter, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        counter.close()
        peer.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("web-ui")) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, lab: Lab) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def on_console(msg: ConsoleMessage) -> None:
        # The UI itself breaks none of its own policy (the message views are meant to).
        if "Content Security Policy" in msg.text and "/view/" not in msg.location.get("url", ""):
            errors.append(msg.text)

    page.on("console", on_console)
    page.goto(lab.base + "/")
    expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    yield page
    context.close()
    assert errors == [], "uncaught errors in the page's script, or its CSP broken"


def row(page: Page, subject: str) -> Any:
    return page.locator("#messages tbody tr", has_text=subject)


def open_message(page: Page, subject: str) -> None:
    row(page, subject).click()
    expect(page.locator("#msg-subject")).to_have_text(subject, timeout=WAIT_MS)


# --------------------------------------------------------------------------- the inbox

def test_list_newest_first_open_a_message_and_its_views(lab: Lab, page: Page):
    lab.send(message("older report", text="first body\n"))
    lab.send(message("newer report", text="second body\n", html="<p>second <b>html</b></p>"))
    expect(row(page, "newer report")).to_have_count(1, timeout=WAIT_MS)
    expect(row(page, "older report")).to_have_count(1, timeout=WAIT_MS)
    subjects = page.locator("#messages tbody tr td.subject > span:first-child").all_inner_texts()
    assert subjects.index("newer report") < subjects.index("older report")
    expect(row(page, "older report")).to_have_class(UNREAD)

    open_message(page, "older report")
    expect(row(page, "older report")).not_to_have_class(UNREAD)
    meta = page.locator("#msg-meta")
    expect(meta).to_contain_text("CI Runner <ci@lab.test>")
    expect(meta).to_contain_text("alice@lab.test")
    expect(page.locator("#tab-text")).to_have_text("first body\n")   # no HTML part: the text shows
    page.get_by_role("tab", name="Headers").click()
    expect(page.locator("#tab-headers")).to_contain_text("older report")
    page.get_by_role("tab", name="Raw").click()
    expect(page.locator("#tab-raw")).to_contain_text("Subject: older report")
    expect(page.locator("#tab-raw")).to_contain_text("Return-Path: <ci@lab.test>")
    # The API saw it read; "Mark unread" puts it back.
    [entry] = [m for m in lab.api("GET", "/api/v1/messages")["messages"] if m["Subject"] == "older report"]
    assert entry["Read"] is True
    page.locator("#msg-unread").click()
    expect(row(page, "older report")).to_have_class(UNREAD)
    [entry] = [m for m in lab.api("GET", "/api/v1/messages")["messages"] if m["Subject"] == "older report"]
    assert entry["Read"] is False

    open_message(page, "newer report")
    expect(page.locator("#msg-html")).to_be_visible()     # a message with an HTML part opens on it
    frame = page.frame_locator("#msg-html")
    expect(frame.locator("b")).to_have_text("html")
    assert page.locator("#msg-html").get_attribute("sandbox") == ""


def test_search_and_the_mailbox_filter(lab: Lab, page: Page):
    lab.send(message("invoice 4711", to="bob@lab.test"))
    lab.send(message("weekly digest", to="carol@lab.test"))
    expect(row(page, "weekly digest")).to_have_count(1, timeout=WAIT_MS)
    expect(row(page, "invoice 4711")).to_have_count(1)

    page.locator("#search").fill("subject:invoice")
    page.locator("#search").press("Enter")
    expect(page.locator("#messages tbody tr")).to_have_count(1, timeout=WAIT_MS)
    expect(row(page, "invoice 4711")).to_have_count(1)

    page.locator("#search").fill("")
    page.locator("#mailbox").fill("carol@lab.test")
    page.get_by_role("button", name="Search").click()
    expect(row(page, "invoice 4711")).to_have_count(0, timeout=WAIT_MS)
    expect(row(page, "weekly digest")).to_have_count(1)
    for to in page.locator("#messages tbody td.to").all_inner_texts():
        assert "carol@lab.test" in to

    # A search the language refuses: the API's one-line reason, shown as it is.
    page.locator("#mailbox").fill("")
    page.locator("#search").fill("before:someday")
    page.locator("#search").press("Enter")
    expect(page.locator("#status")).to_have_class(re.compile(r"\berror\b"), timeout=WAIT_MS)
    expect(page.locator("#status")).to_contain_text("before")

    page.locator("#search-clear").click()
    expect(row(page, "invoice 4711")).to_have_count(1, timeout=WAIT_MS)


def test_paging_and_mark_all_read_of_one_mailbox(lab: Lab, page: Page):
    lab.send(message("not for the pager", to="elsewhere@lab.test"))
    with smtplib.SMTP("127.0.0.1", lab.smtp_port, timeout=10) as smtp:
        for i in range(52):
            smtp.send_message(message(f"page test {i:02d}", to="pager@lab.test"))
    wait_until_sync(lambda: lab.api("GET", "/api/v1/messages?mailbox=pager@lab.test&limit=1")["total"] == 52,
                    15, "52 messages for pager@lab.test")
    page.locator("#mailbox").fill("pager@lab.test")
    page.locator("#mailbox").press("Enter")
    expect(page.locator("#list-counts")).to_contain_text("1\u201350 of 52 messages, 52 unread")
    expect(page.locator("#messages tbody tr")).to_have_count(50)
    expect(page.locator("#messages tbody tr").first).to_contain_text("page test 51")
    expect(page.locator("#page-prev")).to_be_disabled()
    page.locator("#page-next").click()
    expect(page.locator("#list-counts")).to_contain_text("51\u201352 of 52 messages")
    expect(page.locator("#messages tbody tr")).to_have_count(2)
    expect(page.locator("#messages tbody tr").last).to_contain_text("page test 00")
    expect(page.locator("#page-next")).to_be_disabled()
    page.locator("#page-prev").click()
    expect(page.locator("#messages tbody tr")).to_have_count(50)

    page.locator("#mark-all-read").click()
    expect(page.locator("#list-counts")).to_contain_text("1\u201350 of 52 messages, 0 unread")
    expect(page.locator("#messages tbody tr.unread")).to_have_count(0)
    assert lab.api("GET", "/api/v1/messages?mailbox=pager@lab.test&limit=1")["unread"] == 0
    # Only what the list shows: another mailbox's mail stays unread.
    assert lab.api("GET", "/api/v1/messages?mailbox=elsewhere@lab.test")["messages"][0]["Read"] is False


def test_download_an_attachment(lab: Lab, page: Page, tmp_path: Path):
    data = b"id,amount\n1,42\n" * 100
    lab.send(message("with attachment", attachments=(("report.csv", "text/csv", data),)))
    expect(row(page, "with attachment")).to_have_count(1, timeout=WAIT_MS)
    open_message(page, "with attachment")
    link = page.locator("#msg-attachments a", has_text="report.csv")
    with page.expect_download() as info:
        link.click()
    download = info.value
    assert download.suggested_filename == "report.csv"
    saved = tmp_path / "report.csv"
    download.save_as(saved)
    assert saved.read_bytes() == data


def test_delete_a_message(lab: Lab, page: Page):
    lab.send(message("to be deleted"))
    expect(row(page, "to be deleted")).to_have_count(1, timeout=WAIT_MS)
    open_message(page, "to be deleted")
    page.locator("#msg-delete").click()
    expect(row(page, "to be deleted")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#message-pane")).to_be_hidden()
    assert "to be deleted" not in lab.subjects()


def test_release_to_an_address_goes_through_the_queue(lab: Lab, page: Page):
    lab.send(message("release me", text="for the outside\n"))
    expect(row(page, "release me")).to_have_count(1, timeout=WAIT_MS)
    before = len(lab.peer.received())
    open_message(page, "release me")
    page.locator("#release-to").fill("outside@remote.test")
    page.get_by_role("button", name="Release").click()
    expect(page.locator("#status")).to_contain_text("Released", timeout=WAIT_MS)
    wait_until_sync(lambda: len(lab.peer.received()) > before, 10, f"the release at the peer\n{lab.log_tail()}")
    rcpts, data = lab.peer.received()[-1]
    assert rcpts == ["outside@remote.test"]
    assert b"Subject: release me" in data and b"for the outside" in data


def test_view_latest_opens_the_newest_message(lab: Lab, page: Page):
    """Mailpit's /view/latest redirects to /view/{ID}: the page with that message open."""
    lab.send(message("the very latest", text="newest of all\n"))
    lab.wait_listed("the very latest")
    page.goto(lab.base + "/view/latest")
    expect(page.locator("#msg-subject")).to_have_text("the very latest", timeout=WAIT_MS)
    expect(page.locator("#tab-text")).to_have_text("newest of all\n")
    assert page.url.startswith(lab.base + "/#/message/")
    expect(row(page, "the very latest")).to_have_class(re.compile(r"\bselected\b"))


def test_live_arrival_and_deletion_without_reload(lab: Lab, page: Page):
    page.evaluate("window.notReloaded = true")
    lab.send(message("arrives live"))
    expect(row(page, "arrives live")).to_have_count(1, timeout=WAIT_MS)
    open_message(page, "arrives live")
    # Deleted elsewhere (a test suite's DELETE) while open here: the row and the view go.
    [entry] = [m for m in lab.api("GET", "/api/v1/messages")["messages"] if m["Subject"] == "arrives live"]
    lab.api("DELETE", "/api/v1/messages", {"IDs": [entry["ID"]]})
    expect(row(page, "arrives live")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#message-pane")).to_be_hidden()
    expect(page.locator("#status")).to_have_text(f"{entry['ID']} was deleted.")
    assert page.evaluate("window.notReloaded") is True


def test_hostile_html_runs_no_script_and_loads_nothing(lab: Lab, page: Page):
    remote = f"http://127.0.0.1:{lab.counter.port}"
    hostile = (f"<html><head><title>hostile</title><link rel=stylesheet href='{remote}/style.css'></head><body>"
               f"<script>document.title = 'pwned'; parent.document.title = 'pwned';"
               f" fetch('{remote}/script-fetch');</script>"
               f"<img src='{remote}/x.png' onerror=\"fetch('{remote}/onerror')\" onload=\"fetch('{remote}/onload')\">"
               f"<p id=shown>hostile body</p></body></html>")
    subject = "<img src=x onerror=alert(1)> & <b>bold</b>"
    lab.send(message(subject, html=hostile, sender='"<script>alert(2)</script>" <evil@lab.test>'))
    expect(row(page, subject)).to_have_count(1, timeout=WAIT_MS)
    open_message(page, subject)
    frame = page.frame_locator("#msg-html")
    expect(frame.locator("#shown")).to_have_text("hostile body", timeout=WAIT_MS)
    # Markup in the subject and the sender's name is text, not elements.
    assert page.locator("#msg-subject").inner_text() == subject
    assert page.locator("#msg-subject *").count() == 0
    expect(page.locator("#msg-meta")).to_contain_text('<script>alert(2)</script> <evil@lab.test>')
    assert page.locator("#msg-meta script, #messages script, #messages img:not([src='/static/paperclip.svg'])"
                        ).count() == 0
    # Give a script, an image or a stylesheet time to reach the listener, then: nothing did.
    page.wait_for_timeout(1000)
    assert page.title() == TITLE
    [html_frame] = [f for f in page.frames if f.url.endswith(".html")]
    assert lab.counter.requests == []
    # The frame's document is the message's, unscripted: its own title unchanged too.
    assert html_frame.title() == "hostile"


# --------------------------------------------------------------------------- the queue page

def queue_cell(page: Page, queue_id: str) -> Any:
    return page.locator(f"#queue tbody tr[data-id='{queue_id}'] td:nth-child(3)")


def test_queue_page_hold_release_flush_delete(lab: Lab, page: Page):
    lab.script.rcpt.update({"slow@remote.test": "451 4.3.0 try again later",
                            "never@remote.test": "451 4.3.0 try again later"})
    lab.send(message("stuck one", to="slow@remote.test"))
    lab.send(message("stuck two", to="never@remote.test"))
    wait_until_sync(lambda: [m["Recipients"][0]["State"] for m in lab.queued().values()] == ["deferred"] * 2,
                    10, lambda: f"two deferred messages: {lab.queued()}")
    by_address = {m["Recipients"][0]["Address"]: queue_id for queue_id, m in lab.queued().items()}
    slow, never = by_address["slow@remote.test"], by_address["never@remote.test"]

    page.get_by_role("link", name="Queue").click()
    expect(queue_cell(page, slow)).to_have_text("deferred", timeout=WAIT_MS)
    expect(queue_cell(page, never)).to_have_text("deferred")
    expect(page.locator("#queue-counts")).to_contain_text("2 messages: 0 active, 2 deferred, 0 on hold")
    expect(page.locator(f"#queue tbody tr[data-id='{slow}']")).to_contain_text("451 4.3.0")

    def act(queue_id: str, action: str, done: str) -> None:
        page.locator(f"#queue tbody tr[data-id='{queue_id}'] input[type=checkbox]").check()
        page.locator(f"[data-queue-action={action}]").click()
        expect(page.locator("#status")).to_have_text(f"{done} {queue_id}: 1 recipient", timeout=WAIT_MS)

    expect(page.locator("#search-form")).to_be_hidden()     # the inbox's search is no queue search
    act(slow, "hold", "Held")
    expect(queue_cell(page, slow)).to_have_text("hold", timeout=WAIT_MS)
    assert lab.queued()[slow]["Recipients"][0]["State"] == "held"

    act(slow, "release", "Released")     # due now: tried again, deferred again (attempt 2)
    wait_until_sync(lambda: lab.queued()[slow]["Recipients"][0]["Attempts"] == 2, 10, "a second attempt")
    expect(queue_cell(page, slow)).to_have_text("deferred", timeout=WAIT_MS)
    expect(page.locator(f"#queue tbody tr[data-id='{slow}']")).to_contain_text("2 attempts", timeout=WAIT_MS)

    lab.script.rcpt.pop("slow@remote.test")     # the peer takes it now
    before = len(lab.peer.received())
    act(slow, "flush", "Flushed")
    expect(page.locator(f"#queue tbody tr[data-id='{slow}']")).to_have_count(0, timeout=WAIT_MS)
    wait_until_sync(lambda: len(lab.peer.received()) > before, 10, "the flushed message at the peer")
    assert lab.peer.received()[-1][0] == ["slow@remote.test"]

    act(never, "delete", "Deleted")
    expect(page.locator(f"#queue tbody tr[data-id='{never}']")).to_have_count(0, timeout=WAIT_MS)
    assert never not in lab.queued()
    expect(page.locator("#queue-empty")).to_be_visible()


# --------------------------------------------------------------------------- basic auth

def test_behind_basic_auth_the_page_its_api_calls_and_events_work(browser: Browser, tmp_path: Path):
    """A listener with a users_file: the browser asks once; the page's fetches and its
    websocket carry the same credentials (new mail shows up live)."""
    users = tmp_path / "web.users"
    write_users(users, {"tester": "s3cret"})
    with running_lab(tmp_path, users_file=str(users)) as lab:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(lab.base + "/", timeout=5)
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"] == 'Basic realm="mta"'
        refused.value.close()
        context = browser.new_context(http_credentials={"username": "tester", "password": "s3cret"})
        try:
            page = context.new_page()
            page.goto(lab.base + "/")
            expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
            lab.send(message("behind auth"))
            expect(row(page, "behind auth")).to_have_count(1, timeout=WAIT_MS)
            open_message(page, "behind auth")
            expect(page.locator("#tab-text")).to_have_text("Hello from the lab.\n")
        finally:
            context.close()


# --------------------------------------------------------------------------- the README's picture

def test_screenshot_of_the_list_with_a_message_open(lab: Lab, page: Page, tmp_path: Path):
    lab.api("DELETE", "/api/v1/messages")
    lab.send(message("Build #1842 passed", to="ci@lab.test", sender="Jenkins <jenkins@lab.test>",
                     text="All 1,204 tests passed in 5m 12s.\n"))
    lab.send(message("Password reset requested", to="alice@lab.test", sender="Accounts <no-reply@app.lab.test>",
                     text="Someone asked to reset the password of alice.\n"))
    lab.send(message("Your order #20931 has shipped", to="bob@lab.test", sender="Shop <orders@shop.lab.test>",
                     text="Your parcel is on its way.\n",
                     html="<h2 style='color:#2b5797'>Your order has shipped</h2><p>Parcel <b>20931</b> is on its"
                          " way and should arrive on <b>Friday</b>.</p><table border=1 cellpadding=4>"
                          "<tr><th>Item</th><th>Qty</th></tr><tr><td>USB-C cable</td><td>2</td></tr></table>",
                     attachments=(("invoice-20931.pdf", "application/pdf", b"%PDF-1.4\n" + b"0" * 3000),)))
    lab.send(message("Weekly lab report", to="carol@lab.test", sender="Lab Bot <bot@lab.test>",
                     text="3 hosts relayed 18,240 messages this week.\n"))
    expect(page.locator("#messages tbody tr")).to_have_count(4, timeout=WAIT_MS)
    open_message(page, "Your order #20931 has shipped")
    expect(page.locator("#msg-html")).to_be_visible()
    expect(page.frame_locator("#msg-html").locator("h2")).to_have_text("Your order has shipped")
    page.locator("#msg-html").evaluate("() => 0")   # layout settled
    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("MTA_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, SCREENSHOT)
