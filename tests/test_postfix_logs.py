"""The daemon's log lines as Postfix's log parsers read them.

A real `mta serve` writes its log to a file (stderr, RFC 3339 stamps); lab
clients send mail that is delivered, deferred, bounced and refused; then the
exact lines are checked, and Debian's pflogsumm (run with --syslog-name=mta)
must count what happened.
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mta.passwords import set_password
from tests.support.daemon import start_daemon, wait_listening
from tests.support.ports import free_port
from tests.support.smtp_peer import RecordingPeer
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(90)

PFLOGSUMM = shutil.which("pflogsumm")
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00 \S+ "


def lines(log: Path, pattern: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if re.search(pattern, line)]


async def wait_for_line(log: Path, pattern: str, timeout: float = 20.0) -> list[str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := lines(log, pattern)):
        assert asyncio.get_running_loop().time() < deadline, f"no line matching {pattern!r}:\n{log.read_text()}"
        await asyncio.sleep(0.1)
    return found


@pytest.fixture
def relay(tmp_path, write_config):
    port, submission, peer_port = free_port(), free_port(), free_port("127.0.0.2")
    users = tmp_path / "users"
    set_password(users, "alice", "s3cret")
    path = write_config({
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{port}", "mode": "relay"},
                      {"name": "submission", "address": f"127.0.0.1:{submission}", "mode": "submission",
                       "allow_insecure_auth": True}],
        "auth": {"users_file": str(users)},
        "mynetworks": ["127.0.0.1/32"],
        "relay_domains": [],
        "queue": {"path": str(tmp_path / "queue.db")},
        "metrics": {"address": None},
        "delivery": {"routes": {"example.org": f"127.0.0.2:{peer_port}",
                                "lab.example": f"127.0.0.2:{peer_port}",
                                "down.example": f"127.0.0.3:{free_port('127.0.0.3')}"},
                     "retry": {"min_backoff": "1h"}},
    })
    return path, port, submission, peer_port


async def test_log_lines_and_pflogsumm_counts(relay, tmp_path):
    config_path, port, submission, peer_port = relay
    log = tmp_path / "mta.log"

    def refuse_gone(verb, arg, conn):
        return "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown" \
            if verb == "RCPT" and "gone@" in arg else None

    async with RecordingPeer("127.0.0.2", peer_port, replies=refuse_gone) as peer:
        proc = start_daemon(config_path, log)
        try:
            await wait_listening(port, proc)
            async with await Wire.connect("127.0.0.1", port) as w:
                for n, rcpt in enumerate(["bob@example.org", "carol@example.org", "gone@example.org",
                                          "dave@down.example"]):
                    reply = await w.mail("ci@lab.example", [rcpt], f"Subject: {n}\r\n\r\nbody\r\n".encode(),
                                         ehlo=n == 0)
                    assert reply.startswith("250 2.0.0 Ok: queued as"), reply
            async with await Wire.connect("127.0.0.1", submission) as w:
                await w.ehlo("laptop.lab.example")
                plain = base64.b64encode(b"\0alice\0s3cret").decode()
                assert await w.cmd(f"AUTH PLAIN {plain}") == "235 2.7.0 Authentication successful"
                reply = await w.mail("alice@lab.example", ["erin@example.org"], b"Subject: s\r\n\r\nb\r\n", ehlo=False)
                submitted = reply.rsplit(" ", 1)[1]
            # An outsider (127.0.0.9 is not in mynetworks) may not relay.
            async with await Wire.connect("127.0.0.1", port, local_addr=("127.0.0.9", 0)) as w:
                await w.ehlo("outside.test")
                assert await w.cmd("MAIL FROM:<spam@outside.test>") == "250 2.1.0 Ok"
                assert await w.cmd("RCPT TO:<victim@elsewhere.test>") == \
                    "554 5.7.1 <victim@elsewhere.test>: Relay access denied"
            # bob, carol, erin and the bounce to ci@lab.example reach the peer.
            await peer.wait_for_messages(4, timeout=20)
            await wait_for_line(log, r"to=<dave@down\.example>.*status=deferred")
            await wait_for_line(log, r"to=<ci@lab\.example>.*status=sent")
        finally:
            proc.terminate()
            proc.wait(20)

    text = log.read_text()
    assert "Traceback" not in text
    # The exact shapes parsers look for.
    [reject] = lines(log, "NOQUEUE: reject")
    assert re.fullmatch(STAMP + r"mta/smtpd\[\d+\]: NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.9\]: "
                        r"554 5\.7\.1 <victim@elsewhere\.test>: Relay access denied; from=<spam@outside\.test> "
                        r"to=<victim@elsewhere\.test> proto=ESMTP helo=<outside\.test>", reject), reject
    [client] = lines(log, f"{submitted}: client=")
    assert re.fullmatch(STAMP + rf"mta/smtpd\[\d+\]: {submitted}: client=localhost\[127\.0\.0\.1\], "
                        r"sasl_method=PLAIN, sasl_username=alice, listener=submission", client), client
    [queued] = lines(log, f"{submitted}: from=")
    assert re.fullmatch(STAMP + rf"mta/cleanup\[\d+\]: {submitted}: from=<alice@lab\.example>, size=\d+, nrcpt=1 "
                        r"\(queue active\)", queued), queued
    [sent] = lines(log, r"to=<bob@example\.org>")
    assert re.fullmatch(STAMP + r"mta/qmgr\[\d+\]: [0-9A-F]{12}: to=<bob@example\.org>, "
                        rf"relay=127\.0\.0\.2\[127\.0\.0\.2\]:{peer_port}, delay=\d+(\.\d\d?)?, "
                        r"delays=(\d+(\.\d\d?)?/){3}\d+(\.\d\d?)?, dsn=2\.0\.0, "
                        r"status=sent \(250 2\.0\.0 Ok: queued as M\d+\)", sent), sent
    assert not re.search(r"delay=[\d.]+e[+-]", text)
    [bounced] = lines(log, r"to=<gone@example\.org>")
    assert "dsn=5.1.1, status=bounced (550 5.1.1 <gone@example.org>" in bounced

    if PFLOGSUMM is None:
        pytest.skip("pflogsumm is not installed (Debian package pflogsumm)")
    report = subprocess.run([PFLOGSUMM, "--syslog-name=mta", str(log)], capture_output=True, text=True,
                            timeout=60)
    assert report.returncode == 0, report.stderr

    def total(label: str) -> int:
        match = re.search(rf"^\s*(\d+)\s+{label}\b", report.stdout, re.M)
        assert match, f"no {label!r} in:\n{report.stdout}"
        return int(match.group(1))

    assert total("received") == 5          # 4 relayed and 1 submitted (a bounce is not received)
    assert total("delivered") == 4         # bob, carol, erin and the bounce
    assert total("deferred") == 1          # dave
    assert total("bounced") == 1           # gone
    assert total("rejected") == 1          # the outsider's RCPT
