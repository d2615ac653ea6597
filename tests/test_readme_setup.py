"""The README's first set-up command, as written, on Debian's own Python.

Debian 12's python3 refuses `pip install` outside a virtual environment (PEP 668,
`externally-managed-environment`); the README's command makes one. This runs the
command line exactly as the README has it, in a copy of the repository, with
Debian's /usr/bin/python3 first on PATH, and checks that the daemon it starts
answers SMTP on its built-in address and queues a message.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.daemon import ROOT

README = ROOT / "README.md"
DEBIAN_PYTHON = Path("/usr/bin/python3")
MANAGED = Path("/usr/lib/python3.11/EXTERNALLY-MANAGED")


def setup_commands() -> list[str]:
    block = re.search(r"## Set-up\n.*?```sh\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no Set-up code block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_has_two_setup_commands_and_ci_runs_the_second() -> None:
    install, tests = setup_commands()
    assert install.endswith("mta serve") and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


needs_debian = pytest.mark.skipif(
    os.geteuid() != 0 or not DEBIAN_PYTHON.exists() or not MANAGED.exists() or shutil.which("apt-get") is None,
    reason="needs root and Debian's externally managed /usr/bin/python3")


@needs_debian
@pytest.mark.timeout(300)
def test_a_bare_pip_install_is_refused_by_debian_python(tmp_path: Path) -> None:
    """Why the README uses a venv: the command it had before fails here."""
    done = subprocess.run([str(DEBIAN_PYTHON), "-m", "pip", "install", "--dry-run", str(ROOT)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    if done.returncode != 0 and "No module named pip" in done.stderr:
        pytest.skip("Debian's python3-pip is not installed")
    assert done.returncode != 0 and "externally-managed-environment" in done.stderr


@needs_debian
@pytest.mark.timeout(300)
def test_first_setup_command_installs_and_serves_on_debian_python(tmp_path: Path) -> None:
    if not port_free("127.0.0.1", 2525) or not port_free("127.0.0.1", 9101):
        pytest.skip("the built-in ports 2525/9101 are in use on this machine")
    install, _ = setup_commands()
    checkout = tmp_path / "mta"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(tmp_path), "DEBIAN_FRONTEND": "noninteractive",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    with open(tmp_path / "setup.log", "wb") as log:   # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(["bash", "-c", install], cwd=checkout, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "setup.log").read_text()[-3000:]
            try:
                with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as smtp:
                    smtp.ehlo("setup.test")
                    smtp.mail("ci@lab.test")
                    smtp.rcpt("you@example.org")
                    code, reply = smtp.data(b"Subject: set-up\r\n\r\nhello\r\n")
                break
            except (OSError, smtplib.SMTPException):
                assert time.monotonic() < deadline, (tmp_path / "setup.log").read_text()[-3000:]
                time.sleep(0.5)
        assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as "), reply
        assert (checkout / ".venv" / "bin" / "mta").exists()
        assert (checkout / "var" / "queue.db").exists()   # the built-in queue path, under the working directory
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
