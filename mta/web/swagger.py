"""``GET /api/v1/swagger.json``: an OpenAPI 3.0 document of what mta's http listener serves.

Our own document, built here (not Mailpit's file): every ``/api/v1`` path and
method mta serves -- Mailpit's that we implement, and ours (release through
the queue, chaos, the queue page's API) -- with the JSON shapes
mta/web/mailpit_json.py writes, plus ``/api/events`` and ``/view/...``.
tests/test_swagger.py walks the application's routes and this document and
fails when one names a path or method the other does not: a route added
without its description, or a description of a route that went, is a
failing test, not a stale document.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mta import __version__
from mta.web.app import WebContext

SWAGGER_PATH = "/api/v1/swagger.json"

Json = dict[str, Any]


# --------------------------------------------------------------------------- building blocks

def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _array(items: Json) -> Json:
    return {"type": "array", "items": items}


def _object(properties: dict[str, Json], required: tuple[str, ...] = ()) -> Json:
    schema: Json = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


STRING: Json = {"type": "string"}
INTEGER: Json = {"type": "integer"}
BOOLEAN: Json = {"type": "boolean"}
NUMBER: Json = {"type": "number"}
TIME: Json = {"type": "string", "format": "date-time"}
STRINGS: Json = _array(STRING)


def _json_body(schema: Json, description: str, required: bool = False) -> Json:
    return {"description": description, "required": required,
            "content": {"application/json": {"schema": schema}}}


def _json(schema: Json, description: str = "OK") -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(description: str = "ok") -> Json:
    return {"description": description, "content": {"text/plain": {"schema": STRING}}}


def _responses(ok: Json, *errors: int) -> Json:
    found: Json = {"200": ok}
    reasons = {400: "Bad request: a one-line reason", 404: "404 page not found",
               503: "Temporarily unavailable: a one-line reason"}
    for code in errors:
        found[str(code)] = _text(reasons[code])
    return found


def _op(summary: str, tag: str, responses: Json, *, description: str = "", parameters: list[Json] | None = None,
        body: Json | None = None) -> Json:
    operation: Json = {"summary": summary, "tags": [tag], "responses": responses}
    if description:
        operation["description"] = description
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    return operation


def _path_param(name: str, description: str) -> Json:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": STRING}


def _query(name: str, description: str, schema: Json = STRING, required: bool = False) -> Json:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


ID = _path_param("ID", 'Message ID, or "latest" for the newest message')
PART_ID = _path_param("PartID", "Part ID (as in the message's Attachments and Inline)")
START = _query("start", "Pagination offset", {"type": "integer", "default": 0})
LIMIT = _query("limit", "Number of messages", {"type": "integer", "default": 50})
MAILBOX = _query("mailbox", "mta's extension: only the messages this lab mailbox holds (an address)")
QUERY = _query("query", "Search (Mailpit's language: words, \"phrases\", to:, from:, subject:, is:read, "
                        "has:attachment, before:, after:, larger:, smaller:, mailbox:, -negation)",
               required=True)
TZ = _query("tz", "Time zone for before: and after: (accepted; dates are read as UTC)")


# --------------------------------------------------------------------------- the shapes

SCHEMAS: dict[str, Json] = {
    "Address": _object({"Name": STRING, "Address": STRING}),
    "MessageSummary": _object({
        "ID": STRING, "MessageID": STRING, "Read": BOOLEAN,
        "From": {**_ref("Address"), "nullable": True},
        "To": _array(_ref("Address")), "Cc": _array(_ref("Address")), "Bcc": _array(_ref("Address")),
        "ReplyTo": _array(_ref("Address")), "Subject": STRING, "Created": TIME, "Tags": STRINGS,
        "Size": INTEGER, "Attachments": INTEGER, "Snippet": STRING,
        "Mailboxes": {**STRINGS, "description": "mta's extension: the lab mailboxes holding a copy"},
    }),
    "MessagesSummary": _object({
        "total": {**INTEGER, "description": "Messages in the inbox (or the one mailbox asked for)"},
        "unread": INTEGER, "count": {**INTEGER, "description": "Messages in this page (legacy)"},
        "messages_count": {**INTEGER, "description": "Messages the list or search matched"},
        "messages_unread": INTEGER, "start": INTEGER, "tags": STRINGS,
        "messages": _array(_ref("MessageSummary")),
    }),
    "Attachment": _object({
        "PartID": STRING, "FileName": STRING, "ContentType": STRING, "ContentID": STRING, "Size": INTEGER,
        "Checksums": _object({"MD5": STRING, "SHA1": STRING, "SHA256": STRING}),
    }),
    "ListUnsubscribe": _object({"Header": STRING, "Links": STRINGS, "Errors": STRING, "HeaderPost": STRING}),
    "Message": _object({
        "ID": STRING, "MessageID": STRING, "From": {**_ref("Address"), "nullable": True},
        "To": _array(_ref("Address")), "Cc": _array(_ref("Address")), "Bcc": _array(_ref("Address")),
        "ReplyTo": _array(_ref("Address")), "ReturnPath": STRING, "Subject": STRING,
        "ListUnsubscribe": _ref("ListUnsubscribe"), "Date": TIME, "Tags": STRINGS, "Text": STRING,
        "HTML": STRING, "Size": INTEGER, "Inline": _array(_ref("Attachment")),
        "Attachments": _array(_ref("Attachment")), "Mailboxes": STRINGS,
    }),
    "MessageHeaders": {"type": "object", "additionalProperties": STRINGS,
                       "description": "Each header field's values, by canonical name (\"Message-Id\")"},
    "AppInformation": {"type": "object", "additionalProperties": True,
                       "properties": {"Version": STRING, "LatestVersion": STRING, "Database": STRING,
                                      "DatabaseSize": NUMBER, "Messages": INTEGER, "Unread": INTEGER,
                                      "Tags": {"type": "object", "additionalProperties": INTEGER},
                                      "RuntimeStats": {"type": "object", "additionalProperties": True}}},
    "ReadStatusRequest": _object({"IDs": STRINGS, "Read": BOOLEAN, "Search": STRING}),
    "DeleteRequest": _object({"IDs": STRINGS}),
    "SetTagsRequest": _object({"IDs": STRINGS, "Tags": STRINGS}, required=("IDs", "Tags")),
    "ReleaseRequest": _object({"To": {**STRINGS, "example": ["user1@example.com"]}}, required=("To",)),
    "ChaosTrigger": _object({"ErrorCode": INTEGER, "Probability": {**INTEGER, "minimum": 0, "maximum": 100}}),
    "ChaosTriggers": _object({"Sender": _ref("ChaosTrigger"), "Recipient": _ref("ChaosTrigger"),
                              "Authentication": _ref("ChaosTrigger")}),
    # mta's queue (mta/web/queue_api.py): the web mailq.
    "QueueRecipient": _object({"Address": STRING, "State": {"type": "string",
                                                             "enum": ["queued", "active", "deferred", "held"]},
                               "Attempts": INTEGER, "NextAttempt": {**TIME, "nullable": True},
                               "LastError": STRING}),
    "QueueMessage": _object({"ID": STRING, "Queue": {"type": "string", "enum": ["active", "deferred", "hold"]},
                             "Sender": {**STRING, "description": '"" for a bounce (MAILER-DAEMON)'},
                             "Arrival": TIME, "Size": INTEGER, "Recipients": _array(_ref("QueueRecipient"))}),
    "QueueList": _object({"total": INTEGER, "start": INTEGER, "count": INTEGER, "active": INTEGER,
                          "deferred": INTEGER, "hold": INTEGER, "messages": _array(_ref("QueueMessage"))}),
    "QueueActionRequest": _object({"IDs": STRINGS}, required=("IDs",)),
    "QueueActionResult": _object({"Found": STRINGS, "NotFound": STRINGS,
                                  "Changed": {"type": "object", "additionalProperties": INTEGER,
                                              "description": "Recipients changed (removed) per queue ID"}}),
    "Event": _object({"Type": {"type": "string", "enum": ["new", "delete", "update", "stats"]},
                      "Data": {"description": "new: a MessageSummary; delete: {ID}; update: {ID, Read}; "
                                              "stats: {Total, Unread, Version}"}}),
}


# --------------------------------------------------------------------------- the paths

def paths() -> dict[str, Json]:
    page = _json(_ref("MessagesSummary"))
    return {
        "/api/v1/messages": {
            "get": _op("List messages", "messages", _responses(page, 400), parameters=[START, LIMIT, MAILBOX],
                       description="Newest first."),
            "put": _op("Set read status", "messages", _responses(_text(), 400),
                       body=_json_body(_ref("ReadStatusRequest"), "IDs, or a Search, or neither for all"),
                       description="Marks the messages named by IDs (or matching Search, or all) read or unread."),
            "delete": _op("Delete messages", "messages", _responses(_text(), 400),
                          body=_json_body(_ref("DeleteRequest"), "IDs; no body: every message"),
                          description="Removes each message from every lab mailbox."),
        },
        "/api/v1/search": {
            "get": _op("Search messages", "messages", _responses(page, 400),
                       parameters=[QUERY, START, LIMIT, TZ, MAILBOX]),
            "delete": _op("Delete the messages a search matches", "messages", _responses(_text(), 400),
                          parameters=[QUERY, TZ, MAILBOX]),
        },
        "/api/v1/message/{ID}": {
            "get": _op("Get a message", "message", _responses(_json(_ref("Message")), 400, 404),
                       parameters=[ID], description="Marks the message read."),
        },
        "/api/v1/message/{ID}/headers": {
            "get": _op("Get a message's header fields", "message",
                       _responses(_json(_ref("MessageHeaders")), 400, 404), parameters=[ID]),
        },
        "/api/v1/message/{ID}/raw": {
            "get": _op("Get a message's source", "message", _responses(_text("The message as stored"), 404),
                       parameters=[ID, _query("dl", "1: as a download (Content-Disposition: attachment)")]),
        },
        "/api/v1/message/{ID}/part/{PartID}": {
            "get": _op("Get an attachment or inline part", "message",
                       _responses({"description": "The part's content, with its Content-Type",
                                   "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}},
                                  404),
                       parameters=[ID, PART_ID]),
        },
        "/api/v1/message/{ID}/release": {
            "post": _op("Release a message through mta's queue", "message", _responses(_text(), 400, 404, 503),
                        parameters=[ID], body=_json_body(_ref("ReleaseRequest"), "The recipients", True),
                        description="Unlike Mailpit: the message is queued (retries, bounces) under the relay "
                                    "rules of an SMTP listener; the envelope sender is the original one. "
                                    "The answer's X-Queue-Id names the new queue entry."),
        },
        "/api/v1/tags": {
            "get": _op("Every tag in use", "tags", _responses(_json(STRINGS))),
            "put": _op("Set messages' tags", "tags", _responses(_text(), 400),
                       body=_json_body(_ref("SetTagsRequest"), "IDs and the tags they get (replacing theirs)",
                                       True)),
        },
        "/api/v1/info": {
            "get": _op("Application information", "application", _responses(_json(_ref("AppInformation")))),
        },
        "/api/v1/chaos": {
            "get": _op("Get the chaos triggers", "testing", _responses(_json(_ref("ChaosTriggers")), 400),
                       description="400 \"Chaos is not enabled\" unless the config has chaos: true."),
            "put": _op("Set the chaos triggers", "testing", _responses(_json(_ref("ChaosTriggers")), 400),
                       body=_json_body(_ref("ChaosTriggers"), "Triggers left out are turned off"),
                       description="Refused (400) unless the config has chaos: true; applied on the SMTP "
                                   "listeners at MAIL (Sender), RCPT (Recipient) and AUTH (Authentication)."),
        },
        **queue_paths(),
        SWAGGER_PATH: {
            "get": _op("This document", "application", _responses(_json({"type": "object"}))),
        },
        "/api/events": {
            "get": _op("Live events (websocket, RFC 6455)", "application",
                       {"101": {"description": "Switching protocols; then one JSON Event per text frame",
                                "content": {"application/json": {"schema": _ref("Event")}}},
                        "400": _text("Not a websocket handshake"), "403": _text("Cross-origin handshake")}),
        },
        "/view/latest": {
            "get": _op("Redirect to the newest message's view", "testing",
                       {"302": {"description": "To /view/{ID} (or / when there is none)"}},
                       parameters=[_query("query", "Only messages matching this search")]),
        },
        "/view/{ID}": {
            "get": _op("The web UI with this message open", "testing",
                       {"200": {"description": "The UI's page (it opens the message itself)",
                                "content": {"text/html": {"schema": STRING}}}},
                       parameters=[_path_param("ID", "Message ID")]),
        },
        "/view/{ID}.html": {
            "get": _op("A message's HTML part", "testing",
                       _responses({"description": "HTML", "content": {"text/html": {"schema": STRING}}}, 404),
                       parameters=[ID]),
        },
        "/view/{ID}.txt": {
            "get": _op("A message's text part", "testing", _responses(_text("The text"), 404), parameters=[ID]),
        },
    }


def queue_paths() -> dict[str, Json]:
    """mta's own: the queue page's API (mta/web/queue_api.py), like `mta queue …`."""
    found: dict[str, Json] = {
        "/api/mta/queue": {
            "get": _op("List the mail queue (like mailq)", "queue", _responses(_json(_ref("QueueList")), 400),
                       parameters=[_query("start", "Offset", {"type": "integer", "default": 0}),
                                   _query("limit", "Messages (at most 5000)", {"type": "integer", "default": 500})],
                       description="Messages with recipients still pending, oldest first."),
        },
    }
    what = {"hold": "Put the pending recipients on hold",
            "release": "Release held recipients: due now",
            "flush": "Make deferred recipients due now",
            "delete": "Remove messages from the queue"}
    for action, summary in what.items():
        found[f"/api/mta/queue/{action}"] = {
            "post": _op(summary, "queue", _responses(_json(_ref("QueueActionResult")), 400),
                        body=_json_body(_ref("QueueActionRequest"), "Queue IDs (at least one)", True)),
        }
    return found


def document() -> Json:
    return {
        "openapi": "3.0.3",
        "info": {"title": "mta lab inbox API", "version": __version__,
                 "description": "Mailpit's v1 API as mta serves it (paths, methods and JSON field names "
                                "as Mailpit has them), with mta's additions."},
        "paths": paths(),
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}}},
        "security": [{"basic": []}],
    }


async def swagger(request: web.Request) -> web.Response:
    return web.json_response(document())


def add_routes(app: web.Application, context: WebContext) -> None:
    app.router.add_get(SWAGGER_PATH, swagger)
