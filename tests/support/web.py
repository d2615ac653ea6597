"""A lab for the web API tests: an SMTP relay listener, a POP3 listener and an http
listener over one queue, mailboxes alice@ and bob@lab.test, mail sent with smtplib
and read back with a real HTTP client."""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from mta.config import Config
from mta.passwords import set_password
from tests.support.ports import free_port

MAILBOX_PASSWORDS = {"alice@lab.test": "alice pw", "bob@lab.test": "bob pw"}


def lab_config(make_config: Callable[..., Config], tmp_path: Path, **web: Any) -> Config:
    users = tmp_path / "mailboxes.users"
    for user, password in MAILBOX_PASSWORDS.items():
        set_password(users, user, password)
    listeners = [
        {"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"},
        {"name": "pop3", "address": f"127.0.0.1:{free_port()}", "mode": "pop3", "allow_insecure_auth": True},
        {"name": "web", "address": f"127.0.0.1:{free_port()}", "mode": "http", **web},
    ]
    return make_config(listeners=listeners, local_domains=["lab.test"], mailboxes={"users_file": str(users)})


def port_of(config: Config, name: str) -> int:
    return next(lc.port for lc in config.listeners if lc.name == name)


def send(config: Config, message: bytes, recipients: list[str], sender: str = "ci@remote.test") -> None:
    """One message over real SMTP (smtplib), blocking: call it in a thread."""
    with smtplib.SMTP("127.0.0.1", port_of(config, "mta"), timeout=10) as client:
        client.sendmail(sender, recipients, message)


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        assert self.headers["Content-Type"].startswith("application/json"), self.headers["Content-Type"]
        return json.loads(self.body)


class Http:
    """A real HTTP client for the lab's http listener."""

    def __init__(self, config: Config, scheme: str = "http", **session: Any):
        self.base = f"{scheme}://127.0.0.1:{port_of(config, 'web')}"
        self.session_args = session
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Http:
        self.session = aiohttp.ClientSession(**self.session_args)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    async def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        assert self.session is not None
        async with self.session.request(method, self.base + path, allow_redirects=False, **kwargs) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("GET", path, **kwargs)

    async def messages(self, query: str = "") -> Any:
        reply = await self.get("/api/v1/messages" + query)
        assert reply.status == 200, reply.text
        return reply.json()

    async def wait_for_total(self, total: int, timeout: float = 15.0) -> Any:  # noqa: ASYNC109
        """Until the list has ``total`` messages; the list."""
        deadline = time.monotonic() + timeout
        while True:
            listed = await self.messages()
            if listed["total"] == total:
                return listed
            assert time.monotonic() < deadline, f"inbox has {listed['total']} messages, not {total}"
            await asyncio.sleep(0.05)
