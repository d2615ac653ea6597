"""`mta passwd` for mailbox users and `mta mailbox list|purge`, against a running `mta serve`."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time

import pytest
import yaml

from tests.support.daemon import mta_command, start_daemon, subprocess_env, wait_listening
from tests.support.ports import free_port
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(60)


def mta(*args, stdin=None):
    return subprocess.run(mta_command(*args), input=stdin, capture_output=True, text=True,
                          env=subprocess_env(), timeout=30)


@pytest.fixture
def daemon(tmp_path):
    port = free_port()
    users = tmp_path / "mailboxes.users"
    config = {
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{port}", "mode": "relay"}],
        "queue": {"path": str(tmp_path / "queue.db")},
        "metrics": {"address": None},
        "local_domains": ["lab.test"],
        "mailboxes": {"users_file": str(users)},
    }
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(config))
    assert mta("passwd", "--users-file", str(users), "alice@lab.test", stdin="secret\n").returncode == 0
    proc = start_daemon(path, tmp_path / "mta.log")
    try:
        asyncio.run(wait_listening(port, proc))
        yield path, port, users, tmp_path / "queue.db"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


async def send(port, rcpt, subject):
    async with await Wire.connect("127.0.0.1", port) as w:
        await w.ehlo()
        assert (await w.cmd("MAIL FROM:<tester@example.test>")).startswith("250")
        reply = await w.cmd(f"RCPT TO:<{rcpt}>")
        if not reply.startswith("250"):
            return reply
        assert (await w.cmd("DATA")).startswith("354")
        await w.send(f"Subject: {subject}\r\n\r\nhello\r\n.".encode())
        return (await w.reply())[-1]


def wait_rows(db_path, count, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db_path) as db:
            n = db.execute("SELECT COUNT(*) FROM mailbox_messages").fetchone()[0]
        if n == count:
            return
        assert time.monotonic() < deadline, f"{n} rows, wanted {count}"
        time.sleep(0.05)


def test_passwd_adds_a_mailbox_without_reload_then_list_and_purge(daemon):
    config, port, users, db_path = daemon
    assert asyncio.run(send(port, "bob@lab.test", "early")) == (
        "550 5.1.1 <bob@lab.test>: Recipient address rejected: User unknown in local recipient table")
    # `mta passwd` writes the users file; the daemon sees it at the next lookup.
    result = mta("passwd", "--users-file", str(users), "bob@lab.test", stdin="pw\n")
    assert result.returncode == 0, result.stderr
    assert users.stat().st_mode & 0o777 == 0o600
    assert [line.split(":")[0] for line in users.read_text().splitlines()] == ["alice@lab.test", "bob@lab.test"]
    for n in range(2):
        assert asyncio.run(send(port, "alice@lab.test", f"for alice {n}")).startswith("250 2.0.0")
    assert asyncio.run(send(port, "Bob@Lab.Test", "for bob")).startswith("250 2.0.0")
    wait_rows(db_path, 3)

    listing = mta("mailbox", "list", "--config", str(config))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["Mailbox", "Messages", "Size", "Newest"]
    assert [line.split()[:2] for line in lines[1:]] == [["alice@lab.test", "2"], ["bob@lab.test", "1"]]

    one = mta("mailbox", "list", "ALICE@lab.test", "--config", str(config))
    assert one.returncode == 0
    out = one.stdout.splitlines()
    assert out[0].startswith("alice@lab.test: 2 messages, ")
    assert out[2].split()[0] == "1" and out[2].endswith("<tester@example.test> for alice 0")
    assert out[3].split()[0] == "2" and out[3].endswith("<tester@example.test> for alice 1")

    as_json = [json.loads(line) for line in
               mta("mailbox", "list", "alice@lab.test", "--json", "--config", str(config)).stdout.splitlines()]
    assert [(m["number"], m["subject"], m["sender"]) for m in as_json] == [
        (1, "for alice 0", "tester@example.test"), (2, "for alice 1", "tester@example.test")]
    assert all(m["uidl"] == f"{m['queue_id']}.{m['uidl'].split('.')[1]}" for m in as_json)
    with sqlite3.connect(db_path) as db:
        sizes = [r[0] for r in db.execute("SELECT size FROM mailbox_messages WHERE mailbox = 'alice@lab.test'"
                                          " ORDER BY id")]
    assert [m["size"] for m in as_json] == sizes

    purged = mta("mailbox", "purge", "alice@lab.test", "--config", str(config))
    assert (purged.returncode, purged.stdout) == (0, "alice@lab.test: 2 messages removed\n")
    wait_rows(db_path, 1)
    assert mta("mailbox", "list", "alice@lab.test", "--config", str(config)).stdout == "alice@lab.test: no messages\n"
    rest = mta("mailbox", "list", "--config", str(config)).stdout.splitlines()
    assert [line.split()[:2] for line in rest[1:]] == [["bob@lab.test", "1"]]


def test_mailbox_commands_without_a_queue_file(tmp_path):
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump({"queue": {"path": str(tmp_path / "none.db")}}))
    result = mta("mailbox", "list", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr == f"mta: mailbox: {tmp_path / 'none.db'}: no queue database (has the daemon run?)\n"
    assert mta("mailbox", "purge", "--config", str(path)).returncode == 2   # USER is required


def test_mailbox_show_prints_one_message_by_number_or_uidl(daemon):
    config, port, users, db_path = daemon
    assert asyncio.run(send(port, "alice@lab.test", "first")).startswith("250")
    assert asyncio.run(send(port, "alice@lab.test", "second")).startswith("250")
    wait_rows(db_path, 2)
    with sqlite3.connect(db_path) as db:
        stored = db.execute("SELECT data FROM mailbox_messages ORDER BY received, id").fetchall()
    listing = [json.loads(line) for line in mta("mailbox", "list", "alice@lab.test", "--json",
                                                "--config", str(config)).stdout.splitlines()]
    by_number = mta("mailbox", "show", "alice@lab.test", "2", "--config", str(config))
    assert (by_number.returncode, by_number.stderr) == (0, "")
    assert by_number.stdout == stored[1][0].decode().replace("\r\n", "\n")
    assert by_number.stdout.startswith("Return-Path: <tester@example.test>\n")
    assert "Subject: second\n" in by_number.stdout
    by_uidl = mta("mailbox", "show", "ALICE@lab.test", listing[0]["uidl"], "--config", str(config))
    assert by_uidl.returncode == 0 and "Subject: first\n" in by_uidl.stdout
    missing = mta("mailbox", "show", "alice@lab.test", "3", "--config", str(config))
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "mta mailbox show: alice@lab.test: no message 3 (2 messages)\n"


def test_purge_of_an_unknown_mailbox_exits_1(daemon):
    config, port, users, db_path = daemon
    result = mta("mailbox", "purge", "nobody@lab.test", "--config", str(config))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "mta mailbox purge: nobody@lab.test: no such mailbox\n"
    empty = mta("mailbox", "purge", "alice@lab.test", "--config", str(config))   # known, but empty
    assert (empty.returncode, empty.stdout) == (0, "alice@lab.test: 0 messages removed\n")
