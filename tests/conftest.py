"""Shared fixtures: free ports, configs on temporary queues, an in-process daemon."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mta.app import App
from mta.config import Config, build_config

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (bound and released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_all(hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")) -> int:
    """One port number free on every given loopback address."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            socks = []
            for host in hosts:
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return port
    raise RuntimeError("no common free port")


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """build_config() from a dict, with a private queue and free ports filled in."""

    def make(data: dict[str, Any] | None = None, **overrides: Any) -> Config:
        doc: dict[str, Any] = {
            "hostname": "relay.lab.test",
            "listeners": [{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"}],
            "queue": {"path": str(tmp_path / "queue.db")},
            "metrics": {"address": None},
        }
        doc.update(data or {})
        doc.update(overrides)
        return build_config(doc)

    return make


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def write(data: dict[str, Any], name: str = "mta.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@contextlib.asynccontextmanager
async def running(config: Config, *, deliver: bool = False) -> AsyncIterator[App]:
    """An App serving on the test's event loop until the block ends.

    deliver=False runs the listeners and the queue only, so inbound tests see
    their messages stay queued exactly as accepted."""
    app = App(config, deliver=deliver)
    await app.start()
    try:
        yield app
    finally:
        await app.shutdown()


def listener_port(config: Config, name: str = "mta") -> int:
    return next(lc.port for lc in config.listeners if lc.name == name)


def mta_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mta", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MTA_CONFIG", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env
