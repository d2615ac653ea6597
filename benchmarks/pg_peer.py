"""The PostgreSQL server under the mta nodes (issue 16): a private cluster or --dsn.

The private cluster is the tests' (tests/support/postgres.py): initdb and pg_ctl
in a temporary directory, on a free port of 127.0.0.1, run as the postgres user
when the bench runs as root, fsync and synchronous_commit on (its defaults
otherwise: shared_buffers 128 MB, max_connections 200). Each run gets a fresh
database, dropped afterwards. Its CPU is every process of the cluster (the
postmaster's tree; backends that exited are in its cutime/cstime).

With --dsn the bench uses a server of yours instead: it creates and drops a
database ``relay_bench_N`` per run through that DSN (the role needs CREATEDB),
and cannot see the server's CPU.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import procfs

ROOT = Path(__file__).resolve().parent.parent


def unavailable_reason() -> str | None:
    sys.path.insert(0, str(ROOT))
    from tests.support.postgres import unavailable_reason as reason
    return reason()


class PgServer:
    def __init__(self, dsn: str | None = None, tmpdir: str | None = None):
        self.fixed_dsn = dsn
        self.cluster = None
        self._names = itertools.count(1)
        if dsn is None:
            sys.path.insert(0, str(ROOT))
            from tests.support.postgres import Cluster
            if tmpdir:
                tempfile.tempdir = tmpdir   # the cluster's directory: a real disk, as the queues'
            self.cluster = Cluster()

    def start(self) -> None:
        if self.cluster is not None:
            self.cluster.start()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.remove()

    def describe(self) -> str:
        if self.cluster is None:
            return f"PostgreSQL at {_redacted(self.fixed_dsn or '')}"
        version = self.cluster.psql("SHOW server_version").strip()
        return f"PostgreSQL {version}, private cluster in {self.cluster.dir}"

    def pids(self) -> list[int]:
        """The server's processes (empty with --dsn: not ours to see)."""
        if self.cluster is None:
            return []
        try:
            pid = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return procfs.tree(pid)

    def create_database(self) -> str:
        """A fresh database; its DSN."""
        if self.cluster is not None:
            return self.cluster.dsn(self.cluster.create_database())
        name = f"relay_bench_{os.getpid()}_{next(self._names)}"
        asyncio.run(_admin(self.fixed_dsn or "", f"CREATE DATABASE {name}"))
        parts = urlsplit(self.fixed_dsn or "")
        return urlunsplit(parts._replace(path="/" + name))

    def drop_database(self, dsn: str) -> None:
        name = urlsplit(dsn).path.lstrip("/")
        if self.cluster is not None:
            self.cluster.drop_database(name)
        else:
            asyncio.run(_admin(self.fixed_dsn or "", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def _admin(dsn: str, sql: str) -> None:
    import asyncpg
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _redacted(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return dsn
