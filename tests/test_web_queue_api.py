"""The queue page's JSON API (mta/web/queue_api.py) on a running `mta serve`.

The daemon relays to a RecordingPeer on 127.0.0.2 whose RCPT replies each test
scripts (451 keeps mail deferred, as in tests/test_queue_admin.py); retries are
an hour apart, so only the API's actions make queued mail move within a test.
Its http listener serves the API on loopback; an aiohttp client calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.daemon import start_daemon, wait_listening
from tests.support.ports import free_port
from tests.support.smtp_peer import RecordingPeer
from tests.support.waiting import wait_until
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(40)

DEFER = "451 4.3.0 try again later"
BODY = b"Subject: queue api\r\nFrom: lab@lab.test\r\n\r\nhello\r\n"


@dataclass
class Script:
    """The peer's RCPT reply per recipient address (250 when not named)."""

    rcpt: dict[str, str] = field(default_factory=dict)

    async def __call__(self, verb: str, arg: str, conn: object) -> str | None:
        if verb != "RCPT":
            return None
        return self.rcpt.get(arg.partition("<")[2].partition(">")[0])


@dataclass
class Lab:
    smtp_port: int
    base: str
    db: Path
    peer: RecordingPeer
    script: Script
    http: aiohttp.ClientSession

    async def submit(self, *recipients: str) -> str:
        async with await Wire.connect("127.0.0.1", self.smtp_port) as w:
            reply = await w.mail("lab@lab.test", list(recipients), BODY)
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        return reply.rsplit(" ", 1)[1]

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.base + path) as resp:
            body = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, body

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.post(self.base + path, json=body, **kwargs) as resp:
            answer = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, answer

    def rows(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as db, db:
            return db.execute(query, args).fetchall()

    def states(self, queue_id: str) -> list[tuple[str, str, int]]:
        return [tuple(r) for r in self.rows(  # type: ignore[misc]
            "SELECT address, state, attempts FROM recipients WHERE message_id = ? ORDER BY rcpt_no", queue_id)]

    async def wait_state(self, queue_id: str, expected: list[tuple[str, str, int]]) -> None:
        await wait_until(lambda: self.states(queue_id) == expected, 10.0,
                         lambda: f"{queue_id}: {self.states(queue_id)} != {expected}")


@pytest.fixture
async def lab(write_config, tmp_path) -> AsyncIterator[Lab]:
    script = Script()
    smtp_port, web_port = free_port(), free_port()
    db = tmp_path / "queue.db"
    async with RecordingPeer("127.0.0.2", free_port("127.0.0.2"), replies=script) as peer:
        config = write_config({
            "hostname": "relay.lab.test",
            "listeners": [{"name": "mta", "address": f"127.0.0.1:{smtp_port}", "mode": "relay"},
                          {"name": "web", "address": f"127.0.0.1:{web_port}", "mode": "http"}],
            "queue": {"path": str(db)},
            "metrics": {"address": None},
            "delivery": {
                "smarthost": f"127.0.0.2:{peer.port}",
                "retry": {"min_backoff": "1h", "max_backoff": "1h"},
                "connection_cache": {"idle_timeout": "0.2s"},
                "timeouts": {"connect": "2s", "command": "20s"},
            },
        })
        proc = start_daemon(config, tmp_path / "mta.log")
        try:
            await wait_listening(smtp_port, proc)
            async with aiohttp.ClientSession() as http:
                await wait_until(lambda: _live(http, web_port), 10.0, "the http listener")
                yield Lab(smtp_port, f"http://127.0.0.1:{web_port}", db, peer, script, http)
        finally:
            proc.terminate()
            deadline = time.monotonic() + 15
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the peer keeps answering the daemon's QUIT
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)


async def _live(http: aiohttp.ClientSession, port: int) -> bool:
    """The http listener starts after the SMTP ones: True once it answers /livez."""
    try:
        async with http.get(f"http://127.0.0.1:{port}/livez") as resp:
            return resp.status == 200
    except aiohttp.ClientConnectionError:
        return False


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def expected_entry(lab: Lab, queue_id: str, queue: str) -> dict[str, Any]:
    [(arrival, size)] = lab.rows("SELECT arrival, size FROM messages WHERE id = ?", queue_id)
    rcpts = lab.rows("SELECT address, state, attempts, next_attempt, last_error FROM recipients"
                     " WHERE message_id = ? AND state NOT IN ('delivered', 'failed') ORDER BY rcpt_no", queue_id)
    return {"ID": queue_id, "Queue": queue, "Sender": "lab@lab.test", "Arrival": iso(arrival), "Size": size,
            "Recipients": [{"Address": a, "State": s, "Attempts": n,
                            "NextAttempt": None if s == "held" else iso(t), "LastError": e or ""}
                           for a, s, n, t, e in rcpts]}


async def test_list_shows_deferred_and_held_mail_like_mailq(lab: Lab):
    assert await lab.get("/api/mta/queue") == (200, {
        "total": 0, "start": 0, "count": 0, "active": 0, "deferred": 0, "hold": 0, "messages": []})
    lab.script.rcpt.update({"later@remote.test": DEFER, "held@remote.test": DEFER})
    deferred = await lab.submit("later@remote.test", "ok@remote.test")
    held = await lab.submit("held@remote.test")
    await lab.wait_state(deferred, [("later@remote.test", "deferred", 1), ("ok@remote.test", "delivered", 1)])
    await lab.wait_state(held, [("held@remote.test", "deferred", 1)])

    assert await lab.post("/api/mta/queue/hold", {"IDs": [held.lower()]}) == (
        200, {"Found": [held], "NotFound": [], "Changed": {held: 1}})
    status, page = await lab.get("/api/mta/queue")
    assert status == 200
    assert page == {"total": 2, "start": 0, "count": 2, "active": 0, "deferred": 1, "hold": 1, "messages": [
        expected_entry(lab, deferred, "deferred"), expected_entry(lab, held, "hold")]}
    later = page["messages"][0]["Recipients"][0]
    assert later["State"] == "deferred" and later["LastError"].startswith("451 4.3.0 ")
    assert page["messages"][1]["Recipients"][0]["NextAttempt"] is None

    # Paging: start and limit, the counts still over the whole queue.
    status, second = await lab.get("/api/mta/queue?start=1&limit=1")
    assert (status, second["total"], second["count"], second["start"]) == (200, 2, 1, 1)
    assert [m["ID"] for m in second["messages"]] == [held]
    assert await lab.get("/api/mta/queue?limit=-1") == (400, "limit: not a non-negative integer: '-1'")


async def test_release_and_flush_deliver_now(lab: Lab):
    lab.script.rcpt.update({"a@remote.test": DEFER, "b@remote.test": DEFER})
    first = await lab.submit("a@remote.test")
    second = await lab.submit("b@remote.test")
    await lab.wait_state(first, [("a@remote.test", "deferred", 1)])
    await lab.wait_state(second, [("b@remote.test", "deferred", 1)])
    assert await lab.post("/api/mta/queue/hold", {"IDs": [first]}) == (
        200, {"Found": [first], "NotFound": [], "Changed": {first: 1}})
    await lab.wait_state(first, [("a@remote.test", "held", 1)])
    assert lab.rows("SELECT recipient, event, detail FROM history WHERE message_id = ? AND event = 'held'",
                    first) == [("a@remote.test", "held", "by web")]
    lab.script.rcpt.clear()          # the peer takes everything now

    # Flush makes deferred mail due now (the retry was an hour away); held mail stays held.
    assert await lab.post("/api/mta/queue/flush", {"IDs": [second, first]}) == (
        200, {"Found": [second, first], "NotFound": [], "Changed": {second: 1, first: 0}})
    await lab.wait_state(second, [])
    await lab.peer.wait_for_messages(1, timeout=10)
    assert lab.states(first) == [("a@remote.test", "held", 1)]

    assert await lab.post("/api/mta/queue/release", {"IDs": [first]}) == (
        200, {"Found": [first], "NotFound": [], "Changed": {first: 1}})
    await lab.wait_state(first, [])
    await lab.peer.wait_for_messages(2, timeout=10)
    assert await lab.get("/api/mta/queue") == (200, {
        "total": 0, "start": 0, "count": 0, "active": 0, "deferred": 0, "hold": 0, "messages": []})


async def test_delete_removes_mail_and_unknown_ids_are_named(lab: Lab):
    lab.script.rcpt.update({"gone@remote.test": DEFER})
    queue_id = await lab.submit("gone@remote.test")
    await lab.wait_state(queue_id, [("gone@remote.test", "deferred", 1)])
    assert await lab.post("/api/mta/queue/delete", {"IDs": [queue_id, "0000DEADBEEF"]}) == (
        200, {"Found": [queue_id], "NotFound": ["0000DEADBEEF"], "Changed": {queue_id: 1}})
    assert lab.rows("SELECT id FROM messages WHERE id = ?", queue_id) == []
    assert (await lab.get("/api/mta/queue"))[1]["total"] == 0
    assert await lab.post("/api/mta/queue/hold", {"IDs": ["0000DEADBEEF"]}) == (
        200, {"Found": [], "NotFound": ["0000DEADBEEF"], "Changed": {}})


@pytest.mark.parametrize(("body", "reason"), [
    (b"not json", "invalid JSON body: Expecting value: line 1 column 1 (char 0)"),
    (b"", 'expected {"IDs": [queue ids]} with at least one id'),
    (b"{}", 'expected {"IDs": [queue ids]} with at least one id'),
    (b'{"IDs": []}', 'expected {"IDs": [queue ids]} with at least one id'),
    (b'{"IDs": "ABC"}', 'expected {"IDs": [queue ids]} with at least one id'),
    (b'{"IDs": [1]}', 'expected {"IDs": [queue ids]} with at least one id'),
    (b"[]", "the JSON body must be an object"),
])
async def test_a_bad_action_body_is_400_with_the_reason(lab: Lab, body: bytes, reason: str):
    for action in ("hold", "release", "flush", "delete"):
        status, answer = await lab.post(f"/api/mta/queue/{action}", data=body,
                                        headers={"Content-Type": "application/json"})
        assert (status, answer) == (400, reason), action


async def test_another_sites_page_cannot_act_on_the_queue(lab: Lab):
    """A page from elsewhere (a link in a mail, opened in the operator's browser) posts
    with its own Origin: refused before anything is done."""
    lab.script.rcpt.update({"x@remote.test": DEFER})
    queue_id = await lab.submit("x@remote.test")
    await lab.wait_state(queue_id, [("x@remote.test", "deferred", 1)])
    for origin in ("http://evil.test", "null"):
        assert await lab.post("/api/mta/queue/delete", {"IDs": [queue_id]}, headers={"Origin": origin}) == (
            403, "cross-origin request refused")
    assert lab.states(queue_id) == [("x@remote.test", "deferred", 1)]
    # The UI's own page sends its own origin.
    assert await lab.post("/api/mta/queue/delete", {"IDs": [queue_id]},
                          headers={"Origin": lab.base}) == (200, {"Found": [queue_id], "NotFound": [],
                                                                 "Changed": {queue_id: 1}})
    assert await lab.get("/api/mta/queue/nothing") == (404, "404 page not found")
