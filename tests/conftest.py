"""Fixtures shared by several test modules. Helpers (functions and classes) live in
tests/support/; a test module imports them from there, never from another test module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mta.config import Config, build_config
from mta.passwords import set_password
from tests.support.backends import BACKENDS, QueueBackend
from tests.support.fakedns import FakeDNS
from tests.support.ports import PEER_HOSTS, free_port, free_port_all
from tests.support.postgres import Cluster, unavailable_reason
from tests.support.tls import make_tls


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
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a config dict as YAML in the test's directory; its path."""

    def write(data: dict[str, Any], name: str = "mta.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    """A users file for AUTH with one user, alice, password "s3cret pass"."""
    path = tmp_path / "users"
    set_password(path, "alice", "s3cret pass")
    return path


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Any]:
    """(certificate file, key file, client SSLContext trusting it) for relay.lab.test and 127.0.0.1."""
    files = make_tls(tmp_path_factory.mktemp("tls"))
    return files.cert, files.key, files.client


# ----------------------------------------------------------------- delivery end to end, in process
# The daemon runs in the test's process; next hops are RecordingPeers on 127.0.0.2, 127.0.0.3, …
# all on one port, found through a real DNS server on 127.0.0.1.

@pytest.fixture
def dns_server() -> Iterator[FakeDNS]:
    """A FakeDNS with no zones yet (fill them with support.fakedns.mx)."""
    with FakeDNS(zones={}) as server:
        yield server


@pytest.fixture
def peer_port() -> int:
    """One port free on 127.0.0.2-4, where the next hops listen."""
    return free_port_all(PEER_HOSTS)


@pytest.fixture
def relay_config(make_config: Callable[..., Config], dns_server: FakeDNS,
                 peer_port: int) -> Callable[..., Config]:
    """make(**delivery) -> a config whose delivery uses the fake DNS and the peers' port."""

    def make(**delivery: Any) -> Config:
        doc: dict[str, Any] = {
            "port": peer_port,
            "dns": {"nameservers": ["127.0.0.1"], "port": dns_server.port, "timeout": "2s"},
            "retry": {"min_backoff": "5m", "max_backoff": "1h"},
            "connection_cache": {"idle_timeout": "2s"},
            "timeouts": {"connect": "2s", "command": "5s"},
        }
        for key, value in delivery.items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            else:
                doc[key] = value
        return make_config(delivery=doc)

    return make


# ----------------------------------------------------------------- PostgreSQL (issue 16)
# One private cluster for the whole session (tests/support/postgres.py), started on first
# use; each test gets a fresh database in it. Without PostgreSQL the tests that need it skip.

@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def postgres_dsn(postgres_cluster: Cluster) -> Iterator[str]:
    """The DSN of a fresh, empty database, dropped after the test."""
    name = postgres_cluster.create_database()
    yield postgres_cluster.dsn(name)
    postgres_cluster.drop_database(name)


@pytest.fixture(params=BACKENDS)
async def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueBackend]:
    """The queue on each backend in turn: SQLite, then PostgreSQL (skipped without it)."""
    if request.param == "sqlite":
        backend = await QueueBackend.sqlite(tmp_path / "queue.db")
    else:
        backend = await QueueBackend.postgresql(request.getfixturevalue("postgres_dsn"))
    try:
        yield backend
    finally:
        await backend.close()
