"""One `mta serve` node on PostgreSQL end to end: what the relay does on SQLite, it does here.

A real daemon on a private cluster (tests/support/postgres.py), next hops found by
MX on the loopback DNS, the queue CLI run against the same database while the
node runs. Several nodes at once: tests/test_multinode.py.
"""

from __future__ import annotations

import email
import email.policy
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, metric, mta_command, subprocess_env
from tests.support.fakedns import FakeDNS, mx
from tests.support.ports import free_port
from tests.support.smtp_peer import RecordingPeer
from tests.support.waiting import wait_until
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(90)

BODY = b"Subject: to the lab\r\nMessage-ID: <pg@lab.test>\r\n\r\nbody text\r\n"


def node_doc(tmp_path: Path, dsn: str, dns: FakeDNS, peer_port: int, *, name: str = "relay-a.lab.test",
             **retry: str) -> dict[str, Any]:
    return {
        "hostname": name,
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"}],
        "mynetworks": ["127.0.0.0/8"],
        "queue": {"backend": "postgresql", "dsn": dsn, "path": str(tmp_path / name / "queue.db"), "lease": "3s"},
        "metrics": {"address": f"127.0.0.1:{free_port()}"},
        "delivery": {"port": peer_port,
                     "dns": {"nameservers": ["127.0.0.1"], "port": dns.port, "timeout": "2s"},
                     "retry": {"min_backoff": "1s", "max_backoff": "2s"} | retry,
                     "connection_cache": {"idle_timeout": "0.2s"},
                     "timeouts": {"connect": "2s", "command": "5s"}},
    }


def queue_cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """`mta queue …` with the node's own config: the shared database, while the node runs."""
    return subprocess.run(mta_command("queue", *args, "--config", str(daemon.config_path)), capture_output=True,
                          text=True, timeout=30, env=subprocess_env(TZ="UTC"))


def queue_json(daemon: Daemon) -> list[dict[str, Any]]:
    result = queue_cli(daemon, "list", "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def send(port: int, rcpts: list[str], sender: str = "lab@lab.test") -> str:
    async with await Wire.connect("127.0.0.1", port) as w:
        await w.ehlo()
        assert (await w.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
        for rcpt in rcpts:
            assert (await w.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")
        assert (await w.cmd("DATA")).startswith("354")
        await w.send(BODY + b".", crlf=True)
        reply = (await w.reply())[-1]
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        return reply.rsplit(" ", 1)[1]


@pytest.fixture
async def node(tmp_path: Path, postgres_dsn: str, dns_server: FakeDNS, peer_port: int):
    daemons: list[Daemon] = []

    async def start(doc: dict[str, Any], subdir: str = "a") -> Daemon:
        (tmp_path / subdir).mkdir(exist_ok=True)
        daemon = Daemon(tmp_path / subdir, doc)
        daemons.append(daemon)
        await daemon.started()
        return daemon

    yield start
    for daemon in daemons:
        daemon.ensure_dead()


async def test_bounce_delay_warning_hold_release_and_flush(tmp_path, postgres_dsn, dns_server, peer_port, node):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    mx(dns_server, "lab.test", (10, "mx.lab.test", "127.0.0.3"))
    accept_later = {"b": False}

    def next_hop(verb: str, arg: str, conn: object) -> str | None:
        if verb == "RCPT" and "<a@example.test>" in arg:
            return "550 5.1.1 <a@example.test>: Recipient address rejected: User unknown"
        if verb == "RCPT" and "<b@example.test>" in arg and not accept_later["b"]:
            return "451 4.2.0 <b@example.test>: try again later"
        return None

    async with RecordingPeer("127.0.0.2", peer_port, replies=next_hop) as target, \
            RecordingPeer("127.0.0.3", peer_port) as sender_mx:
        # Deferred for a minute (unless flushed); the delay warning with the first deferral.
        daemon = await node(node_doc(tmp_path, postgres_dsn, dns_server, peer_port, min_backoff="1m",
                                     max_backoff="2m", delay_warning="0s"))
        queue_id = await send(daemon.port, ["a@example.test", "b@example.test"])

        # One report for the attempt (RFC 3464): a failed, b delayed.
        [dsn] = await sender_mx.wait_for_messages(1, timeout=20)
        assert dsn.sender == "" and dsn.rcpts == ["lab@lab.test"]
        msg = email.message_from_bytes(dsn.data, policy=email.policy.default)
        _human, status, _headers = msg.iter_parts()
        per_message, *per_rcpt = status.get_payload()
        assert per_message["X-Mta-Queue-ID"] == queue_id
        assert per_message["Reporting-MTA"] == "dns; relay-a.lab.test"
        assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in per_rcpt] == [
            ("rfc822; a@example.test", "failed", "5.1.1"), ("rfc822; b@example.test", "delayed", "4.2.0")]

        # The CLI sees the shared database while the node runs: b deferred, then held.
        [entry] = queue_json(daemon)
        assert (entry["queue_id"], entry["queue_name"]) == (queue_id, "deferred")
        assert [(r["address"], r["state"]) for r in entry["recipients"]] == [("b@example.test", "deferred")]
        held = queue_cli(daemon, "hold", queue_id)
        assert held.returncode == 0, held.stderr
        [entry] = queue_json(daemon)
        assert entry["queue_name"] == "hold"
        metrics_port = int(daemon.doc["metrics"]["address"].rsplit(":", 1)[1])
        await wait_until(lambda: metric(metrics_port, 'mta_queue_messages{state="hold"}') == 1.0)

        # Released and flushed: delivered at once, and the queue is empty.
        accept_later["b"] = True
        tried = len(target.messages)
        assert queue_cli(daemon, "release", queue_id).returncode == 0
        assert queue_cli(daemon, "flush", queue_id).returncode == 0
        delivered = (await target.wait_for_messages(tried + 1, timeout=15))[-1]
        assert delivered.rcpts == ["b@example.test"]
        assert delivered.data.endswith(BODY)
        await wait_until(lambda: queue_json(daemon) == [], timeout=10)
        assert daemon.proc is not None and daemon.proc.poll() is None


async def test_sighup_then_sigterm(tmp_path, postgres_dsn, dns_server, peer_port, node):
    mx(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.2"))
    async with RecordingPeer("127.0.0.2", peer_port) as target:
        daemon = await node(node_doc(tmp_path, postgres_dsn, dns_server, peer_port))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for("reload logged", lambda: "reload: configuration re-read" in daemon.log_text())
        await send(daemon.port, ["c@example.test"])
        [message] = await target.wait_for_messages(1, timeout=15)
        assert message.rcpts == ["c@example.test"]
        assert await daemon.terminate() == 0
    assert "stopped" in daemon.log_text()


async def test_a_second_daemon_with_the_same_hostname_is_refused(tmp_path, postgres_dsn, dns_server, peer_port,
                                                                  node):
    first = await node(node_doc(tmp_path, postgres_dsn, dns_server, peer_port))
    (tmp_path / "b").mkdir()
    second = Daemon(tmp_path / "b", node_doc(tmp_path / "b", postgres_dsn, dns_server, peer_port))
    second.start()
    assert await second.wait_exit(20) == 2
    assert second.log_text().splitlines()[-1] == (
        "queue: node name relay-a.lab.test is in use by another mta on this database (give each node its own "
        "hostname)")
    assert first.proc is not None and first.proc.poll() is None   # the first one is untouched
