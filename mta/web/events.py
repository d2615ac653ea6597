"""Mailpit's live events: the ``/api/events`` websocket (RFC 6455).

Each event is one JSON text frame ``{"Type": ..., "Data": ...}``, as Mailpit
sends them (its server/websockets hub):

* ``new``: a message arrived; ``Data`` is its summary, as the list shows it;
* ``delete``: ``{"ID": id}`` when an entry goes (its last mailbox copy removed);
* ``update``: ``{"ID": id, "Read": bool}`` when it is marked read or unread;
* ``stats``: ``{"Total", "Unread", "Version"}`` after each batch of changes.

Where the events come from: the store's change log (``Inbox.changes_since``),
written in the commit of every change by whichever process made it -- local
delivery in the delivery child, POP3 in the main process, ``mta mailbox
purge`` in a CLI process, another node -- so one :class:`EventsHub` per http
listener (a daemon has one, usually) polls it (every :data:`POLL_INTERVAL`, and only while a client is connected)
and fans each event out to every socket. Each client has its own bounded
queue and writer: a client that does not read is dropped (close code 1013,
"try again later") once :data:`QUEUE_SIZE` events wait for it, and never
holds up the others. Closing the daemon closes every socket with 1001 ("going
away", RFC 6455 §7.4.1).

Basic auth is the application's middleware, as for every other path. A
browser sends its cached credentials with a cross-site websocket handshake
too (RFC 6455 §10.2), so a handshake whose ``Origin`` is not this host is
refused (403): another site's page cannot read the lab's mail.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web

from mta import __version__
from mta.errors import StoreError
from mta.inbox.model import InboxChange, InboxEntry
from mta.store.api import Inbox, Store
from mta.web import mailpit_json
from mta.web.app import ApiError, WebContext

log = logging.getLogger("mta.web")

EVENTS_PATH = "/api/events"
POLL_INTERVAL = 0.15     # seconds between looks at the change log while a client is connected
QUEUE_SIZE = 256         # events waiting for one client before it is dropped (Mailpit: 256 too)
BATCH = 500              # changes read per look
HEARTBEAT = 30.0         # seconds between pings: a vanished client is noticed
SEND_TIMEOUT = 10.0      # seconds one frame may take to go out (Mailpit's writeWait)
CLOSE_TIMEOUT = 2.0      # seconds the closing handshake may take before the connection is cut

SummaryJSON = Callable[[InboxEntry], dict[str, Any]]


class _Client:
    """One connected socket: its queue of frames and the task that writes them."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, queue_size: int):
        self.ws = ws
        self.transport = request.transport
        self.peer = request.remote or "?"
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(queue_size)   # None: close now
        self.close_code: int = WSCloseCode.GOING_AWAY
        self.writer: asyncio.Task[None] | None = None

    async def write(self) -> None:
        """Send what the hub queued, in order, until told to close; then close the socket.
        A socket that takes too long to take a frame or to close is cut (a stalled client
        would otherwise hold its connection: closing waits for the unsent data)."""
        try:
            while (frame := await self.queue.get()) is not None:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await self.ws.send_str(frame)
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=self.close_code)
        except (ConnectionError, TimeoutError, RuntimeError):
            if self.transport is not None:
                self.transport.abort()

    def offer(self, frame: str) -> bool:
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            return False
        return True

    def stop(self, code: int) -> None:
        """Make the writer close the socket with ``code`` now (what is queued is dropped)."""
        self.close_code = code
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class EventsHub:
    """``handle`` serves ``/api/events``; ``close`` ends every socket (the app's on_shutdown)."""

    def __init__(self, store: Store, summary_json: SummaryJSON, *, poll_interval: float = POLL_INTERVAL,
                 queue_size: int = QUEUE_SIZE):
        self.store = store
        self.summary_json = summary_json
        self.poll_interval = poll_interval
        self.queue_size = queue_size
        self.clients: set[_Client] = set()
        self._follower: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None   # done once the follower has read last_change
        self._seq = 0
        self._closing = False

    @property
    def inbox(self) -> Inbox:
        return self.store.inbox

    # ------------------------------------------------------------------ the socket
    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not _same_origin(request):
            raise ApiError(403, "cross-origin websocket refused")
        if self._closing:
            raise ApiError(503, "shutting down")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, timeout=CLOSE_TIMEOUT)
        if not ws.can_prepare(request).ok:
            raise ApiError(400, "websocket upgrade expected")
        client = _Client(ws, request, self.queue_size)
        # Joined before the handshake's answer: whatever commits after the client sees
        # its socket open reaches it (events meanwhile wait in its queue).
        await self._join(client)
        try:
            await ws.prepare(request)
        except BaseException:
            self.clients.discard(client)
            raise
        client.writer = asyncio.create_task(client.write(), name="events-writer")
        try:
            async for message in ws:      # nothing is expected from the client: read to see it go
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self.clients.discard(client)
            if not client.writer.done():
                client.stop(client.close_code)
            await asyncio.gather(client.writer, return_exceptions=True)
        return ws

    async def _join(self, client: _Client) -> None:
        """Add the client; the first one starts the follower, and every one waits until
        the follower knows where the log stands (what commits later reaches the client)."""
        self.clients.add(client)
        if self._follower is None or self._follower.done():
            self._ready = asyncio.get_running_loop().create_future()
            self._follower = asyncio.create_task(self._follow(self._ready), name="events-follower")
        if self._ready is not None:
            await asyncio.shield(self._ready)

    async def close(self, app: web.Application | None = None) -> None:
        """Close every socket with 1001 (going away) and stop following the log."""
        self._closing = True
        clients, self.clients = list(self.clients), set()
        for client in clients:
            client.stop(WSCloseCode.GOING_AWAY)
        await asyncio.gather(*(c.writer for c in clients if c.writer is not None), return_exceptions=True)
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
            self._follower = None

    # ------------------------------------------------------------------ the change log
    async def _follow(self, ready: asyncio.Future[None]) -> None:
        """Poll the change log while anyone listens; fan each event out. It starts where
        the log stands (what happened before is in the list a client loads; Mailpit
        sends no history either)."""
        try:
            self._seq = await self.inbox.last_change()
        except StoreError as exc:
            log.warning("events: cannot read the inbox's change log: %s", exc)
        finally:
            if not ready.done():
                ready.set_result(None)
        while self.clients and not self._closing:
            try:
                changes = await self.inbox.changes_since(self._seq, limit=BATCH)
                if changes:
                    frames = await self._frames(changes)
                    self._seq = changes[-1].seq
                    for frame in frames:
                        self._broadcast(frame)
                        # Let the writers take it before the next: a burst longer than a
                        # queue must not drop the clients that keep up, only those that do not.
                        await asyncio.sleep(0)
                    if len(changes) == BATCH:
                        continue       # more waiting: no pause
            except StoreError as exc:
                log.warning("events: reading the inbox's change log failed, trying again: %s", exc)
            except Exception as exc:   # a bug must not silently end the events of every client
                log.error("events: following the inbox's change log failed, trying again: %r", exc)
            await asyncio.sleep(self.poll_interval)

    async def _frames(self, changes: list[InboxChange]) -> list[str]:
        """The events of one batch, in commit order, then the stats after it."""
        new_ids = [c.id for c in changes if c.kind == "new"]
        entries = {e.id: e for e in await self.inbox.entries(new_ids)} if new_ids else {}
        frames = []
        for change in changes:
            if change.kind == "new":
                entry = entries.get(change.id)
                if entry is None:
                    continue    # deleted again since: its delete event is in this batch or the next
                frames.append(_frame("new", self.summary_json(entry)))
            elif change.kind == "delete":
                frames.append(_frame("delete", {"ID": change.id}))
            elif change.kind in ("read", "unread"):
                frames.append(_frame("update", {"ID": change.id, "Read": change.kind == "read"}))
        page = await self.inbox.page(limit=0)
        frames.append(_frame("stats", {"Total": page.total, "Unread": page.unread, "Version": __version__}))
        return frames

    def _broadcast(self, frame: str) -> None:
        for client in list(self.clients):
            if not client.offer(frame):
                # 1013 "try again later" (IANA's registry of RFC 6455 close codes): the
                # client may reconnect and reload the list.
                log.warning("events: client %s reads too slowly (%d events waiting): closing its socket",
                            client.peer, self.queue_size)
                self.clients.discard(client)
                client.stop(WSCloseCode.TRY_AGAIN_LATER)


def _frame(kind: str, data: object) -> str:
    return json.dumps({"Type": kind, "Data": data}, separators=(",", ":"))


def _same_origin(request: web.Request) -> bool:
    """No ``Origin`` (a program, not a browser page), or one naming this host and port."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return netloc.lower() == request.host.lower()


def add_routes(app: web.Application, context: WebContext) -> None:
    """One hub per http listener (a daemon has one, usually): it follows the log for
    every socket of that listener; aiohttp's on_shutdown closes them first when the
    listener stops, before it waits for handlers to finish."""
    hub = EventsHub(context.store, mailpit_json.summary)
    context.extras["events"] = hub
    app.router.add_get(EVENTS_PATH, hub.handle)
    app.on_shutdown.append(hub.close)
