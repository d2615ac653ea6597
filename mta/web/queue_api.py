"""The queue over HTTP: the web ``mailq`` (issue 15), our own JSON beside Mailpit's API.

Mailpit has no queue, so these endpoints are mta's own, under ``/api/mta/``
where no Mailpit path will ever land. Field names are in Mailpit's casing, so
one client reads both. They do what ``mta queue list|hold|release|flush|delete``
does, through the same store calls (mta/cli/queue.py), on the daemon's store.

``GET /api/mta/queue?start=0&limit=500``
    Messages with recipients still pending, oldest first, like ``mailq``::

        {"total": 2, "start": 0, "count": 2,
         "active": 0, "deferred": 1, "hold": 1,
         "messages": [{"ID": "0A1B2C3D4E5F", "Queue": "deferred",
                       "Sender": "lab@lab.test", "Arrival": "2026-12-02T22:41:09Z",
                       "Size": 512,
                       "Recipients": [{"Address": "a@remote.test", "State": "deferred",
                                       "Attempts": 1, "NextAttempt": "2026-12-02T23:41:10Z",
                                       "LastError": "451 4.3.0 try again later"}]}]}

    ``Queue`` is Postfix's queue name: ``active`` (a recipient is due or being
    delivered), ``deferred`` or ``hold`` (a recipient is on hold). The sender of
    a bounce is "" (Postfix's MAILER-DAEMON). ``NextAttempt`` is null for a held
    recipient.

``POST /api/mta/queue/hold``, ``…/release``, ``…/flush``, ``…/delete`` with ``{"IDs": [...]}``
    hold: pending recipients on hold; release: held ones due now; flush:
    deferred ones due now (the daemon tries them within a second: its queue
    manager re-reads due times at least once a second); delete: the messages
    with their recipients and history. The answer says what was done::

        {"Found": ["0A1B2C3D4E5F"], "NotFound": ["FFFF"], "Changed": {"0A1B2C3D4E5F": 1}}

    (``Changed``: recipients changed per message; for delete, recipients
    removed). Unknown IDs are listed in ``NotFound``, the others acted on, as
    the CLI does. A body that is not ``{"IDs": [non-empty list of strings]}`` is
    400 with a one-line reason; nothing acts on "every message" here.

Errors, basic auth and the origin check of state-changing requests are the
application's (mta/web/app.py): a POST from another site's page is 403.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mta.store.api import AdminResult, QueueAdmin, QueueEntry
from mta.web.app import WebContext, bad_request
from mta.web.mailpit_api import read_body

DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
ACTIONS = ("hold", "release", "flush", "delete")
MAX_IDS = 10000          # ids in one action request
DETAIL = "by web"        # the history's note of who acted ("by root" from the CLI)


def add_routes(app: web.Application, context: WebContext) -> None:
    api = QueueApi(context)
    app.router.add_get("/api/mta/queue", api.listing)
    for action in ACTIONS:
        app.router.add_post(f"/api/mta/queue/{action}", api.action_handler(action))


def iso_time(t: float) -> str:
    """RFC 3339 in UTC, whole seconds, as the UI and scripts read it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def entry_json(e: QueueEntry) -> dict[str, Any]:
    return {
        "ID": e.id,
        "Queue": e.queue_name,
        "Sender": e.sender,
        "Arrival": iso_time(e.arrival),
        "Size": e.size,
        "Recipients": [
            {"Address": address, "State": state, "Attempts": attempts,
             "NextAttempt": iso_time(next_attempt) if next_attempt and state != "held" else None,
             "LastError": last_error or ""}
            for address, state, attempts, next_attempt, last_error in e.recipients
        ],
    }


def _json(data: object) -> web.Response:
    return web.Response(text=json.dumps(data), content_type="application/json")


def _int_param(request: web.Request, name: str, default: int, maximum: int) -> int:
    """A non-negative integer query parameter; 400 with the reason otherwise."""
    raw = request.query.get(name, "")
    if raw == "":
        return default
    if not raw.isascii() or not raw.isdigit():
        raise bad_request(f"{name}: not a non-negative integer: {raw[:40]!r}")
    return min(int(raw), maximum)


async def _ids(request: web.Request) -> list[str]:
    """The ``IDs`` of an action's body, upper-cased as queue ids are; 400 with the reason.
    The body is read as the Mailpit API reads its own (field names in any case)."""
    ids = (await read_body(request)).get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i.strip() for i in ids):
        raise bad_request('expected {"IDs": [queue ids]} with at least one id')
    if len(ids) > MAX_IDS:
        raise bad_request(f"too many IDs (at most {MAX_IDS})")
    return list(dict.fromkeys(i.strip().upper() for i in ids))


class QueueApi:
    def __init__(self, context: WebContext):
        self.context = context

    @property
    def admin(self) -> QueueAdmin:
        return self.context.store.admin

    async def listing(self, request: web.Request) -> web.Response:
        start = _int_param(request, "start", 0, 2**31)
        limit = _int_param(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
        # The counts in one aggregate query (as /metrics has them); the listing stops once
        # the page is full: the page polls this, and a queue may hold 100,000 messages.
        summary = await self.admin.queue_summary(time.time())
        page: list[dict[str, Any]] = []
        seen = 0
        async with contextlib.aclosing(self.admin.iter_queue(batch=min(start + limit, 2000) or 1)) as batches:
            async for entries in batches:
                for e in entries:
                    if seen >= start:
                        page.append(entry_json(e))
                    seen += 1
                if len(page) >= limit:
                    break
        page = page[:limit]
        total = summary.active + summary.deferred + summary.hold
        return _json({"total": total, "start": start, "count": len(page), "active": summary.active,
                      "deferred": summary.deferred, "hold": summary.hold, "messages": page})

    def action_handler(self, action: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            ids = await _ids(request)
            result = await self.act(action, ids)
            found = set(result.found)
            return _json({"Found": list(result.found), "NotFound": [i for i in ids if i not in found],
                          "Changed": result.changed})
        return handle

    async def act(self, action: str, ids: list[str]) -> AdminResult:
        now = time.time()
        if action == "hold":
            return await self.admin.hold(ids, now, detail=DETAIL)
        if action == "release":
            return await self.admin.release(ids, now, detail=DETAIL)
        if action == "flush":
            return await self.admin.flush(ids, now, detail=DETAIL)
        return await self.admin.delete(ids)
