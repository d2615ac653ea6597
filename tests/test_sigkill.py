"""The real `mta serve` process: SIGKILL part-way loses no message that got a 250."""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import sqlite3

import pytest

from tests.support.daemon import start_daemon, wait_listening
from tests.support.ports import free_port
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(120)


async def send_one(port, seq):
    """One message with a unique header; the queue id on 250, None if refused or cut off."""
    try:
        w = await Wire.connect("127.0.0.1", port)
    except (TimeoutError, OSError, ConnectionError):
        return None
    try:
        body = f"X-Seq: {seq}\r\nSubject: crash test {seq}\r\n\r\nbody {seq}\r\n".encode()
        reply = await w.mail("lab@lab.test", [f"r{seq}@example.org"], body)
        m = re.match(r"250 2\.0\.0 Ok: queued as (\w+)$", reply)
        return m.group(1) if m else None
    except (TimeoutError, OSError, ConnectionError, AssertionError):
        return None
    finally:
        await w.close()


async def test_sigkill_loses_nothing_that_got_250(write_config, tmp_path):
    port = free_port()
    queue = tmp_path / "queue.db"
    config_path = write_config({
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{port}", "mode": "relay"}],
        "queue": {"path": str(queue)},
        "metrics": {"address": None},
        # Delivery runs, to a port where nobody listens: mail is deferred and stays queued.
        "delivery": {"smarthost": f"127.0.0.1:{free_port()}"},
        "limits": {"max_connections_per_ip": 100},
    })
    log_path = tmp_path / "mta.log"
    proc = start_daemon(config_path, log_path)
    await wait_listening(port, proc)

    total, clients = 500, 20
    next_seq = iter(range(total))
    accepted: dict[int, str] = {}
    attempted_unknown: set[int] = set()
    kill_at = 150
    killed = asyncio.Event()
    restarted = asyncio.Event()

    async def client():
        for seq in next_seq:
            if not killed.is_set() and len(accepted) >= kill_at:
                killed.set()
            queue_id = await send_one(port, seq)
            if queue_id:
                accepted[seq] = queue_id
            else:
                attempted_unknown.add(seq)
                await restarted.wait()

    async def killer():
        nonlocal proc
        await killed.wait()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        await asyncio.sleep(0.3)
        proc = start_daemon(config_path, log_path)
        await wait_listening(port, proc)
        restarted.set()

    await asyncio.gather(killer(), *(client() for _ in range(clients)))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0

    with sqlite3.connect(queue) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = db.execute("SELECT message_id, data FROM bodies").fetchall()
    seen = collections.Counter()
    ids = {}
    for queue_id, data in stored:
        seq = int(re.search(rb"\r\nX-Seq: (\d+)\r\n", data).group(1))
        seen[seq] += 1
        ids[seq] = queue_id
    # Every message that got a 250 is there exactly once, under the id the 250 named.
    assert all(seen[seq] == 1 and ids[seq] == queue_id for seq, queue_id in accepted.items())
    # Messages cut off by the kill may or may not have been committed, but never twice.
    assert all(seen[seq] <= 1 for seq in attempted_unknown)
    assert set(seen) <= set(accepted) | attempted_unknown
    assert len(accepted) + len(attempted_unknown) == total
    assert kill_at <= len(accepted) < total and len(accepted) >= 450
    assert len(attempted_unknown) <= clients
