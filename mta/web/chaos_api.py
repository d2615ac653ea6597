"""``GET /api/v1/chaos`` and ``PUT /api/v1/chaos``: Mailpit's fault-injection triggers.

The body both answer is the three triggers in Mailpit's shape::

    {"Sender":{"ErrorCode":451,"Probability":0},"Recipient":{"ErrorCode":451,"Probability":0},
     "Authentication":{"ErrorCode":535,"Probability":0}}

PUT takes the same shape and replaces all three: a trigger left out goes back to
its default code at 0% (Mailpit: "Setting a blank {} will reset all triggers").
Unless the configuration says ``chaos: true`` both answer 400 ``Chaos is not
enabled``, as Mailpit does without ``--enable-chaos``; a bad request is a 400 with
a one-line reason, and nothing changes. The triggers themselves, and what the SMTP
listeners do with them, are mta/inbound/chaos.py's.
"""

from __future__ import annotations

import json

from aiohttp import web

from mta.inbound.chaos import Chaos, ChaosError, parse_triggers
from mta.web.app import WebContext, bad_request

PATH = "/api/v1/chaos"
NOT_ENABLED = "Chaos is not enabled"   # Mailpit's words
CONTEXT_KEY = "chaos"                   # the daemon's Chaos in the web context's extras


def add_routes(app: web.Application, context: WebContext) -> None:
    """Register the two routes on an http listener's application. The daemon puts its one
    Chaos in ``context.extras["chaos"]``, so that the SMTP listeners and every http listener
    share the same triggers."""
    chaos = context.extras.get(CONTEXT_KEY)
    if not isinstance(chaos, Chaos):   # a context built without the daemon (tests of other modules)
        chaos = context.extras[CONTEXT_KEY] = Chaos(enabled=context.config.chaos)
    api = ChaosApi(chaos)
    app.router.add_get(PATH, api.get)
    app.router.add_put(PATH, api.put)


class ChaosApi:
    def __init__(self, chaos: Chaos):
        self.chaos = chaos

    # Refusals are raised as the app's ApiError: its middleware answers Mailpit's httpError,
    # a 400 with the reason as one line of text/plain.
    async def get(self, request: web.Request) -> web.Response:
        if not self.chaos.enabled:
            raise bad_request(NOT_ENABLED)
        return self._triggers()

    async def put(self, request: web.Request) -> web.Response:
        if not self.chaos.enabled:
            raise bad_request(NOT_ENABLED)
        body = await request.read()
        if not body.strip():
            raise bad_request("request body is empty (want a JSON object of triggers)")
        try:
            document = json.loads(body)
        except json.JSONDecodeError as exc:
            raise bad_request(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except ValueError:   # bytes that are no UTF-8, UTF-16 or UTF-32 (RFC 8259 §8.1)
            raise bad_request("invalid JSON: not UTF-8 text") from None
        try:
            triggers = parse_triggers(document)
        except ChaosError as exc:
            raise bad_request(str(exc)) from None
        self.chaos.set(triggers, by=f"HTTP client {request.remote}")
        return self._triggers()

    def _triggers(self) -> web.Response:
        # Compact, with the newline Go's json.Encoder ends its output with: Mailpit's bytes.
        text = json.dumps(self.chaos.to_json(), separators=(",", ":")) + "\n"
        return web.Response(status=200, body=text.encode(), content_type="application/json")

