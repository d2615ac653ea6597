"""Mailpit's v1 message API over the lab inbox (issue 15): list, search, read
status, delete, one message in full, its headers, source and parts, the HTML
and text views, tags and /api/v1/info.

Paths, methods, status codes and reasons are Mailpit's (server/apiv1), so that
its clients and test suites work unchanged: 400 with the reason for a bad
request, 404 "404 page not found" for an unknown ID (and "Message not found"
for ``latest`` in an empty inbox), "ok" as text/plain for a change. The ID
``latest`` is accepted wherever Mailpit accepts it, narrowed by ``?query=`` as
Mailpit's is. Extensions, which Mailpit clients never send: ``?mailbox=`` on
the list, the search and ``latest`` narrows to one lab mailbox.

The inbox is the store's (mta.store.api.Inbox); JSON shapes are mailpit_json's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import urllib.parse
import zoneinfo
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from mta import __version__
from mta.inbox import mime
from mta.inbox.model import InboxEntry, SearchTerm
from mta.inbox.raw import entry_raw
from mta.inbox.search import SearchError, parse_query, with_timezone
from mta.store.api import Inbox
from mta.web import mailpit_json
from mta.web.app import CONTEXT, ApiError, WebContext, bad_request, not_found, text_response

log = logging.getLogger("mta.web")

DEFAULT_LIMIT = 50          # Mailpit's page size
DELETED = "mailpit_api.deleted"   # context.extras: messages deleted through the API since start (RuntimeStats)

# The HTML view: the part renders with no script, no plugin, no form and nothing loaded
# from anywhere but this server (its own inline parts); ``sandbox`` gives the document
# an opaque origin, so it cannot reach the API with the user's credentials either.
VIEW_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data: cid:; sandbox"
# Parts served for download never render as active content from our origin.
PART_CSP = "default-src 'none'; sandbox"
# Media types a browser would run as a document of this origin: served as downloads only (as Mailpit does).
ACTIVE_TYPES = frozenset({"text/html", "text/xml", "application/xhtml+xml", "image/svg+xml",
                          "application/xml", "text/xsl", "text/javascript", "application/javascript"})


def add_routes(app: web.Application, context: WebContext) -> None:
    r = app.router
    r.add_get("/api/v1/messages", list_messages)
    r.add_put("/api/v1/messages", set_read_status)
    r.add_delete("/api/v1/messages", delete_messages)
    r.add_get("/api/v1/search", search)
    r.add_delete("/api/v1/search", delete_search)
    r.add_get("/api/v1/message/{id}", get_message)
    r.add_get("/api/v1/message/{id}/headers", get_headers)
    r.add_get("/api/v1/message/{id}/raw", get_raw)
    r.add_get("/api/v1/message/{id}/part/{part}", get_part)
    r.add_get("/api/v1/tags", get_tags)
    r.add_put("/api/v1/tags", set_tags)
    r.add_get("/api/v1/info", get_info)
    r.add_get("/view/latest", view_latest)
    r.add_get("/view/{id}.html", view_html)
    r.add_get("/view/{id}.txt", view_text)
    context.extras.setdefault(DELETED, 0)


# --------------------------------------------------------------------------- helpers

def inbox_of(request: web.Request) -> Inbox:
    return request.app[CONTEXT].store.inbox


def json_response(data: Any) -> web.Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return web.Response(body=body, content_type="application/json")


def ok() -> web.Response:
    return text_response(200, "ok", "text/plain")


def start_limit(request: web.Request) -> tuple[int, int]:
    """Mailpit's paging: ``start`` (default 0) and ``limit`` (default 50); a value that
    is not a number, or is negative, is ignored as Mailpit ignores it."""
    return _number(request.query.get("start"), 0), _number(request.query.get("limit"), DEFAULT_LIMIT)


def _number(text: str | None, default: int) -> int:
    try:
        value = int(text) if text is not None else default
    except ValueError:
        return default
    return value if value >= 0 else default


def search_terms(text: str, tz_name: str | None) -> list[SearchTerm]:
    """A search in Mailpit's language; 400 with the parser's one-line reason."""
    if "\x00" in text:   # a JSON "Search" (a URL's is refused by the _errors middleware)
        raise bad_request("NUL character in the search")
    try:
        terms = parse_query(text)
    except SearchError as exc:
        raise bad_request(str(exc)) from None
    if tz_name:
        # Mailpit's ?tz=: the zone in which before:/after: dates are days.
        try:
            terms = with_timezone(terms, zoneinfo.ZoneInfo(tz_name))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise bad_request(f"unknown time zone: {tz_name}") from None
    return terms


def mailbox_of(request: web.Request) -> str | None:
    box = request.query.get("mailbox", "").strip()
    return box.lower() or None


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's body as a mapping with lower-cased keys: Go's JSON decoder, which
    Mailpit uses, matches field names without regard to case ("ids" fills IDs).
    No body is {}; a form (application/x-www-form-urlencoded, as some Mailpit clients
    send) is read too; anything else that is not a JSON object is 400 with the reason."""
    body = await request.read()
    if not body.strip():
        return {}
    if request.content_type == "application/x-www-form-urlencoded":
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {key.lower(): values if key.lower() in ("ids", "tags") else values[-1]
                for key, values in form.items()}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the JSON body must be an object")
    return {str(key).lower(): value for key, value in data.items()}


def _strings(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key.lower())
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise bad_request(f"{key} must be an array of strings")
    if any("\x00" in item for item in value):   # see the _errors middleware (mta/web/app.py)
        raise bad_request(f"{key}: NUL character in a string")
    return list(value)


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key.lower(), False)
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0", ""):
        return value.lower() in ("true", "1")
    if not isinstance(value, bool):
        raise bad_request(f"{key} must be true or false")
    return value


async def resolve_id(request: web.Request) -> str:
    """The path's ID, with ``latest`` resolved to the newest entry (matching ``?query=``
    and ``?mailbox=`` when given); 404 "Message not found" when there is none."""
    entry_id = request.match_info["id"]
    if entry_id != "latest":
        return entry_id
    query = request.query.get("query", "").strip()
    terms = search_terms(query, request.query.get("tz")) if query else []
    page = await inbox_of(request).page(terms, start=0, limit=1, mailbox=mailbox_of(request))
    if not page.entries:
        raise ApiError(404, "Message not found")
    return page.entries[0].id


async def entry_and_raw(request: web.Request, missing: ApiError | None = None) -> tuple[InboxEntry, bytes]:
    inbox = inbox_of(request)
    entry_id = await resolve_id(request)
    entry = await inbox.entry(entry_id)
    raw = await inbox.raw(entry_id) if entry is not None else None
    if entry is None or raw is None:
        raise missing or not_found()
    return entry, entry_raw(raw)



# --------------------------------------------------------------------------- the list and search

async def list_messages(request: web.Request) -> web.Response:
    start, limit = start_limit(request)
    page = await inbox_of(request).page((), start=start, limit=limit, mailbox=mailbox_of(request))
    return json_response(mailpit_json.messages_page(page, start))


async def search(request: web.Request) -> web.Response:
    query = request.query.get("query", "").strip()
    if not query:
        raise bad_request("Error: no search query")
    terms = search_terms(query, request.query.get("tz"))
    start, limit = start_limit(request)
    page = await inbox_of(request).page(terms, start=start, limit=limit, mailbox=mailbox_of(request))
    return json_response(mailpit_json.messages_page(page, start))


async def set_read_status(request: web.Request) -> web.Response:
    """PUT /api/v1/messages ``{Read, IDs}`` or ``{Read, Search}``; neither: every message."""
    data = await read_body(request)
    read = _flag(data, "Read")
    ids = _strings(data, "IDs")
    query = data.get("search") or ""
    if not isinstance(query, str):
        raise bad_request("Search must be a string")
    query = query.strip()
    if ids and query:
        raise bad_request("You may specify either IDs or a search query, not both")
    inbox = inbox_of(request)
    if query:
        await inbox.set_read(None, read, search_terms(query, request.query.get("tz")))
    else:
        await inbox.set_read(ids or None, read)
    return ok()


async def delete_messages(request: web.Request) -> web.Response:
    """DELETE /api/v1/messages ``{IDs}``; no body (or no IDs): every message, as in Mailpit."""
    data = await read_body(request)
    ids = _strings(data, "IDs")
    removed = await inbox_of(request).delete(ids or None)
    _count_deleted(request, removed)
    return ok()


async def delete_search(request: web.Request) -> web.Response:
    query = request.query.get("query", "").strip()
    if not query:
        raise bad_request("Error: no search query")
    terms = search_terms(query, request.query.get("tz"))
    removed = await inbox_of(request).delete(None, terms)
    _count_deleted(request, removed)
    return ok()


def _count_deleted(request: web.Request, removed: Sequence[str]) -> None:
    extras = request.app[CONTEXT].extras
    extras[DELETED] = extras.get(DELETED, 0) + len(removed)
    if removed:
        # Like `mta mailbox purge`, a removal by hand is in the log: every mailbox copy went.
        shown = ", ".join(removed[:10]) + (f" and {len(removed) - 10} more" if len(removed) > 10 else "")
        log.info("inbox: %d message(s) deleted over HTTP from %s: %s", len(removed), request.remote, shown)


# --------------------------------------------------------------------------- one message

async def get_message(request: web.Request) -> web.Response:
    """The message in full; reading it marks it read, as in Mailpit."""
    entry, raw = await entry_and_raw(request)
    if not entry.read:
        await inbox_of(request).set_read([entry.id], True)
    return json_response(mailpit_json.message(entry, raw))


async def get_headers(request: web.Request) -> web.Response:
    _entry, raw = await entry_and_raw(request)
    return json_response(mailpit_json.headers(raw))


async def get_raw(request: web.Request) -> web.Response:
    entry, raw = await entry_and_raw(request)
    response = web.Response(body=raw)
    response.headers["Content-Type"] = "text/plain; charset=utf-8"
    if request.query.get("dl") == "1":
        response.headers["Content-Disposition"] = f'attachment; filename="{_token(entry.id)}.eml"'
    return response


async def get_part(request: web.Request) -> web.Response:
    """One part, decoded, with its content type. Types a browser would run as a page of
    this origin (HTML, XML, SVG) go out as application/octet-stream downloads."""
    _entry, raw = await entry_and_raw(request)
    part_id = request.match_info["part"]
    parsed = mime.parse(raw)
    part = mime.find_part(parsed, part_id)
    if part is None:
        raise not_found()
    found = mime.structure(parsed)
    inline = {p.part_id: p for p in found.inline}
    described = inline.get(part_id) or next((p for p in found.attachments if p.part_id == part_id), None)
    filename = (described.filename or described.content_id) if described else ""
    content_type = part.get_content_type()
    disposition = "inline" if part_id in inline else "attachment"
    if content_type in ACTIVE_TYPES:
        content_type, disposition = "application/octet-stream", "attachment"
    response = web.Response(body=mime.payload_of(part))
    response.headers["Content-Type"] = content_type
    response.headers["Content-Disposition"] = _disposition(disposition, filename or f"part-{part_id}")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = PART_CSP
    return response


def _disposition(kind: str, filename: str) -> str:
    """RFC 6266: an ASCII ``filename`` for old clients and ``filename*`` (RFC 8187) with
    the name as given."""
    plain = _token(filename.encode("ascii", "replace").decode("ascii")) or "part"
    return f"{kind}; filename=\"{plain}\"; filename*=UTF-8''{urllib.parse.quote(filename, safe='')}"


def _token(text: str) -> str:
    """A name safe inside a quoted header parameter: no quotes, backslashes, controls or paths."""
    return "".join("_" if c in '"\\/' or not c.isprintable() else c for c in text)


# --------------------------------------------------------------------------- the views

async def view_latest(request: web.Request) -> web.StreamResponse:
    """Mailpit's /view/latest: a redirect to the web UI's view of the newest message
    (matching ``?query=``), or to the UI itself when there is none."""
    query = request.query.get("query", "").strip()
    terms = search_terms(query, request.query.get("tz")) if query else []
    page = await inbox_of(request).page(terms, start=0, limit=1, mailbox=mailbox_of(request))
    location = f"/view/{urllib.parse.quote(page.entries[0].id)}" if page.entries else "/"
    raise web.HTTPFound(location)


async def view_html(request: web.Request) -> web.Response:
    entry, raw = await entry_and_raw(request, missing=ApiError(404, "Message not found"))
    parsed = mime.parse(raw)
    found = mime.structure(parsed)
    if not found.html:
        raise ApiError(404, "This message does not contain a HTML part")
    html = link_inline_images(found.html, entry.id, [*found.inline, *found.attachments])
    response = web.Response(body=html.encode("utf-8"))
    response.headers["Content-Type"] = "text/html; charset=utf-8"
    response.headers["Content-Security-Policy"] = VIEW_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def link_inline_images(html: str, entry_id: str, parts: Sequence[mime.Part]) -> str:
    """``cid:`` references (RFC 2392) pointed at the part's URL on this server, as Mailpit does."""
    for part in parts:
        if not part.content_id:
            continue
        url = f"/api/v1/message/{urllib.parse.quote(entry_id)}/part/{part.part_id}"
        pattern = re.compile(r"""(=\s*["']?)cid:""" + re.escape(part.content_id) + r"""(?=["'\s/>;])""",
                             re.IGNORECASE)
        html = pattern.sub(lambda m, url=url: m.group(1) + url, html)  # type: ignore[misc]
    return html


async def view_text(request: web.Request) -> web.Response:
    _entry, raw = await entry_and_raw(request, missing=ApiError(404, "Message not found"))
    response = text_response(200, mailpit_json.body_text(mime.structure(mime.parse(raw))))
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# --------------------------------------------------------------------------- tags and info

async def get_tags(request: web.Request) -> web.Response:
    page = await inbox_of(request).page((), start=0, limit=0)
    return json_response(list(page.tags))


async def set_tags(request: web.Request) -> web.Response:
    """PUT /api/v1/tags ``{IDs, Tags}``: these messages' tags become exactly ``Tags``."""
    data = await read_body(request)
    ids = _strings(data, "IDs")
    tags = _strings(data, "Tags")
    if not ids:
        raise bad_request("no IDs")
    cleaned = sorted({" ".join(tag.split()) for tag in tags if tag.strip()})
    await inbox_of(request).set_tags(ids, cleaned)
    return ok()


async def get_info(request: web.Request) -> web.Response:
    """Mailpit's AppInformation, with mta's figures: the queue file as the database."""
    context = request.app[CONTEXT]
    inbox = inbox_of(request)
    page = await inbox.page((), start=0, limit=0)
    tags: dict[str, int] = {}
    for tag in page.tags:
        tagged = await inbox.page([SearchTerm("tag", tag)], start=0, limit=0)
        tags[tag] = tagged.matched
    queue = context.config.queue
    return json_response({
        "Version": __version__,
        "LatestVersion": "",      # never looked up: a lab host need not reach the internet
        "Database": queue.location,
        # A shared database's size is the server's business (0: not measured by mta).
        "DatabaseSize": _size(queue.path) if queue.backend == "sqlite" else 0,
        "Messages": page.total,
        "Unread": page.unread,
        "Tags": tags,
        "RuntimeStats": {
            "Uptime": round(time.time() - context.started, 3),
            "Memory": _resident_memory(),
            "MessagesDeleted": context.extras.get(DELETED, 0),
            "SMTPAccepted": _received(context),
            "SMTPAcceptedSize": 0,
            "SMTPRejected": _rejected(context),
            "SMTPIgnored": 0,
        },
    })


def _size(path: str) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.stat(path + suffix).st_size
    return total


def _resident_memory() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _counter_total(counter: Any) -> int:
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return int(total)


def _received(context: WebContext) -> int:
    return _counter_total(context.metrics.received) if context.metrics is not None else 0


def _rejected(context: WebContext) -> int:
    return _counter_total(context.metrics.rejections) if context.metrics is not None else 0
