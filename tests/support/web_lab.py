"""A real `mta serve` with a lab inbox behind an http listener, for end-to-end tests of
the HTTP API: an SMTP relay listener, a POP3 listener, an http listener, local_domains
lab.test with alice@ and bob@, and whatever the test adds to the config.

    async with web_lab(tmp_path) as lab:
        queue_id = await lab.send(["alice@lab.test"], b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
        [summary] = (await lab.get_json("/api/v1/messages"))["messages"]
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import poplib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.daemon import mta_command, start_serving, stop_all, subprocess_env
from tests.support.ports import free_port
from tests.support.users import write_users
from tests.support.wire import Wire

MAILBOX_USERS = {"alice@lab.test": "alice pw", "bob@lab.test": "bob pw"}
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=15)


@dataclass
class WebLab:
    proc: asyncio.subprocess.Process
    smtp_port: int
    pop3_port: int
    http_port: int
    config_path: Path
    log_path: Path
    doc: dict[str, Any]
    authorization: str | None = None    # an Authorization header for every request (a listener with users_file)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def send(self, recipients: list[str], body: bytes, sender: str = "ci@lab.test") -> str:
        """One SMTP transaction; the queue id of its 250."""
        async with await Wire.connect("127.0.0.1", self.smtp_port) as wire:
            reply = await wire.mail(sender, recipients, body.replace(b"\r\n.", b"\r\n.."))
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        return reply.rsplit(" ", 1)[1]

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        headers = dict(kwargs.pop("headers", None) or {})
        if self.authorization is not None:
            headers.setdefault("Authorization", self.authorization)
        kwargs["headers"] = {k: v for k, v in headers.items() if v is not None}
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session, \
                session.request(method, self.base + path, **kwargs) as response:
            return response.status, dict(response.headers), await response.read()

    async def get_json(self, path: str) -> Any:
        status, _, body = await self.request("GET", path)
        assert status == 200, (status, body)
        return json.loads(body)

    async def wait_for_messages(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:  # noqa: ASYNC109
        """The list's summaries once it holds ``count`` messages."""
        deadline = time.monotonic() + timeout
        while True:
            page = await self.get_json("/api/v1/messages")
            if len(page["messages"]) == count:
                return list(page["messages"])
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(page['messages'])} messages, not {count}:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.05)

    def pop3_delete_all(self, user: str) -> int:
        """Log in as ``user`` over POP3, DELE every message, QUIT (blocking: run in a thread)."""
        pop = poplib.POP3("127.0.0.1", self.pop3_port, timeout=10)
        try:
            pop.user(user)
            pop.pass_(MAILBOX_USERS[user])
            count = len(pop.list()[1])
            for number in range(1, count + 1):
                pop.dele(number)
        finally:
            pop.quit()
        return count


def basic(user: str, password: str) -> str:
    """An RFC 7617 Authorization header value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def lab_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    users = tmp_path / "mailboxes.users"
    if not users.exists():
        write_users(users, MAILBOX_USERS)
    doc: dict[str, Any] = {
        "hostname": "relay.lab.test",
        "listeners": [
            {"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"},
            {"name": "pop3", "address": f"127.0.0.1:{free_port()}", "mode": "pop3", "allow_insecure_auth": True},
            {"name": "web", "address": f"127.0.0.1:{free_port()}", "mode": "http"},
        ],
        "queue": {"path": str(tmp_path / "queue" / "queue.db")},
        "metrics": {"address": None},
        "local_domains": ["lab.test"],
        "mailboxes": {"users_file": str(users)},
    }
    web = extra.pop("web", None)
    if web:
        doc["listeners"][2].update(web)
    doc.update(extra)
    return doc


@contextlib.asynccontextmanager
async def web_lab(tmp_path: Path, **extra: Any) -> AsyncIterator[WebLab]:
    """`mta serve` with lab_config(tmp_path, **extra) (``web={...}`` adds to the http
    listener), until the http listener answers /livez; stopped (SIGTERM) on the way out."""
    doc = lab_config(tmp_path, **extra)
    config_path = tmp_path / "mta.yaml"
    config_path.write_text(yaml.safe_dump(doc))
    log_path = tmp_path / "mta.log"
    ports = [int(lc["address"].rsplit(":", 1)[1]) for lc in doc["listeners"]]
    try:
        proc = await start_serving(mta_command("serve", "--config", str(config_path)), log_path, ports[0],
                                   env=subprocess_env())
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{log_path.read_text(errors='replace')[-3000:]}") from None
    lab = WebLab(proc, ports[0], ports[1], ports[2], config_path, log_path, doc)
    try:
        await _wait_live(lab)
        yield lab
    finally:
        await stop_all([proc])


async def _wait_live(lab: WebLab, timeout: float = 15.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _, _ = await lab.request("GET", "/livez")
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
            continue
        if status == 200:
            return
    raise AssertionError(f"the http listener did not answer:\n{lab.log_text()[-3000:]}")
