"""Send through SMTP, fetch over POP3 with two real clients (Python's poplib and
Ruby's Net::POP3), compare the bytes; deletions reach the queue database."""

from __future__ import annotations

import asyncio
import poplib
import shutil
import sqlite3
import subprocess
import time

import pytest

from mta.passwords import set_password
from tests.support.in_process import listener_port, running
from tests.support.ports import free_port
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(60)

# Lines that POP3 must byte-stuff (RFC 1939 §3) and SMTP must have unstuffed on the way in.
BODIES = [
    b"From: ci@lab.test\r\nTo: alice@lab.test\r\nSubject: first\r\n\r\nhello\r\n.\r\n..two dots\r\nend\r\n",
    b"From: ci@lab.test\r\nSubject: second\r\n\r\n" + b"x" * 998 + b"\r\n" + b"line\r\n" * 2000,
]


@pytest.fixture
def lab(make_config, tmp_path):
    users = tmp_path / "mailboxes.users"
    set_password(users, "alice@lab.test", "s3cret")
    set_password(users, "bob@lab.test", "hunter2")
    pop3 = {"name": "pop3", "address": f"127.0.0.1:{free_port()}", "mode": "pop3", "allow_insecure_auth": True}
    smtp = {"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"}
    return make_config(listeners=[smtp, pop3], local_domains=["lab.test"],
                       mailboxes={"users_file": str(users)})


def mailbox_rows(config):
    with sqlite3.connect(config.queue.path) as db:
        return db.execute("SELECT mailbox, data FROM mailbox_messages ORDER BY id").fetchall()


async def deliver_all(config, bodies, rcpt="alice@lab.test"):
    async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        for body in bodies:
            stuffed = body.replace(b"\r\n.", b"\r\n..")
            assert (await w.mail("ci@lab.test", [rcpt], stuffed, ehlo=False)).startswith("250 2.0.0")
    deadline = time.monotonic() + 10
    while len(mailbox_rows(config)) < len(bodies):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    return [data for _, data in mailbox_rows(config)]


def fetch_with_poplib(port, user, password, delete=False):
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        pop.user(user)
        pop.pass_(password)
        count, total = pop.stat()
        uidl = pop.uidl()[1]   # before any DELE: deleted messages are not listed (RFC 1939 §7)
        messages = []
        for n in range(1, count + 1):
            _, lines, octets = pop.retr(n)
            data = b"".join(line + b"\r\n" for line in lines)
            assert octets == len(data)   # poplib counts the octets it read, less the stuffing
            messages.append(data)
            if delete:
                pop.dele(n)
        return count, total, messages, uidl
    finally:
        pop.quit()


async def test_smtp_in_poplib_out_same_bytes(lab):
    config = lab
    port = listener_port(config, "pop3")
    async with running(config, deliver=True) as app:
        stored = await deliver_all(config, BODIES)
        # Each stored copy is the submitted message with the trace fields on top.
        for body, data in zip(BODIES, stored, strict=True):
            assert data.startswith(b"Return-Path: <ci@lab.test>\r\nX-Original-To: alice@lab.test\r\n"
                                   b"Delivered-To: alice@lab.test\r\nReceived: ")
            assert data.endswith(body)
        count, total, fetched, uidl = await asyncio.to_thread(fetch_with_poplib, port, "alice@lab.test", "s3cret")
        assert (count, total) == (2, sum(len(d) for d in stored))
        assert fetched == stored
        # The same again: UIDL is stable across sessions.
        _, _, _, uidl_again = await asyncio.to_thread(fetch_with_poplib, port, "alice@lab.test", "s3cret", True)
        assert uidl_again == uidl
        assert mailbox_rows(config) == []   # deleted at QUIT
        count, total, _, _ = await asyncio.to_thread(fetch_with_poplib, port, "bob@lab.test", "hunter2")
        assert (count, total) == (0, 0)
        with pytest.raises(poplib.error_proto):
            await asyncio.to_thread(fetch_with_poplib, port, "bob@lab.test", "wrong")
        # What Prometheus would scrape: three logins, one failure, 2 + 2 RETRs, 2 deletions.
        scraped = app.metrics.render().decode().splitlines()
        assert [line for line in scraped if line.startswith("mta_pop3_") and "_created" not in line] == [
            'mta_pop3_logins_total{listener="pop3",result="ok"} 3.0',
            'mta_pop3_logins_total{listener="pop3",result="failed"} 1.0',
            'mta_pop3_logins_total{listener="pop3",result="in_use"} 0.0',
            'mta_pop3_messages_retrieved_total{listener="pop3"} 4.0',
            'mta_pop3_messages_deleted_total{listener="pop3"} 2.0',
        ]
        assert 'mta_messages_received_total{listener="pop3"}' not in "\n".join(scraped)


RUBY_FETCH = r"""
require "net/pop"
port, user, pass, delete = ARGV[0].to_i, ARGV[1], ARGV[2], ARGV[3] == "delete"
Net::POP3.start("127.0.0.1", port, user, pass) do |pop|
  STDOUT.binmode
  pop.mails.each do |m|
    data = m.pop
    STDOUT.write([m.number, m.unique_id, m.length, data.bytesize].join(" ") + "\n" + data)
    m.delete if delete
  end
end
"""


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby (Debian package ruby) is not installed")
async def test_smtp_in_ruby_net_pop_out_same_bytes(lab, tmp_path):
    config = lab
    port = listener_port(config, "pop3")
    script = tmp_path / "fetch.rb"
    script.write_text(RUBY_FETCH)

    def ruby(*args):
        done = subprocess.run(["ruby", str(script), str(port), *args], capture_output=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr.decode()
        out, messages = done.stdout, []
        while out:
            head, _, out = out.partition(b"\n")
            number, uid, length, size = head.decode().split(" ")
            messages.append((int(number), uid, int(length), out[:int(size)]))
            out = out[int(size):]
        return messages

    async with running(config, deliver=True):
        stored = await deliver_all(config, BODIES)
        first = await asyncio.to_thread(ruby, "alice@lab.test", "s3cret", "keep")
        assert [m[3] for m in first] == stored      # byte for byte, after Net::POP3 unstuffs
        assert [m[2] for m in first] == [len(d) for d in stored]   # LIST sizes are the real octet counts
        second = await asyncio.to_thread(ruby, "ALICE@lab.test", "s3cret", "delete")
        assert [m[1] for m in second] == [m[1] for m in first]    # UIDL stable
        assert mailbox_rows(config) == []
