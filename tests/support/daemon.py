"""The real daemon as a subprocess: `mta ...` command lines and their environment,
`mta serve` started with its output in a log file, waiting until it listens, and
the Daemon class that keeps the process, its config and its log together.

Everything async here polls without blocking the event loop: recording peers
run on the test's loop and must keep answering while the daemon works.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.support.waiting import wait_until_sync
from tests.support.wire import Wire

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]


def mta_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mta", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test's environment for an `mta` child: this checkout first on PYTHONPATH,
    no MTA_CONFIG from the caller's shell."""
    env = dict(os.environ)
    env.pop("MTA_CONFIG", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def start_daemon(config_path: Path | str, log_path: Path | str, **env: str) -> subprocess.Popen[bytes]:
    """`mta serve --config config_path`, stdout and stderr appended to ``log_path``;
    ``env`` adds to subprocess_env()."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(mta_command("serve", "--config", str(config_path)), stdout=log,
                                stderr=subprocess.STDOUT, env=subprocess_env(**env))


def _exited(proc: subprocess.Popen[bytes] | asyncio.subprocess.Process) -> bool:
    if isinstance(proc, subprocess.Popen):
        return proc.poll() is not None
    return proc.returncode is not None


async def wait_listening(port: int, proc: subprocess.Popen[bytes] | asyncio.subprocess.Process,  # noqa: ASYNC109
                         timeout: float = 15.0, log_tail: Callable[[], str] | None = None) -> None:
    """Until 127.0.0.1:port accepts an SMTP connection (greeting read); AssertionError
    if the process exits first (with ``log_tail()`` when given) or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _exited(proc):
            raise AssertionError("daemon exited during start-up" + (f":\n{log_tail()}" if log_tail else ""))
        try:
            w = await Wire.connect("127.0.0.1", port)
        except (OSError, ConnectionError, TimeoutError):
            await asyncio.sleep(0.05)
            continue
        await w.close()
        return
    raise AssertionError("daemon did not start listening")


async def start_serving(argv: list[str], log_path: Path, smtp_port: int, *, cwd: Path | None = None,
                        env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """Run ``argv`` (a daemon, possibly behind a wrapper such as unshare) as an asyncio child,
    its output appended to ``log_path``, and wait until it answers on ``smtp_port``."""
    with open(log_path, "ab") as log:   # the child keeps its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, stdout=log, stderr=log, env=env)
    await wait_listening(smtp_port, proc)
    return proc


async def stop_all(procs: list[asyncio.subprocess.Process], grace: float = 20.0) -> None:
    """SIGTERM each child still running; kill one that does not stop within ``grace``
    (unshare(1) ignores SIGTERM; killing it kills the daemon with --kill-child, and the
    daemon's delivery child dies with it through PR_SET_PDEATHSIG)."""
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class Daemon:
    """`mta serve --config FILE` as a child process, its output appended to one log file."""

    def __init__(self, tmp_path: Path, doc: dict[str, Any]):
        self.doc = doc
        self.config_path = tmp_path / "mta.yaml"
        self.config_path.write_text(yaml.safe_dump(doc))
        self.log_path = tmp_path / "mta.log"
        self.port = int(doc["listeners"][0]["address"].rsplit(":", 1)[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def queue_path(self) -> str:
        return str(self.doc["queue"]["path"])

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {self.starts} ----\n".encode())
        self.proc = start_daemon(self.config_path, self.log_path)
        self.starts += 1

    async def started(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        self.start()
        await self.wait_listening(timeout)

    async def wait_listening(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        assert self.proc is not None
        await wait_listening(self.port, self.proc, timeout, self.log_tail)

    async def wait_exit(self, timeout: float) -> int:  # noqa: ASYNC109
        """The exit status, polled without blocking the event loop (the peers run on it)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while (rc := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon still running after {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.02)
        return rc

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.wait_exit(10)

    async def terminate(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait_for(self, what: str, check: Callable[[], T], timeout: float = 15.0) -> T:
        """Blocking: until ``check()`` is true (returned), else AssertionError with the log's tail."""
        return wait_until_sync(check, timeout, lambda: f"{what}\n{self.log_tail()}", interval=0.05)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def children(pid: int, marker: bytes = b"deliver") -> list[int]:
    """Pids of ``pid``'s children whose command line has ``marker`` (the delivery process)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and marker in cmd:
            found.append(int(entry))
    return found


def metric(port: int, name: str) -> float | None:
    """The value of ``name`` on the daemon's /metrics, summed over its labels (None when it
    is not there); ``name`` may carry a label set, e.g. 'mta_messages_received_total{listener="mta"}'."""
    total = None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


async def send_messages(port: int, n: int, start: int = 0) -> None:
    """Messages number start .. start+n-1 in one session, to r<i>@example.test; each must get 250."""
    async with await Wire.connect("127.0.0.1", port) as w:
        await w.ehlo()
        for i in range(start, start + n):
            reply = await w.mail("lab@lab.test", [f"r{i}@example.test"], f"Subject: {i}\r\n\r\nx\r\n".encode(),
                                 ehlo=False)
            assert reply.startswith("250 2.0.0"), reply
