"""The mode: http listener itself (mta/web/app.py), with the daemon in process on a
real loopback port: the config keys, basic auth, HTTPS, the origin check, the
probes, one-line errors, and a port that cannot be bound."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mta.config import build_config
from mta.errors import ConfigError, StartupError
from mta.passwords import set_password
from tests.support.daemon import mta_command, subprocess_env
from tests.support.in_process import listener_port, running
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(30)


def web_config(make_config: Any, tmp_path: Path, **web: Any) -> Any:
    listeners = [{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"},
                 {"name": "web", "address": f"127.0.0.1:{free_port()}", "mode": "http", **web}]
    return make_config(listeners=listeners)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def fetch(method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.text()


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize(("listener", "error"), [
    ({"name": "smtp", "address": "127.0.0.1:2525", "mode": "relay", "users_file": "/x"},
     'listeners[0].users_file: only an http listener has a users_file (this one is "relay";'
     " SMTP AUTH uses auth.users_file, POP3 mailboxes.users_file)"),
    ({"name": "web", "address": "127.0.0.1:8025", "mode": "http", "users_file": 7},
     "listeners[0].users_file: 7 is not a string"),
    ({"name": "web", "address": "127.0.0.1:8025", "mode": "https"},
     'listeners[0].mode: "https" is not one of relay, submission, pop3, http'),
    ({"name": "web", "address": "127.0.0.1:8025", "mode": "http", "tls": {"cert": "c"}},
     "listeners[0].tls.key: missing"),
    ({"name": "web", "address": "127.0.0.1:8025", "mode": "http",
      "tls": {"cert": "c", "key": "k", "implicit": True}},
     "listeners[0].tls.implicit: an http listener with tls always speaks HTTPS (leave it out)"),
])
def test_config_errors_name_the_key(listener: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"listeners": [listener], "metrics": {"address": None}})
    assert str(caught.value) == error


def test_an_http_listener_parses(tmp_path: Path) -> None:
    config = build_config({"listeners": [
        {"name": "web", "address": "127.0.0.1:8025", "mode": "http", "users_file": "/etc/mta/web.users",
         "tls": {"cert": "/c.pem", "key": "/k.pem"}}], "metrics": {"address": None}})
    [web] = config.listeners
    assert (web.name, web.host, web.port, web.mode, web.users_file) == \
        ("web", "127.0.0.1", 8025, "http", "/etc/mta/web.users")
    assert web.tls is not None and (web.tls.cert, web.tls.key) == ("/c.pem", "/k.pem")


def test_check_config_names_an_unreadable_users_file(tmp_path: Path) -> None:
    config = tmp_path / "mta.yaml"
    config.write_text(
        "listeners:\n"
        f"  - {{name: web, address: '127.0.0.1:{free_port()}', mode: http, users_file: {tmp_path}/nope}}\n"
        f"queue: {{path: {tmp_path}/q/queue.db}}\nmetrics: {{address: null}}\n")
    done = subprocess.run(mta_command("check-config", "--config", str(config)), capture_output=True,
                          text=True, env=subprocess_env(), timeout=20)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(
        f"listeners[0].users_file: {tmp_path}/nope: No such file or directory")


def test_check_config_names_a_bad_line_of_the_users_file(tmp_path: Path) -> None:
    users = tmp_path / "web.users"
    users.write_text("alice:scrypt$1\nno colon here\n")
    config = tmp_path / "mta.yaml"
    config.write_text(
        "listeners:\n"
        f"  - {{name: web, address: '127.0.0.1:{free_port()}', mode: http, users_file: {users}}}\n"
        f"queue: {{path: {tmp_path}/q/queue.db}}\nmetrics: {{address: null}}\n")
    done = subprocess.run(mta_command("check-config", "--config", str(config)), capture_output=True,
                          text=True, env=subprocess_env(), timeout=20)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(
        f"listeners[0].users_file: {users} line 2: not a user:hash line")


# --------------------------------------------------------------------------- serving

async def test_probes_and_unknown_paths(make_config: Any, tmp_path: Path) -> None:
    config = web_config(make_config, tmp_path)
    base = f"http://127.0.0.1:{listener_port(config, 'web')}"
    async with running(config):
        assert (await fetch("GET", f"{base}/livez"))[::2] == (200, "ok\n")
        status, _, body = await fetch("GET", f"{base}/readyz")
        assert (status, body) == (200, "ok\n")
        status, headers, body = await fetch("GET", f"{base}/no/such/path")
        assert (status, body) == (404, "404 page not found")
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        status, headers, body = await fetch("POST", f"{base}/livez")
        assert (status, body, headers["Allow"]) == (405, "method not allowed", "GET, HEAD")


async def test_keep_alive_serves_several_requests_on_one_connection(make_config: Any, tmp_path: Path) -> None:
    config = web_config(make_config, tmp_path)
    port = listener_port(config, "web")
    async with running(config):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(3):
                writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                assert b"Connection: close" not in head
                assert await asyncio.wait_for(reader.readexactly(3), 5) == b"ok\n"
        finally:
            writer.close()


async def test_basic_auth(make_config: Any, tmp_path: Path) -> None:
    users = tmp_path / "web.users"
    set_password(users, "alice", "s3cret pass")
    config = web_config(make_config, tmp_path, users_file=str(users))
    base = f"http://127.0.0.1:{listener_port(config, 'web')}"
    async with running(config):
        for headers in ({}, basic("alice", "wrong"), basic("mallory", "s3cret pass"),
                        {"Authorization": "Bearer abc"}, {"Authorization": "Basic !!!"}):
            status, got, body = await fetch("GET", f"{base}/no/such/path", headers=headers)
            assert (status, body, got["WWW-Authenticate"]) == (401, "Unauthorised.", 'Basic realm="mta"')
        for _ in range(2):    # the second time from the cache of good logins
            status, _, body = await fetch("GET", f"{base}/no/such/path", headers=basic("alice", "s3cret pass"))
            assert (status, body) == (404, "404 page not found")
        # Probes stay open.
        assert (await fetch("GET", f"{base}/livez"))[0] == 200
        # A changed password is in force at once, without a reload.
        set_password(users, "alice", "new pass")
        assert (await fetch("GET", f"{base}/x", headers=basic("alice", "s3cret pass")))[0] == 401
        assert (await fetch("GET", f"{base}/x", headers=basic("alice", "new pass")))[0] == 404


async def test_https(make_config: Any, tmp_path: Path, tls_cert: tuple[str, str, Any]) -> None:
    cert, key, client = tls_cert
    config = web_config(make_config, tmp_path, tls={"cert": cert, "key": key})
    port = listener_port(config, "web")
    async with running(config):
        status, _, body = await fetch("GET", f"https://127.0.0.1:{port}/livez", ssl=client)
        assert (status, body) == (200, "ok\n")
        # Plain HTTP on the HTTPS port gets no answer in the clear.
        with pytest.raises(aiohttp.ClientError):
            await fetch("GET", f"http://127.0.0.1:{port}/livez")
        # A client that does not trust the certificate refuses it.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await fetch("GET", f"https://127.0.0.1:{port}/livez", ssl=ssl.create_default_context())


async def test_origin_check(make_config: Any, tmp_path: Path) -> None:
    config = web_config(make_config, tmp_path)
    port = listener_port(config, "web")
    url = f"http://127.0.0.1:{port}/no/such/path"
    async with running(config):
        for headers in ({"Origin": "http://evil.test"}, {"Origin": f"http://127.0.0.1:{port + 1}"},
                        {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
            for method in ("DELETE", "PUT", "POST"):
                status, _, body = await fetch(method, url, headers=headers)
                assert (status, body) == (403, "cross-origin request refused"), (method, headers)
        # Same origin, and scripts that send no Origin, reach the handler (here: no such path).
        for headers in ({"Origin": f"http://127.0.0.1:{port}"}, {}, {"Sec-Fetch-Site": "same-origin"}):
            assert (await fetch("DELETE", url, headers=headers))[0] == 404
        # Reading is never refused for its origin.
        assert (await fetch("GET", url, headers={"Origin": "http://evil.test"}))[0] == 404


async def test_a_port_in_use_is_one_line(make_config: Any, tmp_path: Path) -> None:
    config = web_config(make_config, tmp_path)
    port = listener_port(config, "web")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(StartupError) as caught:
            async with running(config):
                pass
    assert str(caught.value) == f"listeners: cannot listen on 127.0.0.1:{port} (listener web): Address already in use"


async def test_a_body_over_the_limit_is_413_in_one_line(make_config: Any, tmp_path: Path) -> None:
    listeners = [{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"},
                 {"name": "web", "address": f"127.0.0.1:{free_port()}", "mode": "http"}]
    config = make_config(listeners=listeners, limits={"message_size": 1000})
    url = f"http://127.0.0.1:{listener_port(config, 'web')}/api/v1/messages"
    async with running(config):
        # The limit is message_size plus 1 MB: enough for any list of IDs.
        status, _, body = await fetch("PUT", url, data=io.BytesIO(b"x" * (1000 + 1024 * 1024 + 1)),
                                      headers={"Content-Type": "application/json"})
        assert (status, body) == (413, "Request Entity Too Large")
