"""A node on a shared database: its name, `mta check-config`, the CLI and sendmail.

Real PostgreSQL (a private cluster, tests/support/postgres.py); the daemons,
the CLI and sendmail run as real processes where the user would run them.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from mta.errors import StartupError
from mta.store.postgresql.node import NodeLock
from tests.support.daemon import mta_command, subprocess_env
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(60)


def mta(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mta_command(*args), capture_output=True, text=True, timeout=30, cwd=cwd,
                          env=subprocess_env(TZ="UTC"))


def node_config(tmp_path: Path, dsn: str, name: str = "node-a.lab.example", **extra: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    lines = [f"hostname: {name}",
             "listeners:", f"  - {{name: mta, address: '127.0.0.1:{free_port()}'}}",
             "metrics: {address: off}",
             f"queue: {{backend: postgresql, dsn: '{dsn}', path: '{tmp_path / name / 'queue.db'}'}}"]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_a_node_name_is_held_by_one_daemon_at_a_time(postgres_dsn: str) -> None:
    first = NodeLock(postgres_dsn, "node-a.lab.example")
    await first.acquire()
    second = NodeLock(postgres_dsn, "NODE-A.lab.example")   # host names ignore case
    with pytest.raises(StartupError) as refused:
        await second.acquire()
    assert str(refused.value) == ("queue: node name NODE-A.lab.example is in use by another mta on this "
                                  "database (give each node its own hostname)")
    other = NodeLock(postgres_dsn, "node-b.lab.example")
    await other.acquire()   # another name is another node
    await first.release()
    await second.acquire()  # free again once its holder has gone
    await second.release()
    await other.release()


async def test_a_node_name_is_freed_when_its_holder_dies(postgres_dsn: str) -> None:
    """The lock lives with its connection: a node killed (its connection gone) frees its name."""
    import asyncpg

    first = NodeLock(postgres_dsn, "node-a.lab.example", retry=60.0)
    await first.acquire()
    admin = await asyncpg.connect(postgres_dsn)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            "mta node node-a.lab.example")
        assert killed == 1
    finally:
        await admin.close()
    second = NodeLock(postgres_dsn, "node-a.lab.example")
    for _ in range(50):   # the server ends the backend a moment after the signal
        try:
            await second.acquire()
            break
        except StartupError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the name stayed held after its connection was terminated")
    await second.release()
    await first.release()


def test_check_config_accepts_a_reachable_database(tmp_path: Path, postgres_dsn: str) -> None:
    config = node_config(tmp_path, postgres_dsn)
    result = mta("check-config", "--config", str(config))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"config: {config}: ok\n", "")


def test_check_config_warns_when_the_database_is_down(tmp_path: Path) -> None:
    """The file is right, the database may be down for now: a warning, exit 0."""
    port = free_port()   # nothing listens there
    dsn = f"postgresql://mta:secret@127.0.0.1:{port}/mta"
    config = node_config(tmp_path, dsn)
    result = mta("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"config: {config}: ok\n"
    [warning] = result.stderr.splitlines()
    assert warning.startswith(f"warning: queue.dsn: postgresql://mta:***@127.0.0.1:{port}/mta: ")
    assert "secret" not in result.stderr


def test_serve_says_in_one_line_that_the_database_is_unreachable(tmp_path: Path) -> None:
    port = free_port()
    config = node_config(tmp_path, f"postgresql://mta@127.0.0.1:{port}/mta")
    result = mta("serve", "--config", str(config))
    assert result.returncode == 1
    *logged, line = result.stderr.splitlines()
    assert line == (f"mta: queue: cannot open postgresql://mta@127.0.0.1:{port}/mta: "
                    "PostgreSQL: [Errno 111] Connection refused")
    assert all(" mta/master[" in entry for entry in logged), logged   # log lines, no traceback


def test_queue_repair_is_only_for_sqlite(tmp_path: Path, postgres_dsn: str) -> None:
    result = mta("queue", "repair", "--config", str(node_config(tmp_path, postgres_dsn)))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("mta: queue repair: only for a SQLite queue file (the database server keeps its "
                             "own files sound)\n")


async def test_queue_check_on_the_database(tmp_path: Path, postgres_dsn: str) -> None:
    import asyncpg

    config = node_config(tmp_path, postgres_dsn)
    empty = mta("queue", "check", "--config", str(config))   # makes the schema, finds nothing wrong
    assert (empty.returncode, empty.stdout, empty.stderr) == (0, f"queue: {redacted(postgres_dsn)}: ok\n", "")
    conn = await asyncpg.connect(postgres_dsn)
    try:   # a message without its body: what a restore with the foreign keys off can leave
        await conn.execute("INSERT INTO messages (id, sender, arrival, size) VALUES ('B0DY1E55', '', 0, 10)")
        await conn.execute("INSERT INTO recipients (message_id, rcpt_no, address, state)"
                           " VALUES ('B0DY1E55', 0, 'x@example.test', 'queued')")
    finally:
        await conn.close()
    broken = mta("queue", "check", "--config", str(config))
    assert (broken.returncode, broken.stdout) == (2, "message B0DY1E55: no body\n")
    assert broken.stderr == (f"queue: {redacted(postgres_dsn)} has rows that break mta's rules: "
                             "message B0DY1E55: no body\n")


def redacted(dsn: str) -> str:
    from mta.config_values import redacted_dsn
    return redacted_dsn(dsn)
