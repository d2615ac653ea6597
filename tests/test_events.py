"""/api/events over a real websocket (aiohttp's client, RFC 6455) on a real `mta serve`:
``new`` when SMTP mail reaches a lab mailbox (made in the delivery child process),
``update`` when it is read, ``delete`` when it is deleted over HTTP and when POP3's
DELE+QUIT (in the main process) removes its last copy; every client gets every event;
a handshake from another site's page is refused; stopping the daemon closes the sockets
with 1001. Then, in process: a client that does not read is dropped without holding up
one that does."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from typing import Any

import aiohttp
import pytest

from mta import __version__
from mta.config import build_config
from tests.support.in_process import running, submit
from tests.support.users import write_users
from tests.support.waiting import wait_until
from tests.support.web_lab import HTTP_TIMEOUT, basic, lab_config, web_lab

pytestmark = pytest.mark.timeout(60)

WELCOME = (b"From: App <app@lab.test>\r\nTo: alice@lab.test\r\nSubject: welcome\r\n"
           b"Message-ID: <welcome-1@app.lab.test>\r\n\r\nHello Alice.\r\n")
TO_BOTH = (b"From: App <app@lab.test>\r\nTo: alice@lab.test, bob@lab.test\r\nSubject: to both\r\n"
           b"\r\nHello both.\r\n")


async def next_event(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> dict[str, Any]:  # noqa: ASYNC109
    message = await ws.receive(timeout=timeout)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return json.loads(message.data)


async def events(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    return [await next_event(ws) for _ in range(count)]


async def nothing_for(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> None:
    with pytest.raises(asyncio.TimeoutError):
        message = await ws.receive(timeout=seconds)
        pytest.fail(f"unexpected event: {message}")


def stats(total: int, unread: int) -> dict[str, Any]:
    return {"Type": "stats", "Data": {"Total": total, "Unread": unread, "Version": __version__}}


async def test_new_update_and_delete_reach_every_client(tmp_path):
    async with web_lab(tmp_path) as lab, aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session, \
            session.ws_connect(lab.base + "/api/events") as first, \
            session.ws_connect(lab.base + "/api/events") as second:
        await lab.send(["alice@lab.test"], WELCOME)
        new, after_new = await events(first, 2)
        [summary] = (await lab.get_json("/api/v1/messages"))["messages"]
        # The summary exactly as the list shows it, then the counts.
        assert new == {"Type": "new", "Data": summary}
        assert (summary["Subject"], summary["Mailboxes"], summary["Read"]) == ("welcome", ["alice@lab.test"], False)
        assert after_new == stats(1, 1)
        assert await events(second, 2) == [new, after_new]

        # Reading the message marks it read: Mailpit's update event.
        status, _, _ = await lab.request("GET", f"/api/v1/message/{summary['ID']}")
        assert status == 200
        update = {"Type": "update", "Data": {"ID": summary["ID"], "Read": True}}
        assert await events(first, 2) == [update, stats(1, 0)]

        status, _, body = await lab.request("DELETE", "/api/v1/messages", json={"IDs": [summary["ID"]]})
        assert (status, body) == (200, b"ok")
        deleted = [{"Type": "delete", "Data": {"ID": summary["ID"]}}, stats(0, 0)]
        assert await events(first, 2) == deleted
        assert await events(second, 4) == [update, stats(1, 0), *deleted]


async def test_pop3_dele_sends_delete_when_the_last_copy_goes(tmp_path):
    async with web_lab(tmp_path) as lab, aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session, \
            session.ws_connect(lab.base + "/api/events") as ws:
        await lab.send(["alice@lab.test", "bob@lab.test"], TO_BOTH)
        new, _ = await events(ws, 2)
        assert new["Type"] == "new" and new["Data"]["Mailboxes"] == ["alice@lab.test", "bob@lab.test"]
        entry_id = new["Data"]["ID"]
        # Alice's DELE+QUIT removes her copy; Bob's keeps the entry: no event.
        assert await asyncio.to_thread(lab.pop3_delete_all, "alice@lab.test") == 1
        await nothing_for(ws, 0.8)
        [summary] = (await lab.get_json("/api/v1/messages"))["messages"]
        assert summary["Mailboxes"] == ["bob@lab.test"]
        assert await asyncio.to_thread(lab.pop3_delete_all, "bob@lab.test") == 1
        assert await events(ws, 2) == [{"Type": "delete", "Data": {"ID": entry_id}}, stats(0, 0)]


async def test_a_cross_site_handshake_is_refused_and_stopping_closes_with_1001(tmp_path):
    async with web_lab(tmp_path) as lab, aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        # A page of another site (a link in a mail opened in the browser) may not listen in.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(lab.base + "/api/events", headers={"Origin": "http://evil.test"})
        assert refused.value.status == 403
        status, _, body = await lab.request("GET", "/api/events")
        assert (status, body) == (400, b"websocket upgrade expected")
        async with session.ws_connect(lab.base + "/api/events",
                                      headers={"Origin": f"http://127.0.0.1:{lab.http_port}"}) as ws:
            lab.proc.send_signal(signal.SIGTERM)
            message = await ws.receive(timeout=10)
            assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1001)
            assert await asyncio.wait_for(lab.proc.wait(), 20) == 0
        assert "Traceback" not in lab.log_text()


async def test_basic_auth_applies_to_the_socket(tmp_path):
    web_users = tmp_path / "web.users"
    write_users(web_users, {"tester": "web pw"})
    async with web_lab(tmp_path, web={"users_file": str(web_users)}) as lab, \
            aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        for headers in ({}, {"Authorization": basic("tester", "wrong")}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(lab.base + "/api/events", headers=headers)
            assert refused.value.status == 401
        async with session.ws_connect(lab.base + "/api/events",
                                      headers={"Authorization": basic("tester", "web pw")}) as ws:
            await lab.send(["alice@lab.test"], WELCOME)
            new = await next_event(ws)
            assert (new["Type"], new["Data"]["Subject"]) == ("new", "welcome")


# --------------------------------------------------------------------------- a client that does not read

def stalled_client(port: int) -> socket.socket:
    """A websocket handshake by hand, then never a read: its receive window stays small
    and full, so what the server sends piles up in the server's buffers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def read_to_the_end(sock: socket.socket) -> int:
    """Bytes read until the server closed or cut the connection (socket timeout: it did not)."""
    total = 0
    try:
        while chunk := sock.recv(65536):
            total += len(chunk)
    except ConnectionResetError:
        pass
    return total


async def test_a_client_that_does_not_read_is_dropped_and_the_others_keep_up(tmp_path, caplog):
    # The daemon in this process, to make its hub's per-client queue small (8 events).
    config = build_config(lab_config(tmp_path))
    async with running(config, deliver=True) as app:
        [web_listener] = app.web_listeners
        hub = web_listener.context.extras["events"]
        hub.queue_size = 8
        base = f"http://127.0.0.1:{web_listener.port}"
        stalled = await asyncio.to_thread(stalled_client, web_listener.port)
        try:
            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session, \
                    session.ws_connect(base + "/api/events") as ws:
                await wait_until(lambda: len(hub.clients) == 2)
                # Large summaries (a 60 kB subject), until the stalled client's buffers are full
                # and its queue overflows; the reading client gets each one as it comes.
                subject = b"Subject: " + b"\r\n ".join([b"x" * 900] * 66)
                sent = 0
                started = time.monotonic()
                while len(hub.clients) == 2 and time.monotonic() - started < 40:
                    await submit(config, ["alice@lab.test"], subject + b"\r\n\r\nbody\r\n")
                    sent += 1
                    assert (await next_event(ws))["Type"] == "new"
                    assert (await next_event(ws))["Type"] == "stats"
                assert len(hub.clients) == 1, f"the stalled client is still there after {sent} messages"
                print(f"stalled client dropped after {sent} messages of 60 kB summaries")
                assert "events: client 127.0.0.1 reads too slowly (8 events waiting): closing its socket" \
                    in caplog.text
                await submit(config, ["alice@lab.test"], WELCOME)
                assert (await next_event(ws))["Data"]["Subject"] == "welcome"
                assert (await next_event(ws))["Type"] == "stats"
                # The dropped client's connection is gone: what was buffered, then the end.
                assert await asyncio.to_thread(read_to_the_end, stalled) > 0
        finally:
            stalled.close()
