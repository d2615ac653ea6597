"""The delivery child (mta/daemon/delivery_process.py) of a real `mta serve`: it runs the daemon's own
package whatever lies in the working directory, and a child that keeps dying is
restarted with backoff and shows on /healthz, in the metrics and in one log line
per exit (issue 12, part 1)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.daemon import (
    ROOT,
    children,
    mta_command,
    send_messages,
    start_serving,
    stop_all,
    subprocess_env,
)
from tests.support.daemon import metric as _metric
from tests.support.ports import free_port
from tests.support.smtp_peer import RecordingPeer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

UP = "mta_delivery_process_up"
RESTARTS = "mta_delivery_process_restarts_total"
EXIT_REASON = re.compile(r"^delivery_process: delivery process \(pid (\d+)\) exited with status 2; "
                         r"starting it again in (\d+)s \((\d+) restarts?\)\n$")


def metric(port: int, name: str) -> float | None:
    """The sample's value; None while the metrics listener is not up yet (it starts last)."""
    try:
        return _metric(port, name)
    except urllib.error.URLError:
        return None


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def daemon_doc(tmp_path: Path, peer_port: int) -> tuple[dict, int, int]:
    smtp_port, metrics_port = free_port(), free_port()
    doc = {
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{smtp_port}", "mode": "relay"}],
        "queue": {"path": str(tmp_path / "queue.db")},
        "metrics": {"address": f"127.0.0.1:{metrics_port}"},
        "delivery": {"routes": {"example.test": f"127.0.0.2:{peer_port}"},
                     "connection_cache": {"idle_timeout": "5s"}},
    }
    return doc, smtp_port, metrics_port


@pytest.fixture
async def serve(tmp_path):
    """Start `mta serve` as given (argv, working directory, environment); SIGTERM at the end."""
    started = []

    async def start(argv, *, cwd, env, smtp_port):
        proc = await start_serving(argv, tmp_path / "mta.log", smtp_port, cwd=cwd, env=env)
        started.append(proc)
        return proc

    yield start
    await stop_all(started)


def old_mta(where: Path) -> Path:
    """An older copy of the package, as in another checkout: it has no `deliver` command."""
    pkg = where / "mta"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "0.0.1"\n')
    (pkg / "__main__.py").write_text(
        "import sys\n"
        "print(f\"mta 0.0.1: invalid command {sys.argv[1]!r}\", file=sys.stderr)\n"
        "raise SystemExit(2)\n")
    return where


def console_script(tmp_path: Path) -> Path:
    """What `pip install` writes as bin/mta (an entry point; here for the package under test)."""
    script = tmp_path / "bin" / "mta"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom mta.entry import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("how", ["console-script", "python-m-from-checkout"])
async def test_a_package_in_the_working_directory_does_not_shadow_the_daemons(serve, tmp_path, how):
    """console-script: `cd dir-with-an-old-mta && mta serve`, the installed package on the
    path after the script's directory (PYTHONPATH stands for site-packages here). The
    child started as `python -m mta` imported the old copy from the working directory,
    died and was restarted every second while /healthz said ok.

    python-m-from-checkout: `cd checkout && python -m mta serve` with an old copy
    installed (on PYTHONPATH): the main process runs the checkout, and so must its
    child (a child started with -P alone would import the installed copy)."""
    peer_port = free_port("127.0.0.2")
    doc, smtp_port, metrics_port = daemon_doc(tmp_path, peer_port)
    config = tmp_path / "mta.yaml"
    config.write_text(yaml.safe_dump(doc))
    env = subprocess_env(MTA_DELIVERY_PROCESS="yes")
    if how == "console-script":
        cwd = old_mta(tmp_path / "elsewhere")
        argv = [sys.executable, str(console_script(tmp_path)), "serve", "--config", str(config)]
    else:
        cwd = ROOT
        env["PYTHONPATH"] = str(old_mta(tmp_path / "site")) + os.pathsep + env["PYTHONPATH"]
        argv = mta_command("serve", "--config", str(config))
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        proc = await serve(argv, cwd=cwd, env=env, smtp_port=smtp_port)
        await send_messages(smtp_port, 2)
        messages = await peer.wait_for_messages(2, timeout=15)
        await wait_until(lambda: metric(metrics_port, UP) == 1, timeout=10)
        assert healthz(metrics_port) == (200, "ok\n")
        assert metric(metrics_port, RESTARTS) == 0
        [child] = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert sorted(m.rcpts[0] for m in messages) == ["r0@example.test", "r1@example.test"]
    log = (tmp_path / "mta.log").read_text()
    assert f"mta/qmgr[{child}]: " in log
    assert "invalid command" not in log and "exited" not in log and "killed" not in log


async def restart_times(metrics_port: int, count: int, timeout: float) -> list[float]:
    """The moments (monotonic) at which mta_delivery_process_restarts_total went up from 0,
    up to ``count``: started at once, beside the test's other checks."""
    times, seen = [], 0
    deadline = time.monotonic() + timeout
    while len(times) < count:
        assert time.monotonic() < deadline, f"restarts seen at {times}"
        now = metric(metrics_port, RESTARTS)
        if now != seen:
            assert now == seen + 1, (seen, now)   # polled every 0.1 s, restarts are seconds apart
            times.append(time.monotonic())
            seen = now
        await asyncio.sleep(0.1)
    return times


async def start_then_break_the_config(serve, tmp_path, peer_port):
    """A daemon whose config file then stops loading (a typo in an edit, no reload yet),
    and whose delivery child is then killed (as the OOM killer would): every new child
    reads the file at start, prints its one-line config error and exits 2, while the
    main process runs on with the configuration it started with."""
    doc, smtp_port, metrics_port = daemon_doc(tmp_path, peer_port)
    config = tmp_path / "mta.yaml"
    config.write_text(yaml.safe_dump(doc))
    proc = await serve(mta_command("serve", "--config", str(config)), cwd=tmp_path,
                       env=subprocess_env(MTA_DELIVERY_PROCESS="yes"), smtp_port=smtp_port)
    await wait_until(lambda: metric(metrics_port, UP) == 1, timeout=10)
    assert healthz(metrics_port) == (200, "ok\n")
    broken = yaml.safe_load(config.read_text())
    broken["delivery"]["retry"] = {"min_backoff": "5x"}
    config.write_text(yaml.safe_dump(broken))
    [child] = children(proc.pid)
    killed_at = time.monotonic()
    os.kill(child, signal.SIGKILL)
    return proc, config, doc, smtp_port, metrics_port, child, killed_at


async def test_a_child_that_keeps_dying_is_reported_and_restarted_with_backoff(serve, tmp_path):
    peer_port = free_port("127.0.0.2")
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        proc, config, doc, smtp_port, metrics_port, first, killed_at = await start_then_break_the_config(
            serve, tmp_path, peer_port)
        watch = asyncio.create_task(restart_times(metrics_port, 3, timeout=30))

        # The kill itself: down at once, the first restart after 1 s.
        await wait_until(lambda: healthz(metrics_port)[0] == 503, timeout=5)
        assert healthz(metrics_port) == (
            503, f"delivery_process: delivery process (pid {first}) was killed by signal 9 (SIGKILL); "
                 "starting it again in 1s (1 restart)\n")
        assert metric(metrics_port, UP) == 0
        assert metric(metrics_port, 'mta_health_status{component="delivery_process"}') == 0

        # Mail is still accepted and queued while no child runs.
        await send_messages(smtp_port, 1)

        # Each new child dies of the config: the pauses double (1, 2, 4 s) ...
        times = await watch
        gaps = [b - a for a, b in zip([killed_at, *times], times, strict=False)]   # one pair fewer
        assert gaps[0] >= 1 - 0.2 and gaps[1] >= 2 - 0.2 and gaps[2] >= 4 - 0.2, gaps
        # ... and /healthz names the last exit and the next pause.
        def reason():
            status, body = healthz(metrics_port)
            assert status == 503, body
            return EXIT_REASON.match(body)
        await wait_until(lambda: (m := reason()) is not None and m.group(3) == "4", timeout=10)
        m = reason()
        assert m.group(2) == "8"   # 1, 2, 4, then 8 s
        assert metric(metrics_port, UP) == 0
        assert metric(metrics_port, RESTARTS) == 3
        assert peer.messages == []

        # The cause removed: the next child comes up and delivers what waited.
        config.write_text(yaml.safe_dump(doc))
        await wait_until(lambda: metric(metrics_port, UP) == 1, timeout=20)
        assert healthz(metrics_port) == (200, "ok\n")
        assert metric(metrics_port, 'mta_health_status{component="delivery_process"}') == 1
        assert metric(metrics_port, RESTARTS) == 4
        [message] = await peer.wait_for_messages(1, timeout=10)
        assert message.rcpts == ["r0@example.test"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0

    log = (tmp_path / "mta.log").read_text()
    # One line per exit in the main process, the child's own one-line reason before it; no tracebacks.
    exits = re.findall(r"mta/health\[\d+\]: error: health: delivery_process: delivery process \(pid \d+\) "
                       r"(?:exited with status 2|was killed by signal 9 \(SIGKILL\)); "
                       r"starting it again in (\d+)s", log)
    assert exits == ["1", "2", "4", "8"]
    assert log.count('config: delivery.retry.min_backoff: "5x" is not a duration') == 3
    assert log.count("health: delivery_process: recovered") == 1
    assert "Traceback" not in log


async def test_sigterm_does_not_wait_for_the_pause_before_a_restart(serve, tmp_path):
    peer_port = free_port("127.0.0.2")
    proc, _, _, _, metrics_port, _, _ = await start_then_break_the_config(serve, tmp_path, peer_port)
    await wait_until(lambda: "starting it again in 8s" in healthz(metrics_port)[1], timeout=30)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 5) == 0   # not after the 8 s pause
    print(f"exited {time.monotonic() - sent:.2f}s after SIGTERM")
