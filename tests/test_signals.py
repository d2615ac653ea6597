"""SIGTERM and SIGHUP on the real `mta serve` process."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import time

import pytest
import yaml

from tests.support.daemon import start_daemon, wait_listening
from tests.support.ports import free_port
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(60)


def daemon_config(tmp_path, port, **extra):
    doc = {
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{port}", "mode": "relay"}],
        "mynetworks": ["127.0.0.1/32"],
        "queue": {"path": str(tmp_path / "queue.db")},
        "metrics": {"address": None},
        # Delivery runs, to a port where nobody listens: mail is deferred and stays queued.
        "delivery": {"smarthost": f"127.0.0.1:{free_port()}"},
    }
    doc.update(extra)
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_sigterm_lets_a_running_transaction_finish(tmp_path):
    port = free_port()
    config_path = daemon_config(tmp_path, port)
    proc = start_daemon(config_path, tmp_path / "mta.log")
    try:
        await wait_listening(port, proc)
        busy = await Wire.connect("127.0.0.1", port)
        idle = await Wire.connect("127.0.0.1", port)
        await busy.ehlo()
        await busy.cmd("MAIL FROM:<a@lab.test>")
        await busy.cmd("RCPT TO:<b@example.org>")
        assert await busy.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        await busy.send(b"Subject: half\r\n\r\nfirst half\r\n", crlf=False)
        proc.send_signal(signal.SIGTERM)
        # An idle session is told at once; no new connection is accepted.
        assert await idle.reply() == ["421 4.3.2 Service shutting down"]
        await asyncio.sleep(0.3)
        with pytest.raises(OSError):
            await Wire.connect("127.0.0.1", port)
        # The transaction in progress still completes and is committed.
        await busy.send(b"second half\r\n.")
        assert (await busy.reply())[-1].startswith("250 2.0.0 Ok: queued as")
        assert await busy.reply() == ["421 4.3.2 Service shutting down"]
        assert proc.wait(15) == 0
        await busy.close()
        await idle.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with sqlite3.connect(tmp_path / "queue.db") as db:
        data = db.execute("SELECT data FROM bodies").fetchone()[0]
    assert data.endswith(b"\r\n\r\nfirst half\r\nsecond half\r\n")
    assert "stopped" in (tmp_path / "mta.log").read_text()


async def test_sighup_reloads_relay_domains(tmp_path):
    port = free_port()
    config_path = daemon_config(tmp_path, port)
    proc = start_daemon(config_path, tmp_path / "mta.log")
    try:
        await wait_listening(port, proc)

        async def outsider_rcpt():
            async with await Wire.connect("127.0.0.1", port, local_addr=("127.0.0.9", 0)) as w:
                await w.ehlo()
                await w.cmd("MAIL FROM:<x@remote.test>")
                return await w.cmd("RCPT TO:<user@new.test>")

        assert await outsider_rcpt() == "554 5.7.1 <user@new.test>: Relay access denied"
        doc = yaml.safe_load(config_path.read_text())
        doc["relay_domains"] = ["new.test"]
        doc["listeners"][0]["address"] = f"127.0.0.1:{free_port()}"  # needs a restart: kept, and said so
        config_path.write_text(yaml.safe_dump(doc))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload:" not in (tmp_path / "mta.log").read_text() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await outsider_rcpt() == "250 2.1.5 Ok"
        log = (tmp_path / "mta.log").read_text()
        assert "reload: changes to listeners take effect after a restart" in log
        # A broken file on reload keeps the running configuration.
        config_path.write_text("delivery: {retry: {min_backoff: 5x}}\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in (tmp_path / "mta.log").read_text() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert 'config: delivery.retry.min_backoff: "5x" is not a duration' in (tmp_path / "mta.log").read_text()
        assert await outsider_rcpt() == "250 2.1.5 Ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_bad_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("limits: {message_size: lots}\n")
    from tests.support.daemon import mta_command, subprocess_env
    result = subprocess.run(mta_command("serve", "--config", str(path)), capture_output=True, text=True,
                            timeout=30, env=subprocess_env())
    assert result.returncode == 2
    assert result.stderr.strip() == 'config: limits.message_size: "lots" is not a size'


def test_serve_reports_a_port_in_use(tmp_path):
    import socket

    from tests.support.daemon import mta_command, subprocess_env
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = daemon_config(tmp_path, port)
        result = subprocess.run(mta_command("serve", "--config", str(path)), capture_output=True, text=True,
                                timeout=30, env=subprocess_env())
    # One line, without `config:`: the file is fine, the port is taken (tests/test_startup.py has more).
    assert (result.returncode, result.stderr) == (
        2, f"listeners: cannot listen on 127.0.0.1:{port} (listener mta): Address already in use\n")
