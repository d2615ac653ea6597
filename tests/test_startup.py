"""Start-up, run as an operator would: real `mta serve` and `mta check-config` processes.

One daemon per queue (mta/store/sqlite/lock.py): a second `mta serve` on the same queue
is refused in one line while the first keeps delivering and serving; the queue
CLI works beside the daemon; a restart right after SIGKILL is not kept out by
the lock. Every problem that keeps the daemon from starting (mta/preflight.py)
is one line on stderr and exit status 2 from both `mta serve` and `mta
check-config`, and `mta serve` exits by itself, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from tests.support.daemon import Daemon, mta_command, subprocess_env
from tests.support.faults import daemon_doc, send_tagged, seq_counts, wait_drained
from tests.support.ports import free_port
from tests.support.smtp_peer import END_OF_DATA, RecordingPeer

RUN_TIMEOUT = 20   # a `mta serve` that should refuse to start but hangs fails the test


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mta_command(*args), capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          env=subprocess_env())


async def run_async(*args: str) -> tuple[int, str, str]:
    """As run(), leaving the event loop free for the peers the test runs on it."""
    proc = await asyncio.create_subprocess_exec(*mta_command(*args), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=subprocess_env())
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def processes_with(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (a config path is unique to a test)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def delivery_children(main_pid: int) -> list[int]:
    return processes_with(f"--parent-pid\0{main_pid}\0")


# --------------------------------------------------------------------------- one daemon per queue

@pytest.mark.timeout(90)
async def test_second_daemon_on_the_same_queue_is_refused_while_the_first_delivers(tmp_path):
    """Seen: a second `mta serve` (another config, the same queue.path) took the first
    one's in-flight recipient for crash debris and delivered it a second time."""
    queue = tmp_path / "queue.db"
    in_flight, release = asyncio.Event(), asyncio.Event()

    async def hold_first_message(verb: str, arg: str, conn: Any) -> str | None:
        if verb == END_OF_DATA and not release.is_set():
            in_flight.set()
            await release.wait()   # the delivery stays in flight (recipient 'active') meanwhile
        return None

    async with RecordingPeer("127.0.0.2", replies=hold_first_message) as peer:
        first_dir, second_dir = tmp_path / "first", tmp_path / "second"
        first_dir.mkdir()
        second_dir.mkdir()
        first = Daemon(first_dir, daemon_doc(first_dir, free_port(), queue=queue,
                                             smarthost=f"127.0.0.2:{peer.port}",
                                             timeouts={"command": "60s"}))
        second_doc = daemon_doc(second_dir, free_port(), queue=queue, smarthost="127.0.0.3:25")
        second_doc["hostname"] = "other.lab.test"
        second = Daemon(second_dir, second_doc)
        try:
            await first.started()
            assert (await send_tagged(first.port, 1)).outcome == "accepted"
            await asyncio.wait_for(in_flight.wait(), 15)

            status, out, err = await run_async("serve", "--config", str(second.config_path))
            assert (status, err, out) == (2, f"queue: {queue} is in use by mta pid {first.proc.pid}\n", "")
            assert processes_with(str(second.config_path)) == []

            # The queue CLI and check-config work beside the daemon: they take no lock.
            status, out, err = await run_async("queue", "list", "--config", str(first.config_path))
            assert (status, err) == (0, "")
            assert "r1@example.org [active]" in out
            status, out, err = await run_async("mailbox", "list", "--config", str(first.config_path))
            assert (status, out, err) == (0, "No mail in any mailbox\n", "")
            # The daemon's own ports are in use by it: not a fault while it serves this queue.
            status, out, err = await run_async("check-config", "--config", str(first.config_path))
            assert (status, out, err) == (0, f"config: {first.config_path}: ok\n", "")

            # The first daemon goes on: its delivery in flight completes once, new mail is
            # accepted and delivered.
            release.set()
            assert (await send_tagged(first.port, 2)).outcome == "accepted"
            await wait_drained(first, 20)
            assert seq_counts(peer.messages) == {1: 1, 2: 1}
            assert first.proc.poll() is None
            lock = Path(f"{queue}.lock")
            assert stat.S_IMODE(lock.stat().st_mode) == 0o600
            assert lock.read_text() == f"{first.proc.pid}\n"
            assert await first.terminate() == 0
        finally:
            release.set()
            first.ensure_dead()
            second.ensure_dead()


@pytest.mark.timeout(90)
async def test_restart_right_after_sigkill(tmp_path):
    """flock dies with its holders: the lock file left behind by a SIGKILLed daemon
    does not keep the next one out, and no delivery child outlives the main process."""
    daemon = Daemon(tmp_path, daemon_doc(tmp_path, free_port()))
    try:
        await daemon.started()
        assert daemon.proc is not None
        killed = daemon.proc.pid
        deadline = time.monotonic() + 10
        while not delivery_children(killed) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await daemon.kill()
        # The child gets SIGKILL from the kernel as its parent dies (PR_SET_PDEATHSIG).
        deadline = time.monotonic() + 5
        while delivery_children(killed) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert delivery_children(killed) == []
        assert Path(daemon.queue_path + ".lock").read_text() == f"{killed}\n"   # stale, and harmless

        await daemon.started()
        assert (await send_tagged(daemon.port, 1)).outcome == "accepted"
        assert Path(daemon.queue_path + ".lock").read_text() == f"{daemon.proc.pid}\n"
        assert await daemon.terminate() == 0
    finally:
        daemon.ensure_dead()


# --------------------------------------------------------------------------- start-up errors

@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A certificate, its key, another certificate's key, a file that is no PEM at all."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert, other = ca.issue_cert("relay.lab.test"), ca.issue_cert("other.lab.test")
    files = {"cert": directory / "cert.pem", "key": directory / "key.pem",
             "other_key": directory / "other-key.pem", "junk": directory / "junk.pem"}
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    other.private_key_pem.write_to_path(str(files["other_key"]))
    files["junk"].write_text("not a certificate\n")
    return files


def base_doc(tmp_path: Path) -> dict[str, Any]:
    return {"hostname": "relay.lab.test",
            "listeners": [{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"}],
            "queue": {"path": str(tmp_path / "var" / "queue.db")},
            "metrics": {"address": None}}


def users_file(tmp_path: Path) -> str:
    path = tmp_path / "users"
    path.write_text("")
    return str(path)


def smtp_tls(tls: dict[str, Path], **change: str) -> Callable[[Path, dict[str, Any]], str]:
    def setup(tmp_path: Path, doc: dict[str, Any]) -> str:
        files = {"cert": str(tls["cert"]), "key": str(tls["key"]), **change}
        doc["listeners"][0]["tls"] = files
        return ""
    return setup


# Each case: (name, setup(tmp_path, doc) -> extra format values, expected line with {placeholders}).
def cases(tls: dict[str, Path]) -> dict[str, tuple[Callable[[Path, dict[str, Any]], Any], str]]:
    def missing_cert(tmp_path: Path, doc: dict[str, Any]) -> None:
        smtp_tls(tls, cert=str(tmp_path / "missing.pem"))(tmp_path, doc)

    def pop3_missing_key(tmp_path: Path, doc: dict[str, Any]) -> None:
        doc["listeners"].append({"name": "pop3", "address": f"127.0.0.1:{free_port()}", "mode": "pop3",
                                 "tls": {"cert": str(tls["cert"]), "key": str(tmp_path / "missing-key.pem"),
                                         "implicit": True}})
        doc["mailboxes"] = {"users_file": users_file(tmp_path)}

    def unreadable_key(tmp_path: Path, doc: dict[str, Any]) -> None:
        (tmp_path / "key-dir").mkdir()   # read() fails on it even for root
        smtp_tls(tls, key=str(tmp_path / "key-dir"))(tmp_path, doc)

    def queue_under_a_file(tmp_path: Path, doc: dict[str, Any]) -> None:
        (tmp_path / "plain-file").write_text("")
        doc["queue"]["path"] = str(tmp_path / "plain-file" / "spool" / "queue.db")

    def submission_without_users(tmp_path: Path, doc: dict[str, Any]) -> None:
        doc["listeners"][0]["mode"] = "submission"
        doc["auth"] = {"users_file": str(tmp_path / "no-users")}

    def pop3_without_users(tmp_path: Path, doc: dict[str, Any]) -> None:
        doc["listeners"].append({"name": "pop3", "address": f"127.0.0.1:{free_port()}", "mode": "pop3"})
        doc["mailboxes"] = {"users_file": str(tmp_path / "no-mailbox-users")}

    def two_listeners_one_address(tmp_path: Path, doc: dict[str, Any]) -> None:
        doc["listeners"].append({"name": "again", "address": doc["listeners"][0]["address"]})

    def wildcard_overlap(tmp_path: Path, doc: dict[str, Any]) -> None:
        port = doc["listeners"][0]["address"].rsplit(":", 1)[1]
        doc["listeners"].append({"name": "all", "address": f"0.0.0.0:{port}"})

    def metrics_on_a_listener(tmp_path: Path, doc: dict[str, Any]) -> None:
        doc["metrics"] = {"address": doc["listeners"][0]["address"]}

    return {
        "missing certificate": (missing_cert, "listeners[0].tls.cert: {tmp}/missing.pem: No such file or directory"),
        "missing POP3 key": (pop3_missing_key,
                             "listeners[1].tls.key: {tmp}/missing-key.pem: No such file or directory"),
        "unreadable key": (unreadable_key, "listeners[0].tls.key: {tmp}/key-dir: Is a directory"),
        "key of another certificate": (
            smtp_tls(tls, key=str(tls["other_key"])),
            f"listeners[0].tls.key: {tls['other_key']} does not match the certificate {tls['cert']}"),
        "certificate not PEM": (smtp_tls(tls, cert=str(tls["junk"])),
                                f"listeners[0].tls.cert: {tls['junk']}: no PEM certificate in it"),
        "key not PEM": (smtp_tls(tls, key=str(tls["junk"])),
                        f"listeners[0].tls.key: {tls['junk']}: no PEM private key in it"),
        "queue directory under a file": (
            queue_under_a_file, "queue.path: cannot create directory {tmp}/plain-file/spool: Not a directory"),
        "missing auth users file": (submission_without_users, "auth.users_file: {tmp}/no-users: No such file or directory"),
        "missing mailbox users file": (
            pop3_without_users, "mailboxes.users_file: {tmp}/no-mailbox-users: No such file or directory"),
        "two listeners on one address": (
            two_listeners_one_address,
            'config: listeners[1].address: "127.0.0.1:{port}" is already the address of listeners[0] (mta)'),
        "wildcard over a listener": (
            wildcard_overlap,
            'config: listeners[1].address: "0.0.0.0:{port}" overlaps listeners[0] (mta) on 127.0.0.1:{port}'),
        "metrics on a listener's address": (
            metrics_on_a_listener,
            'config: metrics.address: "127.0.0.1:{port}" is already the address of listeners[0] (mta)'),
    }


CASES = list(cases({k: Path("/x") for k in ("cert", "key", "other_key", "junk")}))


def check_refused(config_path: Path, expected: str) -> None:
    """`mta check-config` and `mta serve` both: the one line, status 2, nothing left running."""
    for command in ("serve", "check-config"):
        result = run(command, "--config", str(config_path))
        assert (result.returncode, result.stderr, result.stdout) == (2, expected + "\n", ""), command
        assert processes_with(str(config_path)) == [], command


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES)
def test_start_up_error_is_one_line_and_status_2(tmp_path, tls, case):
    setup, expected = cases(tls)[case]
    doc = base_doc(tmp_path)
    setup(tmp_path, doc)
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(doc))
    port = doc["listeners"][0]["address"].rsplit(":", 1)[1]
    check_refused(path, expected.format(tmp=tmp_path, port=port))


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on (bound as a daemon would bind it)."""
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


@pytest.mark.timeout(60)
def test_listener_port_in_use(tmp_path, busy_port):
    """No `config:` prefix: the file is fine, the port is taken; the listener is named."""
    doc = base_doc(tmp_path)
    doc["listeners"].insert(0, {"name": "submit", "address": f"127.0.0.1:{free_port()}", "mode": "relay"})
    doc["listeners"][1]["address"] = f"127.0.0.1:{busy_port}"
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(doc))
    check_refused(path, f"listeners: cannot listen on 127.0.0.1:{busy_port} (listener mta): Address already in use")


@pytest.mark.timeout(60)
def test_metrics_port_in_use(tmp_path, busy_port):
    doc = base_doc(tmp_path)
    doc["metrics"] = {"address": f"127.0.0.1:{busy_port}"}
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(doc))
    check_refused(path, f"metrics.address: cannot listen on 127.0.0.1:{busy_port}: Address already in use")


@contextlib.contextmanager
def read_only_mount(directory: Path) -> Iterator[Path]:
    """A read-only file system at ``directory`` (root can write anywhere else)."""
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root")
    directory.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)],
                            capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], capture_output=True, timeout=10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("queue, expected", [
    ("ro/queue.db", "queue.path: cannot write in directory {ro}: Read-only file system"),
    ("ro/spool/queue.db", "queue.path: cannot create directory {ro}/spool: Read-only file system"),
])
def test_read_only_queue_directory(tmp_path, queue, expected):
    with read_only_mount(tmp_path / "ro") as ro:
        doc = base_doc(tmp_path)
        doc["queue"]["path"] = str(tmp_path / queue)
        path = tmp_path / "mta.yaml"
        path.write_text(yaml.safe_dump(doc))
        check_refused(path, expected.format(ro=ro))


@pytest.mark.timeout(30)
def test_check_config_still_accepts_a_good_file_with_tls_and_users(tmp_path, tls):
    doc = base_doc(tmp_path)
    doc["listeners"][0]["tls"] = {"cert": str(tls["cert"]), "key": str(tls["key"])}
    doc["listeners"].append({"name": "pop3", "address": f"127.0.0.1:{free_port()}", "mode": "pop3"})
    doc["mailboxes"] = {"users_file": users_file(tmp_path)}
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = run("check-config", "--config", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"config: {path}: ok\n", "")
    assert not (tmp_path / "var").exists()   # check-config creates nothing

