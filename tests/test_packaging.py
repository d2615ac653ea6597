"""Packaging: the Dockerfile, its container config, .dockerignore and the systemd unit.

No Docker engine or systemd PID 1 runs here, so these tests check what can be
checked without them: the Dockerfile's instructions, the commands it runs (the
container's config and CMD with the image's environment, the HEALTHCHECK
script against an HTTP server), the unit's keys with `systemd-analyze`, and
the daemon running under MemoryDenyWriteExecute's kernel equivalent.
"""

from __future__ import annotations

import configparser
import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mta.config import load_config
from tests.support.daemon import ROOT, mta_command, subprocess_env
from tests.support.ports import free_port

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKER_CONFIG = ROOT / "config" / "docker.yaml"
UNIT = ROOT / "systemd" / "mta.service"


# --------------------------------------------------------------------------- Dockerfile parsing

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def instructions(name: str) -> list[str]:
    return [args for keyword, args in dockerfile() if keyword == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {args}: use the KEY=value form"
            env[key] = value
    return env


def healthcheck() -> tuple[dict[str, str], list[str]]:
    (args,) = instructions("HEALTHCHECK")
    options: dict[str, str] = {}
    while args.startswith("--"):
        option, _, args = args.partition(" ")
        key, _, value = option[2:].partition("=")
        options[key] = value
        args = args.strip()
    keyword, _, command = args.partition(" ")
    assert keyword.upper() == "CMD", "HEALTHCHECK CMD [...]"
    return options, exec_form(command.strip())


def copies() -> list[tuple[list[str], str]]:
    out = []
    for args in instructions("COPY"):
        parts = [p for p in (exec_form(args) if args.startswith("[") else shlex.split(args))
                 if not p.startswith("--")]
        out.append((parts[:-1], parts[-1]))
    return out


def dockerignored(relpath: str) -> bool:
    """Whether .dockerignore keeps ``relpath`` out of the build context (no '!' rules used)."""
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "extend dockerignored() for '!' rules"
    parts = Path(relpath).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]  # a dir excludes its contents
    return any(_glob(pattern).fullmatch(prefix) for pattern in patterns for prefix in prefixes)


def _glob(pattern: str) -> re.Pattern[str]:
    """Docker's (Go filepath.Match) globbing, anchored at the context root: * stays in one directory."""
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


# --------------------------------------------------------------------------- the image

def test_base_image():
    froms = instructions("FROM")
    assert len(froms) == 1
    image = froms[0].split()[0]
    assert image == "python:3.11-slim" or image.startswith("python:3.11-slim@sha256:")


def test_pip_installs_the_package_without_a_cache():
    pip_runs = [args for args in instructions("RUN") if "pip install" in args]
    assert len(pip_runs) == 1
    words = shlex.split(pip_runs[0].split("&&")[0])
    assert words[:2] == ["pip", "install"]
    assert "--no-cache-dir" in words
    # The project itself with the PostgreSQL driver (an image can be one of several nodes), deps from PyPI.
    assert [w for w in words[2:] if not w.startswith("-")] == [".[postgresql]"]
    # The package is built in WORKDIR /src, so "." is what the COPY lines put there.
    steps = dockerfile()
    pip_at = steps.index(("RUN", pip_runs[0]))
    assert [args for keyword, args in steps[:pip_at] if keyword == "WORKDIR"][-1] == "/src"


def test_copied_sources_are_what_the_build_needs():
    """Everything pip needs to build the wheel is copied, exists, and survives .dockerignore."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    sources = {src.rstrip("/") for srcs, _dest in copies() for src in srcs}
    readme = pyproject["project"]["readme"]
    readme = readme if isinstance(readme, str) else readme["file"]
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    for needed in {"pyproject.toml", readme, *packages}:
        assert needed in sources, f"{needed} is not copied into the image"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    for path in (ROOT / "mta").rglob("*.py"):
        assert not dockerignored(str(path.relative_to(ROOT)))


@pytest.mark.parametrize("path", [
    ".git/HEAD", ".pytest_cache/v/x", "mta/__pycache__/app.cpython-311.pyc", "tests/test_notify.py",
    "var/queue.db", "queue.db", "var/queue.db-wal", "mta.egg-info/PKG-INFO", ".venv/bin/python",
    ".hypothesis/examples/x", ".mypy_cache/x", ".ruff_cache/x", "benchmarks/x/queue.db", "x/y/queue.db-shm",
])
def test_dockerignore_keeps_junk_out_of_the_context(path):
    assert dockerignored(path)


def test_dockerignore_globbing_is_dockers():
    assert _glob("*.db").fullmatch("queue.db") and not _glob("*.db").fullmatch("var/queue.db")
    assert _glob("**/*.pyc").fullmatch("a.pyc") and _glob("**/*.pyc").fullmatch("mta/x/a.pyc")
    assert not dockerignored("mta/tests/x.py")  # "tests" is anchored at the root


def test_runs_as_an_unprivileged_user():
    users = instructions("USER")
    assert users, "no USER: the daemon would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    useradd = next(args for args in instructions("RUN") if "useradd" in args)
    uid = re.search(r"--uid\s+(\d+)", useradd)
    assert uid and int(uid.group(1)) >= 1000
    assert re.search(rf"useradd\b.*\b{re.escape(user)}\s*(&&|$)", useradd)
    # ... and it owns the volume it writes the queue to.
    assert re.search(rf"-o {re.escape(user)} -g \S+ -m 0?700 /var/lib/mta", useradd)


def test_volume_env_and_config_path():
    env = docker_env()
    assert env["MTA_CONFIG"] == "/etc/mta/mta.yaml"
    assert env["STATE_DIRECTORY"] == "/var/lib/mta"
    volumes = [v for args in instructions("VOLUME")
               for v in (exec_form(args) if args.startswith("[") else args.split())]
    assert env["STATE_DIRECTORY"] in volumes
    assert (["config/docker.yaml"], env["MTA_CONFIG"]) in copies()
    assert instructions("CMD") and exec_form(instructions("CMD")[-1]) == ["mta", "serve"]
    assert not instructions("ENTRYPOINT")  # `docker run mta mta queue list` works


def test_docker_config_passes_check_config():
    """Exactly as in the container: no --config, $MTA_CONFIG names the file."""
    result = subprocess.run(mta_command("check-config"), capture_output=True, text=True, timeout=30,
                            env=subprocess_env(MTA_CONFIG=str(DOCKER_CONFIG)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"config: {DOCKER_CONFIG}: ok"


def test_docker_config_matches_the_image(monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", docker_env()["STATE_DIRECTORY"])
    config = load_config(DOCKER_CONFIG)
    exposed = {int(p.split("/")[0]) for args in instructions("EXPOSE") for p in args.split()}
    for lc in config.listeners:
        assert lc.host in ("0.0.0.0", "::"), f"{lc.name}: unreachable from outside the container"
        assert lc.port >= 1024, f"{lc.name}: the unprivileged user cannot bind {lc.port}"
        assert lc.port in exposed
    assert {2525, 2587, 9101} <= exposed
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", 9101)
    assert config.queue.path == "/var/lib/mta/queue.db"  # on the volume, via $STATE_DIRECTORY
    # Published ports arrive from docker networks; no open relay beyond private ranges.
    assert all(net.is_private for net in config.mynetworks)
    assert not config.auth.users_file  # submission stays commented out: it needs TLS and users
    url = docker_env()["MTA_HEALTHCHECK_URL"]
    assert url == f"http://127.0.0.1:{config.metrics.port}/healthz"


# --------------------------------------------------------------------------- HEALTHCHECK

class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        code = 200 if self.path == "/healthz" and self.server.healthy else 503  # type: ignore[attr-defined]
        body = b"ok\n" if code == 200 else b"no\n"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def health_server(healthy: bool) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.healthy = healthy  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run_healthcheck(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    _options, argv = healthcheck()
    assert argv[0] == "python"  # the image's python; here the test's interpreter
    return subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=30,
                          env=subprocess_env(MTA_HEALTHCHECK_URL=url, **env))


def test_healthcheck_is_valid_python_with_sane_timing():
    options, argv = healthcheck()
    assert argv[:2] == ["python", "-c"] and len(argv) == 3
    compile(argv[2], "<HEALTHCHECK>", "exec")
    seconds = {k: float(v.rstrip("s")) for k, v in options.items() if k != "retries"}
    assert seconds["timeout"] < seconds["interval"]
    timeout = re.search(r"timeout=(\d+(?:\.\d+)?)", argv[2])
    assert timeout and float(timeout.group(1)) < seconds["timeout"]  # urllib gives up before Docker does


def test_healthcheck_exit_codes():
    with health_server(healthy=True) as port:
        ok = run_healthcheck(f"http://127.0.0.1:{port}/healthz")
        # A proxy in the environment (common in labs) must not be used for 127.0.0.1.
        proxied = run_healthcheck(f"http://127.0.0.1:{port}/healthz", http_proxy="http://127.0.0.1:9",
                                  HTTP_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    assert ok.returncode == 0, ok.stderr
    assert proxied.returncode == 0, proxied.stderr
    with health_server(healthy=False) as port:
        assert run_healthcheck(f"http://127.0.0.1:{port}/healthz").returncode == 1
    assert run_healthcheck(f"http://127.0.0.1:{free_port()}/healthz").returncode == 1  # nobody there


# --------------------------------------------------------------------------- the container's CMD

@pytest.fixture
def container_like(tmp_path: Path) -> Iterator[tuple[dict[str, str], int, int, Path]]:
    """config/docker.yaml on free ports, and the image's environment pointing into tmp_path."""
    data = yaml.safe_load(DOCKER_CONFIG.read_text())
    # The listeners bind 0.0.0.0: probe the port there, as the daemon will bind it (a port free
    # on 127.0.0.1 can be taken on another address, and the daemon then failed to start).
    smtp, metrics = free_port("0.0.0.0"), free_port()
    for listener in data["listeners"]:
        listener["address"] = f"0.0.0.0:{smtp}"
    data["metrics"]["address"] = f"127.0.0.1:{metrics}"
    data["delivery"]["smarthost"] = f"127.0.0.1:{free_port()}"  # nobody there: mail stays queued
    config = tmp_path / "etc" / "mta.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(data))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = {**docker_env(), "MTA_CONFIG": str(config), "STATE_DIRECTORY": str(state),
           "MTA_HEALTHCHECK_URL": f"http://127.0.0.1:{metrics}/healthz"}
    yield env, smtp, metrics, state


@contextlib.contextmanager
def serving(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(**env),
                                cwd=cwd)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}:\n{log.read_text(errors='replace')}")


def send_one(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        refused = client.sendmail("lab@lab.test", ["someone@example.org"],
                                  b"Subject: packaging test\r\n\r\nhello\r\n")
    assert refused == {}


@pytest.mark.timeout(60)
def test_container_cmd_serves_with_the_image_environment(container_like, tmp_path):
    env, smtp, _metrics, state = container_like
    cmd = exec_form(instructions("CMD")[-1])
    log = tmp_path / "mta.log"
    with serving(mta_command(*cmd[1:]), env, state, log) as proc:  # cwd = WORKDIR /var/lib/mta
        wait_port(smtp, proc, log)
        send_one(smtp)
        assert (state / "queue.db").exists(), "the queue is not on the volume"
        proc.send_signal(signal.SIGTERM)  # docker stop
        assert proc.wait(30) == 0, log.read_text(errors="replace")
    result = subprocess.run(mta_command("queue", "list"), capture_output=True, text=True, timeout=30,
                            env=subprocess_env(**env), cwd=state)  # docker exec mta mta queue list
    assert result.returncode == 0, result.stderr
    assert "someone@example.org" in result.stdout


@pytest.mark.timeout(60)
def test_healthcheck_passes_against_the_real_daemon(container_like, tmp_path):
    env, smtp, metrics, state = container_like
    log = tmp_path / "mta.log"
    with serving(mta_command("serve"), env, state, log) as proc:
        wait_port(smtp, proc, log)
        wait_port(metrics, proc, log)
        result = run_healthcheck(env["MTA_HEALTHCHECK_URL"])
        assert result.returncode == 0, result.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


# --------------------------------------------------------------------------- systemd unit

def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


EXPECTED_SERVICE = {
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "User": "mta",
    "Group": "mta",
    "StateDirectory": "mta",
    "StateDirectoryMode": "0700",
    "ConfigurationDirectory": "mta",
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "WatchdogSec": "30s",
    "Restart": "on-failure",
    "TimeoutStopSec": "30s",
    "KillMode": "mixed",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "UMask": "0077",
    "LimitNOFILE": "65536",
}


def test_unit_keys():
    u = unit()
    service = u["Service"]
    assert service["Type"] in ("notify", "notify-reload")
    assert "notify-reload" in UNIT.read_text()  # the comment for systemd >= 253
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/mta") and argv[1:] == ["serve", "--config", "/etc/mta/mta.yaml"]
    for key, value in EXPECTED_SERVICE.items():
        assert service.get(key) == value, f"[Service] {key}={service.get(key)!r}, want {value!r}"
    assert u["Install"]["WantedBy"] == "multi-user.target"
    # The same state directory as the container's, so both keep queue.db in /var/lib/mta.
    assert "/var/lib/" + service["StateDirectory"] == docker_env()["STATE_DIRECTORY"]
    # The watchdog is pinged at half WatchdogSec; shutdown fits in TimeoutStopSec.
    from mta.daemon.main_process import SHUTDOWN_GRACE
    assert float(service["TimeoutStopSec"].rstrip("s")) > 2 * SHUTDOWN_GRACE


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart= on this machine's `mta` (verify insists the binary exists)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    mta = shutil.which("mta")
    if mta is None:
        pytest.skip("the mta console script is not on PATH (pip install -e .)")
    text = UNIT.read_text()
    rewritten = re.sub(r"^ExecStart=\S+", f"ExecStart={mta}", text, count=1, flags=re.M)
    assert rewritten != text
    path = tmp_path / "mta.service"
    path.write_text(rewritten)
    return path


def _repo_manpath(tmp_path: Path) -> str:
    """MANPATH with the repository's man/ pages laid out as man(1) wants them (man8/mta.8, ...)
    in front of the system's (the trailing ':'): verify runs `man` on each Documentation= page."""
    root = tmp_path / "share-man"
    for page in (ROOT / "man").glob("*.[1-8]"):
        section = root / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        (section / page.name).symlink_to(page)
    return f"{root}:"


def test_systemd_analyze_verify(tmp_path):
    path = _unit_for_verify(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "MANPATH": _repo_manpath(tmp_path)})
    # verify exits 0 even for unknown keys or bad values; it says so on stderr.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "mta.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_systemd_analyze_security_exposure(tmp_path):
    path = _unit_for_verify(tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
                            capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for mta\.service: (\d+(?:\.\d+)?)", result.stdout)
    if result.returncode != 0 and not m:
        pytest.skip(f"systemd-analyze security --offline unsupported: {result.stderr.strip()[:200]}")
    assert m, result.stdout
    assert float(m.group(1)) <= 3.0, result.stdout  # "OK" on systemd's scale (was 2.0 on systemd 252)


# Runs `python -m mta ...` with the kernel's MDWE (Linux >= 6.3): mappings can never be both
# writable and executable, nor become executable later. This is what MemoryDenyWriteExecute=yes
# enforces (systemd with a seccomp filter, or this same prctl on newer versions).
_MDWE_LAUNCHER = r"""
import ctypes, mmap, runpy, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) != PR_MDWE_REFUSE_EXEC_GAIN:
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    pass
else:
    sys.exit(78)  # MDWE is not enforced: the test would prove nothing
sys.argv = ["mta", *sys.argv[1:]]
runpy.run_module("mta", run_name="__main__", alter_sys=True)
"""


@pytest.mark.timeout(60)
def test_daemon_runs_with_memory_deny_write_execute(write_config, tmp_path):
    probe = subprocess.run([sys.executable, "-c", _MDWE_LAUNCHER, "--help"], capture_output=True,
                           timeout=30, env=subprocess_env())
    if probe.returncode == 77:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert probe.returncode == 0, probe.stderr
    port = free_port()
    config = write_config({
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{port}", "mode": "relay"}],
        "queue": {"path": str(tmp_path / "queue.db")},
        "metrics": {"address": None},
        "delivery": {"smarthost": f"127.0.0.1:{free_port()}"},  # delivery runs, and defers
    })
    log = tmp_path / "mta.log"
    argv = [sys.executable, "-c", _MDWE_LAUNCHER, "serve", "--config", str(config)]
    with serving(argv, {}, tmp_path, log) as proc:
        wait_port(port, proc, log)
        send_one(port)
        time.sleep(0.5)  # a delivery attempt to the closed smarthost
        assert proc.poll() is None, log.read_text(errors="replace")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text(errors="replace")
    os.stat(tmp_path / "queue.db")
