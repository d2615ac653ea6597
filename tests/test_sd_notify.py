"""sd_notify: exact datagrams on a real AF_UNIX socket, the watchdog, and the real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta.daemon.sd_notify import Notifier
from tests.support.daemon import start_daemon
from tests.support.ports import free_port

MAX_SUN_PATH = 100  # sockaddr_un.sun_path is 108 bytes; stay clear of it


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a short directory when tmp_path is too long for a socket path."""
    if len(str(tmp_path / "notify.sock")) < MAX_SUN_PATH:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="mta-n"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def notify_socket(sock_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket playing the service manager, and its $NOTIFY_SOCKET value."""
    path = sock_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, str(path)
    finally:
        sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"mta-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def nothing_pending(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


# --------------------------------------------------------------------------- the datagrams

def test_exact_datagrams(notify_socket):
    sock, address = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert n.enabled

    assert n.ready() is True
    assert recv(sock) == "READY=1"
    assert n.ready("accepting mail on 127.0.0.1:25") is True
    assert recv(sock) == "READY=1\nSTATUS=accepting mail on 127.0.0.1:25"
    assert n.stopping() is True
    assert recv(sock) == "STOPPING=1"
    assert n.status("3 queued") is True
    assert recv(sock) == "STATUS=3 queued"
    assert n.watchdog() is True
    assert recv(sock) == "WATCHDOG=1"
    assert nothing_pending(sock)


def test_reloading_carries_clock_monotonic_usec(notify_socket):
    sock, address = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", recv(sock))
    assert m, "want exactly RELOADING=1 and MONOTONIC_USEC="
    assert before <= int(m.group(1)) <= after


def test_status_is_one_line(notify_socket):
    """A newline in the text must not smuggle in another assignment (e.g. READY=1)."""
    sock, address = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": address})
    n.status("line one\nREADY=1")
    assert recv(sock) == "STATUS=line one READY=1"
    n.ready("a\r\nb")
    assert recv(sock) == "READY=1\nSTATUS=a b"


def test_abstract_socket(abstract_socket):
    sock, address = abstract_socket
    assert address.startswith("@")
    n = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert n.ready("up") is True
    assert recv(sock) == "READY=1\nSTATUS=up"
    assert n.stopping() is True
    assert recv(sock) == "STOPPING=1"


def test_sender_is_this_process(notify_socket):
    """systemd's NotifyAccess=main accepts only the main PID; check the kernel's credentials."""
    sock, address = notify_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    Notifier.from_env({"NOTIFY_SOCKET": address}).ready()
    data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    assert data == b"READY=1"
    creds = [d for level, kind, d in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert creds and int.from_bytes(creds[0][:4], "little") == os.getpid()


def test_manager_coming_and_going(sock_dir):
    path = sock_dir / "notify.sock"
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    assert n.ready() is False  # nobody listening yet: no exception, just False
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        assert n.status("one") is True
        assert n.status("two") is True
        assert [recv(sock), recv(sock)] == ["STATUS=one", "STATUS=two"]
    path.unlink()
    assert n.watchdog() is False


# --------------------------------------------------------------------------- no-op

def test_no_notify_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for n in (Notifier.from_env(), Notifier.from_env({}), Notifier.from_env({"NOTIFY_SOCKET": ""}),
              Notifier()):
        assert not n.enabled
        assert n.ready("x") is False
        assert n.reloading() is False
        assert n.stopping() is False
        assert n.status("x") is False
        assert n.watchdog() is False


@pytest.mark.parametrize("value", ["relative/path.sock", "vsock:2:1234x", "\0oops"])
def test_unusable_notify_socket_is_a_no_op(value):
    n = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert not n.enabled
    assert n.ready() is False


def test_send_errors_never_raise(tmp_path):
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("")
    for address in (str(tmp_path / "missing.sock"), str(not_a_socket), "@mta-nobody-listens-here",
                    "/" + "x" * 200):
        n = Notifier.from_env({"NOTIFY_SOCKET": address})
        assert n.enabled
        assert n.ready("x") is False
        assert n.reloading() is False
        assert n.stopping() is False
        assert n.watchdog() is False


# --------------------------------------------------------------------------- watchdog

@pytest.mark.parametrize("env, interval", [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "1000000"}, 0.5),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # someone else's
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "thirty"}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_PID": str(os.getpid())}, None),
    ({}, None),
])
def test_watchdog_interval(env, interval):
    n = Notifier.from_env({"NOTIFY_SOCKET": "/run/nowhere.sock", **env})
    assert n.watchdog_interval() == interval


async def test_run_watchdog_pings_at_half_the_interval(notify_socket):
    sock, address = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    assert n.watchdog_interval() == 0.1
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(n.run_watchdog())
    try:
        start = time.monotonic()
        got = [await loop.run_in_executor(None, recv, sock) for _ in range(4)]
        elapsed = time.monotonic() - start
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert got == ["WATCHDOG=1"] * 4
    assert 0.25 <= elapsed < 2.0  # the first ping at once, then one every 0.1 s


async def test_run_watchdog_skips_pings_while_unhealthy(notify_socket):
    sock, address = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})
    healthy = False

    def check() -> bool:
        if healthy is None:
            raise RuntimeError("broken check")
        return healthy

    task = asyncio.create_task(n.run_watchdog(check))
    try:
        await asyncio.sleep(0.2)
        assert nothing_pending(sock)
        healthy = None  # a raising check is unhealthy too, and does not end the task
        await asyncio.sleep(0.15)
        assert nothing_pending(sock) and not task.done()
        healthy = True
        assert await asyncio.get_running_loop().run_in_executor(None, recv, sock) == "WATCHDOG=1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("env", [
    {},                                                          # no manager at all
    {"NOTIFY_SOCKET": "/run/nowhere.sock"},                      # no watchdog configured
    {"WATCHDOG_USEC": "100000"},                                 # watchdog but nowhere to send
    {"NOTIFY_SOCKET": "/run/nowhere.sock", "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"},
])
async def test_run_watchdog_returns_at_once_when_off(env):
    await asyncio.wait_for(Notifier.from_env(env).run_watchdog(), 1)


# --------------------------------------------------------------------------- the real daemon

def _next_datagram(sock: socket.socket, proc: subprocess.Popen[bytes], want: str,
                   timeout: float = 15.0) -> list[str]:
    """Datagrams up to and including the first carrying ``want`` as one of its lines."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(0.1)
        try:
            msg = recv(sock)
        except TimeoutError:
            if proc.poll() is not None and want != "STOPPING=1":
                raise AssertionError(f"daemon exited ({proc.returncode}) before {want}; got {seen}") from None
            continue
        seen.append(msg)
        if want in msg.split("\n"):
            return seen
    raise AssertionError(f"no {want} within {timeout}s; got {seen}")


def _smtp_greeting(port: int) -> bytes:
    """Connect once (no retries) and read the greeting."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        return conn.recv(512)


@pytest.fixture
def daemon(write_config, notify_socket, tmp_path):
    """`mta serve` as a subprocess with $NOTIFY_SOCKET on the test's socket."""
    sock, address = notify_socket
    port = free_port()
    config_path = write_config({
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{port}", "mode": "relay"}],
        "queue": {"path": str(tmp_path / "queue.db")},
        "metrics": {"address": None},
        "delivery": {"smarthost": f"127.0.0.1:{free_port()}"},  # nobody there: mail stays queued
    })
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> subprocess.Popen[bytes]:
        proc = start_daemon(config_path, tmp_path / "mta.log", NOTIFY_SOCKET=address, **env)
        procs.append(proc)
        return proc

    yield start, sock, port
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(60)
def test_daemon_ready_after_listening_and_stopping_on_sigterm(daemon, tmp_path):
    start, sock, port = daemon
    proc = start()
    _next_datagram(sock, proc, "READY=1")
    # READY=1 means the port accepts connections now: a single connect, no retrying.
    assert _smtp_greeting(port).startswith(b"220 ")
    assert (tmp_path / "queue.db").exists()

    proc.send_signal(signal.SIGTERM)
    _next_datagram(sock, proc, "STOPPING=1")
    assert proc.wait(30) == 0
    assert "READY=1" not in "\n".join(_drain(sock))  # nothing claims readiness after STOPPING=1


@pytest.mark.timeout(60)
def test_daemon_sighup_reloading_then_ready(daemon):
    start, sock, port = daemon
    proc = start()
    _next_datagram(sock, proc, "READY=1")

    proc.send_signal(signal.SIGHUP)
    seen = _next_datagram(sock, proc, "RELOADING=1")
    lines = seen[-1].split("\n")
    usec = [int(line.split("=", 1)[1]) for line in lines if line.startswith("MONOTONIC_USEC=")]
    # Same clock, same boot: the daemon's CLOCK_MONOTONIC stamp is in our past.
    assert len(usec) == 1 and 0 < usec[0] <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    _next_datagram(sock, proc, "READY=1")
    assert _smtp_greeting(port).startswith(b"220 ")

    proc.send_signal(signal.SIGTERM)
    _next_datagram(sock, proc, "STOPPING=1")
    assert proc.wait(30) == 0


@pytest.mark.timeout(60)
def test_daemon_pings_the_watchdog(daemon):
    start, sock, port = daemon
    proc = start(WATCHDOG_USEC="400000")  # pings every 0.2 s; no WATCHDOG_PID: any pid is ours
    _next_datagram(sock, proc, "READY=1")
    t0 = time.monotonic()
    for _ in range(3):
        _next_datagram(sock, proc, "WATCHDOG=1", timeout=5)
    assert time.monotonic() - t0 < 5
    proc.send_signal(signal.SIGTERM)
    _next_datagram(sock, proc, "STOPPING=1")
    assert proc.wait(30) == 0


def _drain(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(recv(sock))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(5)
