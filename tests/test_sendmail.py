"""sendmail(1): `mta sendmail` as cron, mail(1) and scripts call it, against a real daemon.

The daemon is a real `mta serve` process; its smarthost is a recording SMTP peer
on 127.0.0.2, so each test checks the bytes that leave the relay. Debian's
bsd-mailx `mail` calls /usr/sbin/sendmail by its fixed path: that test binds our
wrapper over that path in a private mount namespace (root and unshare needed).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mta.sendmail import Options, UsageError, parse_args
from tests.support.daemon import mta_command, start_daemon, subprocess_env, wait_listening
from tests.support.ports import free_port
from tests.support.smtp_peer import RecordingPeer

pytestmark = pytest.mark.timeout(60)


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("argv, expected", [
    (["bob@example.org"], Options(recipients=["bob@example.org"])),
    (["-t", "-i"], Options(extract=True, dots_end_input=False)),
    (["-ti"], Options(extract=True, dots_end_input=False)),
    (["-oi", "-f", "ci@lab.test", "a@x.test", "b@x.test"],
     Options(recipients=["a@x.test", "b@x.test"], dots_end_input=False, sender="ci@lab.test")),
    (["-fci@lab.test", "-FCron Daemon", "--", "-odd@x.test"],
     Options(recipients=["-odd@x.test"], sender="ci@lab.test", full_name="Cron Daemon")),
    # Debian cron: sendmail -FCronDaemon -i -B8BITMIME -oem root
    (["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
     Options(recipients=["root"], full_name="CronDaemon", dots_end_input=False)),
    (["-f", "<>", "x@y.test"], Options(recipients=["x@y.test"], sender="")),
    (["-bs"], Options(mode="s")), (["-bp"], Options(mode="p")), (["-q"], Options(mode="q")),
    (["-q30m"], Options(mode="q")),
    (["-N", "success,failure", "-R", "hdrs", "-V", "env1", "a@x.test"],
     Options(recipients=["a@x.test"], notify="SUCCESS,FAILURE", ret="HDRS", envid="env1")),
    (["-C", "/etc/mta/other.yaml", "-v", "a@x.test"], Options(recipients=["a@x.test"], config="/etc/mta/other.yaml")),
])
def test_options_as_postfix_sendmail_takes_them(argv, expected):
    assert parse_args(argv) == expected


@pytest.mark.parametrize("argv, message", [
    (["-Z"], "invalid option -- 'Z'"),
    (["-f"], "option requires an argument -- 'f'"),
    (["-bd"], "-bd is not supported (use -bm, -bs or -bp)"),
])
def test_bad_options(argv, message):
    with pytest.raises(UsageError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        parse_args(argv)


# ----------------------------------------------------------------------------- the daemon

@pytest.fixture
def relay(tmp_path, write_config):
    """(config path, SMTP port, smarthost port): a relay whose smarthost is 127.0.0.2."""
    port, peer_port = free_port(), free_port("127.0.0.2")
    path = write_config({
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{port}", "mode": "relay"}],
        "queue": {"path": str(tmp_path / "queue.db")},
        "metrics": {"address": None},
        "delivery": {"smarthost": f"127.0.0.2:{peer_port}",
                     "retry": {"min_backoff": "200ms", "max_backoff": "1s"}},
    })
    return path, port, peer_port


def sendmail(config_path: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(mta_command("sendmail", *args), input=stdin, capture_output=True, timeout=30,
                          env=subprocess_env(MTA_CONFIG=str(config_path)))


@pytest.fixture
async def daemon(relay, tmp_path):
    config_path, port, _ = relay
    proc = start_daemon(config_path, tmp_path / "mta.log")
    try:
        await wait_listening(port, proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait(20)


def header(data: bytes, name: str) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return [line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith(name.lower() + ":")]


async def test_cron_style_t_i_with_daemon_up(relay, daemon):
    """As cron calls it (-FCronDaemon -i ... plus -t): recipients from To/Cc/Bcc, Bcc removed,
    From/Date/Message-ID added, a lone '.' kept with -i, and the bytes reach the next hop."""
    config_path, _, peer_port = relay
    message = (b"To: Bob <bob@example.org>\nCc: carol@example.net\nBcc: secret@example.com\n"
               b"Subject: cron output\n\nline one\n.\nline three\n")
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        done = await asyncio.to_thread(sendmail, config_path, "-FCronDaemon", "-i", "-t", "-f", "root@relay.lab.test",
                                       stdin=message)
        assert (done.returncode, done.stderr) == (0, b"")
        [received] = await peer.wait_for_messages(1, timeout=15)
    assert received.sender == "root@relay.lab.test"
    assert sorted(received.rcpts) == ["bob@example.org", "carol@example.net", "secret@example.com"]
    data = received.data
    assert header(data, "Bcc") == []
    assert header(data, "From") == ["CronDaemon <root@relay.lab.test>"]
    assert len(header(data, "Date")) == 1 and len(header(data, "Message-ID")) == 1
    assert data.endswith(b"\r\n\r\nline one\r\n.\r\nline three\r\n")


async def test_a_lone_dot_ends_input_without_i(relay, daemon):
    config_path, _, peer_port = relay
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        done = await asyncio.to_thread(sendmail, config_path, "bob@example.org",
                                       stdin=b"Subject: s\n\nkept\n.\nnot sent\n")
        assert done.returncode == 0, done.stderr
        [received] = await peer.wait_for_messages(1, timeout=15)
    assert received.data.endswith(b"\r\n\r\nkept\r\n") and b"not sent" not in received.data


async def test_daemon_down_enqueues_directly_and_the_daemon_delivers_later(relay, daemon, tmp_path):
    config_path, port, peer_port = relay
    daemon.terminate()
    assert daemon.wait(20) == 0
    done = await asyncio.to_thread(sendmail, config_path, "-f", "ci@lab.test", "bob@example.org",
                                   stdin=b"Subject: while down\n\nbody\n")
    assert (done.returncode, done.stderr) == (0, b"")
    with sqlite3.connect(tmp_path / "queue.db") as db:
        assert db.execute("SELECT m.sender, r.address, r.state FROM messages m JOIN recipients r"
                          " ON r.message_id = m.id").fetchall() == [("ci@lab.test", "bob@example.org", "queued")]
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        proc = start_daemon(config_path, tmp_path / "mta2.log")
        try:
            await wait_listening(port, proc)
            [received] = await peer.wait_for_messages(1, timeout=15)
        finally:
            proc.terminate()
            proc.wait(20)
    assert received.rcpts == ["bob@example.org"]
    assert received.data.startswith(b"Received: by relay.lab.test (mta sendmail, from userid ")
    assert header(received.data, "Subject") == ["while down"]


async def test_daemon_down_and_no_queue_is_ex_tempfail(relay):
    config_path, port, _ = relay   # the daemon never ran: no queue file
    done = await asyncio.to_thread(sendmail, config_path, "bob@example.org", stdin=b"Subject: x\n\nbody\n")
    assert done.returncode == 75
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"sendmail: mail system unavailable: nothing listens on 127.0.0.1:{port}, "
                               f"and the queue ")


async def test_no_recipients_is_ex_dataerr(relay, daemon):
    config_path, _, _ = relay
    done = await asyncio.to_thread(sendmail, config_path, "-t", stdin=b"Subject: nobody\n\nbody\n")
    assert done.returncode == 65
    assert done.stderr == b"sendmail: no recipients: give them as arguments, or use -t with To:, Cc: or Bcc:\n"


async def test_bs_is_an_smtp_session_on_stdio(relay, daemon):
    config_path, _, peer_port = relay
    session = (b"EHLO script.test\r\nMAIL FROM:<ci@lab.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
               b"Subject: bs\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        done = await asyncio.to_thread(sendmail, config_path, "-bs", stdin=session)
        [received] = await peer.wait_for_messages(1, timeout=15)
    replies = [line[:3] for line in done.stdout.decode().split("\r\n") if line[3:4] == " "]
    assert replies == ["220", "250", "250", "250", "354", "250", "221"]
    assert done.returncode == 0
    assert received.rcpts == ["bob@example.org"]


async def test_bp_lists_the_queue_like_mta_queue_list(relay, daemon, tmp_path):
    config_path, _, _ = relay   # nobody listens at the smarthost: the mail stays deferred
    assert (await asyncio.to_thread(sendmail, config_path, "bob@example.org", stdin=b"Subject: q\n\nb\n")).returncode == 0
    listing = subprocess.run(mta_command("queue", "list", "--config", str(config_path)), capture_output=True,
                             timeout=30, env=subprocess_env())
    bp = await asyncio.to_thread(sendmail, config_path, "-bp")
    assert bp.returncode == 0 and b"bob@example.org" in bp.stdout
    assert bp.stdout.splitlines()[0] == listing.stdout.splitlines()[0]


UNSHARE = shutil.which("unshare")
MAIL = shutil.which("mail")


@pytest.mark.skipif(os.geteuid() != 0 or UNSHARE is None or MAIL is None or not os.path.exists("/usr/sbin/sendmail"),
                    reason="needs root, unshare, bsd-mailx's mail and a /usr/sbin/sendmail to bind over")
async def test_bsd_mailx_mail_through_our_sendmail(relay, daemon, tmp_path):
    """Debian's mail(1) runs /usr/sbin/sendmail; in a private mount namespace that path is ours."""
    config_path, _, peer_port = relay
    wrapper = tmp_path / "sendmail"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m mta sendmail \"$@\"\n")
    wrapper.chmod(0o755)
    script = f"mount --bind {wrapper} /usr/sbin/sendmail && exec {MAIL} -s 'from mailx' bob@example.org"
    async with RecordingPeer("127.0.0.2", peer_port) as peer:
        done = await asyncio.to_thread(
            subprocess.run, [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", script],
            input=b"body from mail(1)\n", capture_output=True, timeout=30,
            env=subprocess_env(MTA_CONFIG=str(config_path)))
        assert done.returncode == 0, done.stderr
        [received] = await peer.wait_for_messages(1, timeout=15)
    assert received.rcpts == ["bob@example.org"]
    assert header(received.data, "Subject") == ["from mailx"]
    assert header(received.data, "To") == ["bob@example.org"]
    assert received.data.endswith(b"\r\n\r\nbody from mail(1)\r\n")


@pytest.mark.parametrize("raw, expected", [
    # `echo text | sendmail user`: no header at all; the added fields go first, the text is the body.
    (b"hello body only\n", b"From: me@x.test\r\nDATE\r\nMSGID\r\n\r\nhello body only\r\n"),
    (b"", b"From: me@x.test\r\nDATE\r\nMSGID\r\n\r\n"),
    (b"Subject: s\n folded\nTo: a@b.test\n\nbody\n",
     b"Subject: s\r\n folded\r\nTo: a@b.test\r\nFrom: me@x.test\r\nDATE\r\nMSGID\r\n\r\nbody\r\n"),
    (b"Subject: s\nnot a field\nmore\n", b"Subject: s\r\nFrom: me@x.test\r\nDATE\r\nMSGID\r\n\r\nnot a field\r\nmore\r\n"),
])
def test_prepare_reads_the_header_as_postfix_cleanup_does(raw, expected):
    from mta.sendmail import prepare
    data, rcpts = prepare(raw, Options(recipients=["a@b.test"]), "me@x.test", "x.test", 0.0, "Q1")
    date = b"Date: " + email.utils.formatdate(0.0, localtime=True).encode()
    assert data == expected.replace(b"DATE", date).replace(b"MSGID", b"Message-ID: <19700101000000.Q1@x.test>")
    assert rcpts == ["a@b.test"]
