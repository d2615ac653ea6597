"""The http listener in a real `mta serve`: HTTPS with basic auth in front of the
Mailpit API, mail arriving over SMTP, SIGHUP, a port that cannot be bound; and an
unmodified third-party Mailpit client (PyPI's mailpit-api-client) driving it."""

from __future__ import annotations

import asyncio
import base64
import signal
import smtplib
import socket
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mta.passwords import set_password
from tests.support.daemon import Daemon, mta_command, subprocess_env
from tests.support.in_process import running
from tests.support.ports import free_port
from tests.support.web import lab_config, port_of, send

pytestmark = pytest.mark.timeout(60)

MESSAGE = (b"From: ci@remote.test\r\nTo: alice@lab.test\r\nSubject: over https\r\n"
           b"Message-ID: <https@remote.test>\r\n\r\nbody\r\n")


def daemon_doc(tmp_path: Path, web: dict[str, Any]) -> dict[str, Any]:
    mailbox_users = tmp_path / "mailboxes.users"
    set_password(mailbox_users, "alice@lab.test", "alice pw")
    return {
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"},
                      {"name": "web", "address": f"127.0.0.1:{free_port()}", "mode": "http", **web}],
        "local_domains": ["lab.test"],
        "mailboxes": {"users_file": str(mailbox_users)},
        "queue": {"path": str(tmp_path / "queue" / "queue.db")},
        "metrics": {"address": None},
    }


def auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_https_basic_auth_and_sighup_in_a_real_daemon(tmp_path: Path, tls_cert: tuple[str, str, Any]) -> None:
    cert, key, client_tls = tls_cert
    web_users = tmp_path / "web.users"
    set_password(web_users, "ops", "first pw")
    doc = daemon_doc(tmp_path, {"users_file": str(web_users), "tls": {"cert": cert, "key": key}})
    web_port = int(doc["listeners"][1]["address"].rsplit(":", 1)[1])
    daemon = Daemon(tmp_path, doc)
    url = f"https://127.0.0.1:{web_port}/api/v1/messages"
    try:
        await daemon.started()
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as smtp:
            smtp.sendmail("ci@remote.test", ["alice@lab.test"], MESSAGE)
        async with aiohttp.ClientSession() as session:
            async def get(headers: dict[str, str]) -> tuple[int, Any]:
                async with session.get(url, ssl=client_tls, headers=headers) as resp:
                    return resp.status, await (resp.json() if resp.status == 200 else resp.text())

            assert await get({}) == (401, "Unauthorised.")
            for _ in range(100):
                status, listed = await get(auth("ops", "first pw"))
                assert status == 200
                if listed["total"]:
                    break
                await asyncio.sleep(0.05)
            assert [m["Subject"] for m in listed["messages"]] == ["over https"]
            # A new password, then SIGHUP: the file is read again.
            set_password(web_users, "ops", "second pw")
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGHUP)
            daemon.wait_for("reload", lambda: "reload: configuration re-read" in daemon.log_text())
            assert (await get(auth("ops", "first pw")))[0] == 401
            assert (await get(auth("ops", "second pw")))[0] == 200
        log = daemon.log_text()
        assert f"mta/web[{daemon.proc.pid}]: listener web: serving the lab inbox on " \
               f"https://127.0.0.1:{web_port}/, basic auth" in log
        assert "basic auth from 127.0.0.1 failed: authentication failure, user=ops" in log
        assert "Traceback" not in log
        assert await daemon.terminate() == 0
    finally:
        daemon.ensure_dead()


def test_a_taken_http_port_stops_the_start_with_one_line(tmp_path: Path) -> None:
    doc = daemon_doc(tmp_path, {})
    daemon = Daemon(tmp_path, doc)
    web_port = int(doc["listeners"][1]["address"].rsplit(":", 1)[1])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", web_port))
        taken.listen()
        done = subprocess.run(mta_command("serve", "--config", str(daemon.config_path)), capture_output=True,
                              text=True, env=subprocess_env(), timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == \
        f"listeners: cannot listen on 127.0.0.1:{web_port} (listener web): Address already in use"


async def test_an_unmodified_mailpit_client(make_config: Any, tmp_path: Path) -> None:
    """PyPI's mailpit-api-client, as a test suite would use it against Mailpit."""
    from mailpit.client.api import API  # third-party, unmodified

    lab = lab_config(make_config, tmp_path)
    attachment = b"col1,col2\r\n1,2\r\n"
    multipart = (b"From: Build Bot <ci@remote.test>\r\nTo: alice@lab.test\r\nSubject: results\r\n"
                 b"Message-ID: <results@remote.test>\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\n"
                 b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
                 b"--b\r\nContent-Type: text/plain\r\n\r\nall green\r\n"
                 b'--b\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; filename="r.csv"\r\n\r\n'
                 + attachment + b"\r\n--b--\r\n")
    async with running(lab, deliver=True):
        api = API(f"http://127.0.0.1:{port_of(lab, 'web')}", timeout=10)
        await asyncio.to_thread(send, lab, multipart, ["alice@lab.test"])
        await asyncio.to_thread(send, lab, MESSAGE, ["alice@lab.test"])
        for _ in range(200):
            listed = await asyncio.to_thread(api.get_messages)
            if listed.total == 2:
                break
            await asyncio.sleep(0.05)
        assert (listed.total, listed.unread, listed.count, listed.start) == (2, 2, 2, 0)
        assert [m.subject for m in listed.messages] == ["over https", "results"]
        results_id = listed.messages[1].id
        message = await asyncio.to_thread(api.get_message, results_id)
        assert (message.subject, message.text, message.from_.address) == ("results", "all green", "ci@remote.test")
        assert [(a.file_name, a.content_type, a.size) for a in message.attachments] == \
            [("r.csv", "text/csv", len(attachment))]
        data = await asyncio.to_thread(api.get_message_attachment, results_id, message.attachments[0].part_id)
        assert data == attachment.decode()
        # put_messages and delete_messages send forms ("ids=..."), which mta reads too.
        await asyncio.to_thread(api.put_messages, [results_id], "Read", False)
        assert [m.read for m in (await asyncio.to_thread(api.get_messages)).messages] == [False, False]
        await asyncio.to_thread(api.delete_messages, [results_id])
        left = await asyncio.to_thread(api.get_messages)
        assert [m.subject for m in left.messages] == ["over https"]
        await asyncio.to_thread(api.delete_messages, [])     # the client's "delete all"
        assert (await asyncio.to_thread(api.get_messages)).total == 0
