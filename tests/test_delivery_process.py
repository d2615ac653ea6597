"""`mta serve` runs delivery in a child process (mta/daemon/delivery_process.py): metrics cross over,
the child is restarted if it dies, dies with the main process, and can be turned off."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import yaml

from tests.support.daemon import (
    children,
    metric,
    mta_command,
    send_messages,
    start_serving,
    stop_all,
    subprocess_env,
)
from tests.support.ports import free_port
from tests.support.smtp_peer import RecordingPeer
from tests.support.waiting import wait_until
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(60)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
async def daemon(tmp_path):
    started = []

    async def start(peer_port, *, wrapper=(), **env):
        smtp_port, metrics_port = free_port(), free_port()
        config = {
            "hostname": "relay.lab.test",
            "listeners": [{"name": "mta", "address": f"127.0.0.1:{smtp_port}", "mode": "relay"}],
            "queue": {"path": str(tmp_path / "queue.db")},
            "metrics": {"address": f"127.0.0.1:{metrics_port}"},
            "delivery": {"routes": {"example.test": f"127.0.0.2:{peer_port}"},
                         "connection_cache": {"idle_timeout": "5s"}},
        }
        path = tmp_path / "mta.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = [*wrapper, *mta_command("serve", "--config", str(path))]
        proc = await start_serving(argv, tmp_path / "mta.log", smtp_port, env=subprocess_env(**env))
        started.append(proc)
        return proc, smtp_port, metrics_port

    yield start
    await stop_all(started)


async def stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_delivery_in_a_child_process_with_metrics_forwarded(daemon, tmp_path):
    peer_port = free_port("127.0.0.2")
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        proc, smtp_port, metrics_port = await daemon(peer_port, MTA_DELIVERY_PROCESS="yes")
        [child] = children(proc.pid)
        await send_messages(smtp_port, 5)
        await peer.wait_for_messages(5, timeout=10)
        await wait_until(lambda: metric(metrics_port, "mta_recipients_delivered_total") == 5)
        assert metric(metrics_port, 'mta_messages_received_total{listener="mta"}') == 5
        # Counted by the child's connection cache, served by the main process.
        opened = len(peer.connections)
        assert metric(metrics_port, "mta_smtp_connections_opened_total") == opened
        assert metric(metrics_port, "mta_smtp_connections_reused_total") == 5 - opened
        await stop(proc)
        # The child QUIT its cached session before the daemon exited.
        assert all(c.transcript[-1] == "QUIT" for c in peer.connections)
        assert not alive(child)
    log = (tmp_path / "mta.log").read_text()
    assert f"mta/qmgr[{child}]: " in log and "delivery process stopped" in log


async def test_a_dead_child_is_started_again_and_mail_still_flows(daemon, tmp_path):
    peer_port = free_port("127.0.0.2")
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        proc, smtp_port, metrics_port = await daemon(peer_port, MTA_DELIVERY_PROCESS="yes")
        [first] = children(proc.pid)
        await send_messages(smtp_port, 2)
        await wait_until(lambda: metric(metrics_port, "mta_recipients_delivered_total") == 2)
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: children(proc.pid) not in ([], [first]))
        await send_messages(smtp_port, 2, start=2)
        await peer.wait_for_messages(4, timeout=10)
        # Counters stay monotonic across the restart (the new child's pool starts at 0).
        await wait_until(lambda: metric(metrics_port, "mta_recipients_delivered_total") == 4)
        assert metric(metrics_port, "mta_smtp_connections_opened_total") == len(peer.connections)
        await stop(proc)
    assert sorted(m.rcpts[0] for m in peer.messages) == [f"r{i}@example.test" for i in range(4)]
    log = (tmp_path / "mta.log").read_text()
    assert (f"delivery process (pid {first}) was killed by signal 9 (SIGKILL); "
            "starting it again in 1s (1 restart)") in log


async def test_the_child_dies_with_the_main_process(daemon):
    peer_port = free_port("127.0.0.2")
    proc, _, _ = await daemon(peer_port, MTA_DELIVERY_PROCESS="yes")
    [child] = children(proc.pid)
    proc.kill()
    await proc.wait()
    await wait_until(lambda: not alive(child), timeout=5)


@pytest.mark.parametrize("mode", ["yes", "no"])
async def test_sighup_applies_new_routes_to_delivery(daemon, tmp_path, mode):
    """A changed delivery.routes takes effect on reload, in the child as in one process."""
    first_port, second_port = free_port("127.0.0.2"), free_port("127.0.0.3")
    async with RecordingPeer("127.0.0.2", first_port) as first, RecordingPeer("127.0.0.3", second_port) as second:
        proc, smtp_port, _ = await daemon(first_port, MTA_DELIVERY_PROCESS=mode)
        await send_messages(smtp_port, 1)
        await first.wait_for_messages(1, timeout=10)
        path = tmp_path / "mta.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["delivery"]["routes"] = {"example.test": f"127.0.0.3:{second_port}"}
        path.write_text(yaml.safe_dump(doc))
        proc.send_signal(signal.SIGHUP)
        log = tmp_path / "mta.log"
        want = "delivery: reload: configuration" if mode == "yes" else "reload: configuration re-read"
        await wait_until(lambda: want in log.read_text())
        await send_messages(smtp_port, 1, start=1)
        await second.wait_for_messages(1, timeout=10)
        await stop(proc)
    assert [m.rcpts for m in first.messages] == [["r0@example.test"]]
    assert [m.rcpts for m in second.messages] == [["r1@example.test"]]


@pytest.mark.parametrize("mode", ["yes", "no"])
async def test_sighup_keeps_the_hostname_for_bounces(daemon, tmp_path, mode):
    """hostname needs a restart (App._reload says so); the delivery child used to take
    the new one at once and sign its bounces with it."""
    peer_port = free_port("127.0.0.2")
    refuse = lambda verb, arg, conn: "550 5.1.1 No such user" if "nobody@" in arg else None  # noqa: E731
    async with RecordingPeer("127.0.0.2", peer_port, replies=refuse) as peer:
        proc, smtp_port, _ = await daemon(peer_port, MTA_DELIVERY_PROCESS=mode)
        path = tmp_path / "mta.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["hostname"] = "renamed.lab.test"
        path.write_text(yaml.safe_dump(doc))
        proc.send_signal(signal.SIGHUP)   # at once: the child may still be starting
        log = tmp_path / "mta.log"
        want = "delivery: reload: configuration" if mode == "yes" else "reload: configuration re-read"
        await wait_until(lambda: want in log.read_text())
        assert "reload: changes to hostname take effect after a restart" in log.read_text()
        async with await Wire.connect("127.0.0.1", smtp_port) as w:
            await w.ehlo()
            assert (await w.mail("lab@example.test", ["nobody@example.test"], b"Subject: x\r\n\r\nx\r\n",
                                 ehlo=False)).startswith("250 2.0.0")
        [dsn] = await peer.wait_for_messages(1, timeout=10)   # the bounce, to lab@example.test
        await stop(proc)
    assert dsn.rcpts == ["lab@example.test"]
    assert b"Reporting-MTA: dns; relay.lab.test\r\n" in dsn.data
    assert b"renamed.lab.test" not in dsn.data
    assert "exited with status" not in log.read_text()


def _can_unshare_pid():
    import shutil
    import subprocess
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-pf", "--mount-proc", "--kill-child", "true"], capture_output=True,
                          check=False)
    return done.returncode == 0


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs unshare(1) and root for a PID namespace")
async def test_delivery_works_when_the_daemon_is_pid_1(daemon, tmp_path):
    """In a container `mta serve` is often pid 1: the child must not take that for
    "my parent died" (its parent IS pid 1)."""
    peer_port = free_port("127.0.0.2")
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        proc, smtp_port, _ = await daemon(peer_port, wrapper=("unshare", "-pf", "--mount-proc", "--kill-child"),
                                          MTA_DELIVERY_PROCESS="yes")
        await send_messages(smtp_port, 2)
        await peer.wait_for_messages(2, timeout=10)
        await asyncio.sleep(1.5)   # a child that took pid 1 for a dead parent would have exited by now
        [inner] = children(proc.pid, b"serve")   # the daemon, as seen from outside its namespace
        os.kill(inner, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)   # unshare exits with it
    log = (tmp_path / "mta.log").read_text()
    assert "mta/master[1]: mta ready" in log
    assert log.count("delivery process started") == 1 and "exited with status" not in log


async def test_one_process_when_turned_off(daemon):
    peer_port = free_port("127.0.0.2")
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        proc, smtp_port, _ = await daemon(peer_port, MTA_DELIVERY_PROCESS="no")
        assert children(proc.pid) == []
        await send_messages(smtp_port, 1)
        await peer.wait_for_messages(1, timeout=10)
        await stop(proc)
