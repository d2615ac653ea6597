"""The web UI: three static files (mta/web/static/) served by the daemon itself.

No build step and nothing from outside the lab network: plain HTML, CSS and
JavaScript, shipped as package data and read once when the routes are added.
The page reads everything through the JSON API beside it (Mailpit's v1 API,
the queue API of mta/web/queue_api.py) and follows ``/api/events``.

Mail is hostile input, so the pages carry a strict Content-Security-Policy:
scripts, styles, frames and connections only from this origin (a script that
slipped into the page through a bug still could not load or send anything
elsewhere); nothing may frame the UI itself (clickjacking). The HTML part of a
message is not shown in this page's context at all: it is an ``<iframe
sandbox>`` on ``/view/{ID}.html``, which the message API serves with a CSP of
its own that blocks scripts and remote loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Handler

# The pages' own policy (CSP Level 3). 'self' in connect-src also allows the
# events websocket on this host and port (ws: / wss: of the same origin).
UI_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
          " connect-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none';"
          " form-action 'self'; frame-ancestors 'none'")

_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
}

# Served path -> file in mta/web/static/.
STATIC_FILES = {
    "/": "index.html",
    "/static/app.js": "app.js",
    "/static/app.css": "app.css",
    "/static/favicon.svg": "favicon.svg",
    "/static/paperclip.svg": "paperclip.svg",
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str


def load_static() -> dict[str, StaticFile]:
    """Every UI file by its served path, read from the installed package."""
    folder = resources.files("mta.web") / "static"
    files = {}
    for path, name in STATIC_FILES.items():
        body = (folder / name).read_bytes()
        files[path] = StaticFile(body, _TYPES[name.rsplit(".", 1)[1]])
    return files


# Mailpit's UI shows one message at /view/{ID} (where /view/latest redirects): the
# page, which opens the message named in its path. Added after the message API's
# /view/{ID}.html and .txt, which aiohttp then tries first.
MESSAGE_PAGE = "/view/{id}"


def add_routes(app: web.Application, context: object = None) -> None:
    """GET (and HEAD) for each UI file on ``app``, and the page at :data:`MESSAGE_PAGE`.
    ``context`` is unused: the UI needs nothing of the daemon but the API it calls
    from the browser."""
    files = load_static()
    for path, file in files.items():
        app.router.add_get(path, _handler(file))
    app.router.add_get(MESSAGE_PAGE, _handler(files["/"]))


def _handler(file: StaticFile) -> Handler:
    async def serve(request: web.Request) -> web.Response:
        response = web.Response(body=file.body)
        response.headers.update(security_headers())
        response.headers["Content-Type"] = file.content_type
        # Small files, and a new mta version must not run against an old cached app.js.
        response.headers["Cache-Control"] = "no-cache"
        return response
    return serve


def security_headers() -> dict[str, str]:
    """The headers every UI file carries."""
    return {
        "Content-Security-Policy": UI_CSP,
        "X-Content-Type-Options": "nosniff",      # a .js is run only as what we say it is
        "Referrer-Policy": "no-referrer",         # links in mail do not learn the lab's URLs
        "X-Frame-Options": "DENY",                # frame-ancestors for browsers without CSP 2
    }
