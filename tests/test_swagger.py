"""GET /api/v1/swagger.json: our OpenAPI document names exactly the paths and methods
the http listener's application routes, and it is a valid OpenAPI 3.0 document."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest
from aiohttp import web
from openapi_spec_validator import validate

from mta.health import Health
from mta.store.factory import make_store
from mta.web import swagger
from mta.web.app import WebContext, build_application
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(30)

# What the document covers: the API and the views; /livez, /readyz and the UI's pages are not API.
DOCUMENTED = ("/api/", "/view/")
_PARAM = re.compile(r"\{[^}]*\}")


def _normal(path: str) -> str:
    """Path parameters compared by position, not name: aiohttp's {id} is the document's {ID}."""
    return _PARAM.sub("{}", path)


def routed(app: web.Application) -> set[tuple[str, str]]:
    found = set()
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter") or ""
        if not path.startswith(DOCUMENTED):
            continue
        for route in resource:
            if route.method not in ("HEAD", "OPTIONS"):   # aiohttp adds HEAD to each GET
                found.add((_normal(path), route.method.lower()))
    return found


def documented(doc: dict) -> set[tuple[str, str]]:
    return {(_normal(path), method) for path, item in doc["paths"].items() for method in item}


@pytest.fixture
def app(make_config, tmp_path):
    config = make_config(listeners=[{"name": "web", "address": f"127.0.0.1:{free_port()}", "mode": "http"}])
    context = WebContext(config=config, listener=config.listeners[0], store=make_store(config, role="inbound"),
                         health=Health())
    return build_application(context)


def test_the_document_and_the_routes_name_the_same_paths_and_methods(app):
    routes, doc = routed(app), documented(swagger.document())
    assert routes - doc == set(), "routed but not in swagger.json (describe them in mta/web/swagger.py)"
    assert doc - routes == set(), "in swagger.json but not routed"
    # The walk sees what it should: Mailpit's paths and ours.
    assert {("/api/v1/messages", "get"), ("/api/v1/message/{}/release", "post"), ("/api/events", "get"),
            ("/api/v1/swagger.json", "get")} <= routes


def test_the_document_is_valid_openapi_and_every_reference_resolves():
    doc = swagger.document()
    validate(doc)
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs and refs <= set(doc["components"]["schemas"])


async def test_served_as_json_over_a_real_socket(app):
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
                session.get(f"http://127.0.0.1:{port}/api/v1/swagger.json") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/json")
            assert await response.json() == swagger.document()
    finally:
        await runner.cleanup()
