"""A private PostgreSQL cluster for the tests: never the system one.

Debian's ``postgresql`` package (installed by .ci/run) gives the server binaries in
/usr/lib/postgresql/<version>/bin. A cluster is made with ``initdb`` in a temporary
directory and started with ``pg_ctl`` on a free port of 127.0.0.1, its socket in
that directory too, trust authentication for loopback only. PostgreSQL refuses to
run as root (CI runs as root), so the directory belongs to the ``postgres`` user
and the server runs as that user (``runuser``). ``fsync`` and ``synchronous_commit``
stay on: the tests check that enqueue returns only after a durable commit.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.ports import free_port

_DATABASES = itertools.count(1)


def server_bindir() -> Path | None:
    """Where Debian's PostgreSQL server binaries are (the newest version), or None."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                    check=True).stdout.strip())
        if (found / "pg_ctl").exists() and (found / "initdb").exists() and (found / "postgres").exists():
            return found
    return None


def unavailable_reason() -> str | None:
    """Why no private cluster can be started here (None: it can)."""
    if server_bindir() is None:
        return "PostgreSQL is not installed (Debian package postgresql: .ci/run installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root without runuser(1) to start PostgreSQL as postgres"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[test]')"
    return None


class Cluster:
    """One private cluster: start(), dsn(), create_database(), stop(), remove()."""

    def __init__(self) -> None:
        bindir = server_bindir()
        assert bindir is not None, unavailable_reason()
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="mta-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = 0
        self.as_root = os.geteuid() == 0
        if self.as_root:
            # The postgres user must own the directory and reach it (mkdtemp makes it 0700).
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        # Loopback only, trust: the cluster lives as long as the test session and holds test data.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n")

    def _run(self, tool: str, *args: str) -> str:
        command = [str(self.bindir / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
                               f"\n{self.log.read_text() if self.log.exists() else ''}")
        return done.stdout

    def _options(self) -> str:
        return (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
                " -c synchronous_commit=on -c fsync=on -c max_connections=200")

    def start(self) -> None:
        """Start (again) on a free port; the same port after a stop, as a restarted server."""
        self.port = self.port or free_port("127.0.0.1")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o",
                  self._options(), "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart`: stop (``mode``: fast ends every session, immediate is a crash)
        and start again on the same port; returns once it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w", "-t", "30",
                  "-o", self._options(), "restart")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` as the superuser (over TCP: no root-owned files involved)."""
        done = subprocess.run([str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
                               "-c", sql], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh empty database; its name."""
        name = f"t{os.getpid()}_{next(_DATABASES)}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def remove(self) -> None:
        """Stop the server if it runs, and remove its directory."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
