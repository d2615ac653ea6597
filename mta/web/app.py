"""The ``mode: http`` listener: one aiohttp application per http listener, on the
daemon's own loop, serving the lab inbox (Mailpit's v1 API, issue 15) and
whatever else registers its routes here.

Adding routes: a module defines ``add_routes(app, context)`` and is named in
:data:`ROUTE_MODULES` (or passed to :func:`build_application`). Handlers find the
daemon's parts with ``request.app[CONTEXT]`` (a :class:`WebContext`); what a
module keeps for itself (the events hub, the chaos triggers) goes in
``context.extras`` under its own name, or in an ``web.AppKey`` of its own.

The middlewares, outermost first:

* errors: every failure is a short ``text/plain`` reason with the status Mailpit
  gives (400 for a bad request, 404 "404 page not found" for an unknown path or
  ID), never a traceback; an unexpected exception is a 500 and one log line.
* basic auth (a listener with ``users_file``): RFC 7617, the same ``user:scrypt``
  lines ``mta passwd`` writes; 401 with ``WWW-Authenticate: Basic realm="mta"``.
  /livez and /readyz stay open for probes, as Mailpit's are.
* origin: a state-changing request (PUT, POST, PATCH, DELETE) that a browser
  marks as coming from another site is refused with 403 -- mail is hostile input,
  and a page opened from a message must not delete or release mail through the
  user's logged-in browser. Scripts send no Origin and pass.

Keep-alive stays on: Mailpit's clients poll the list.
"""

from __future__ import annotations

import importlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from mta.config import Config, ListenerConfig
from mta.errors import StoreError
from mta.health import Health
from mta.metrics import Metrics
from mta.passwords import UsersFile
from mta.store.api import Store
from mta.web.auth import BasicAuth
from mta.web.server import serve

log = logging.getLogger("mta.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Modules whose add_routes(app, context) builds the application, one per line, in this
# order: aiohttp tries routes in the order they were added, so the API's fixed paths
# (/view/{id}.html) come before a UI's catch-all ones (/view/{id}).
ROUTE_MODULES: list[str] = [
    "mta.web.mailpit_api",
    "mta.web.release",
    "mta.web.events",
    "mta.web.chaos_api",
    "mta.web.swagger",
    "mta.web.queue_api",
    "mta.web.ui",
]

KEEPALIVE_TIMEOUT = 75.0     # seconds an idle keep-alive connection is kept (aiohttp's default)
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OPEN_PATHS = frozenset({"/livez", "/readyz"})   # no basic auth: liveness and readiness probes


@dataclass
class WebContext:
    """What the web modules need of the daemon, handed to each add_routes()."""

    config: Config
    listener: ListenerConfig
    store: Store
    health: Health
    metrics: Metrics | None = None
    started: float = field(default_factory=time.time)
    extras: dict[str, Any] = field(default_factory=dict)   # per-module state, by module name

    @property
    def chaos_enabled(self) -> bool:
        return bool(getattr(self.config, "chaos", False))


CONTEXT = web.AppKey("mta_web_context", WebContext)


class ApiError(Exception):
    """A request the API refuses: ``status`` and a one-line ``reason`` (Mailpit's words)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def bad_request(reason: str) -> ApiError:
    return ApiError(400, reason)


def not_found(reason: str = "404 page not found") -> ApiError:
    """Mailpit's answer for an unknown path or ID."""
    return ApiError(404, reason)


def text_response(status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> web.Response:
    response = web.Response(status=status, body=text.encode("utf-8", "replace"))
    response.headers["Content-Type"] = content_type
    return response


def build_application(context: WebContext, modules: Sequence[str | ModuleType] | None = None,
                      users: UsersFile | None = None) -> web.Application:
    """The application of one http listener: the middlewares, /livez and /readyz,
    then each module's routes."""
    auth = BasicAuth(users) if users is not None else None
    app = web.Application(middlewares=[_errors, _basic_auth(auth), _origin_check],
                          client_max_size=context.config.limits.message_size + 1024 * 1024)
    app[CONTEXT] = context
    app.router.add_get("/livez", _live)
    app.router.add_get("/readyz", _ready)
    for module in ROUTE_MODULES if modules is None else modules:
        loaded = importlib.import_module(module) if isinstance(module, str) else module
        loaded.add_routes(app, context)
    return app


async def _live(request: web.Request) -> web.Response:
    return text_response(200, "ok\n")


async def _ready(request: web.Request) -> web.Response:
    # The same answer as the metrics address's /readyz (mta/web/server.py).
    health = request.app[CONTEXT].health
    return text_response(200 if health.ok else 503, health.report())


# --------------------------------------------------------------------------- middlewares

@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    # No NUL reaches the store (PostgreSQL's text refuses one; no stored text holds one):
    # an ID, a search or a parameter with %00 in it is a bad request, on either backend.
    if "\x00" in request.path or any("\x00" in key + value for key, value in request.query.items()):
        return text_response(400, "NUL character in the request")
    try:
        return await handler(request)
    except ApiError as exc:
        return text_response(exc.status, _one_line(exc.reason))
    except StoreError as exc:   # the database is down or unreachable: the store's one line
        log.warning("%s %s from %s: %s", request.method, request.path, request.remote, exc)
        return text_response(503, _one_line(f"queue unavailable: {exc}"))
    except web.HTTPMethodNotAllowed as exc:
        response = text_response(405, "method not allowed")
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPNotFound:
        return text_response(404, "404 page not found")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise          # redirects
        response = text_response(exc.status, _one_line(exc.reason))
        for name in ("WWW-Authenticate", "Allow"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except (ConnectionError, TimeoutError) as exc:   # the client went away mid-request
        log.info("%s %s from %s: %s", request.method, request.path, request.remote, exc)
        raise
    except Exception as exc:
        log.error("%s %s from %s failed: %r", request.method, request.path, request.remote, exc)
        return text_response(500, "internal error (see the mta log)")


def _basic_auth(auth: BasicAuth | None) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if auth is None or request.path in OPEN_PATHS:
            return await handler(request)
        user = await auth.authenticate(request.headers.get("Authorization"), request.remote or "")
        if user is None:
            response = text_response(401, "Unauthorised.")
            response.headers["WWW-Authenticate"] = 'Basic realm="mta"'
            return response
        return await handler(request)
    return check


@web.middleware
async def _origin_check(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in STATE_CHANGING and _cross_origin(request):
        log.warning("refused %s %s from %s: cross-origin request (Origin %s, Host %s)", request.method,
                    request.path, request.remote, request.headers.get("Origin", "-"),
                    request.headers.get("Host", "-"))
        return text_response(403, "cross-origin request refused")
    return await handler(request)


def _cross_origin(request: web.Request) -> bool:
    """A browser's request from another site: its Fetch Metadata says so, or its Origin
    (RFC 6454) names another host:port than the Host it was sent to."""
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False          # curl, test suites, Mailpit clients
    host = request.headers.get("Host", "").lower()
    try:
        netloc = urlsplit(origin).netloc.lower()   # "null" (a sandboxed frame, a file) has none
    except ValueError:
        return True
    return not netloc or netloc != host


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "error"


# --------------------------------------------------------------------------- the listener

class WebListener:
    """One ``mode: http`` listener: ``await start()``, ``await stop()``, ``reload_users()``."""

    def __init__(self, context: WebContext, *, health: Health | None = None,
                 modules: Sequence[str | ModuleType] | None = None):
        self.context = context
        self.listener = context.listener
        self.users: UsersFile | None = None
        if self.listener.users_file:
            self.users = UsersFile(self.listener.users_file, label=f"listeners.{self.listener.name}.users_file",
                                   health=health, component=f"web_users_file_{self.listener.name}")
        self.modules = modules
        self._runner: web.AppRunner | None = None
        self.addresses: list[tuple[str, int]] = []

    def application(self) -> web.Application:
        return build_application(self.context, self.modules, self.users)

    def tls_context(self) -> ssl.SSLContext | None:
        if self.listener.tls is None:
            return None
        from mta.inbound.server import make_tls_context
        context = make_tls_context(self.listener.tls)
        context.set_alpn_protocols(["http/1.1"])
        return context

    async def start(self) -> list[tuple[str, int]]:
        """Listen on the listener's address; OSError when it cannot be bound (nothing left running)."""
        self._runner, self.addresses = await serve(self.application(), self.listener.host, self.listener.port,
                                                   keepalive_timeout=KEEPALIVE_TIMEOUT,
                                                   ssl_context=self.tls_context())
        scheme = "https" if self.listener.tls else "http"
        auth = ", basic auth" if self.users is not None else ""
        for host, port in self.addresses:
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            log.info("listener %s: serving the lab inbox on %s://%s/%s", self.listener.name, scheme, shown, auth)
        return self.addresses

    def sockets(self) -> list[tuple[str, int]]:
        return list(self.addresses)

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def reload_users(self) -> None:
        """SIGHUP: read the basic-auth users file again (it is also re-read when it changes)."""
        if self.users is not None:
            self.users.refresh()

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
