"""Relay permission (no open relay) and submission AUTH, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time

import pytest

from tests.support.in_process import listener_port, running
from tests.support.ports import free_port
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(60)

OUTSIDE = ("127.0.0.9", 0)  # a client address not in mynetworks below


def relay_config(make_config):
    return make_config(mynetworks=["127.0.0.1/32"], relay_domains=["ourhost.test"])


async def rcpt_reply(port, sender, rcpt, local_addr=OUTSIDE):
    async with await Wire.connect("127.0.0.1", port, local_addr=local_addr) as w:
        await w.ehlo("outside.test")
        assert (await w.cmd(f"MAIL FROM:<{sender}>")).startswith("250"), sender
        return await w.cmd(f"RCPT TO:<{rcpt}>")


OPEN_RELAY_TRICKS = [
    "user@remote.test",
    '"user@remote.test"',
    '"user@remote.test"@ourhost.test',
    "user%remote.test@ourhost.test",
    "remote.test!user",
    "remote.test!user@ourhost.test",
    "@ourhost.test:user@remote.test",
    "user@remote.test@ourhost.test",
    "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]",
    "user@remote.test.",
    "user",
]


@pytest.mark.parametrize("sender", ["", "x@remote.test", "ourhost.test!x"])
@pytest.mark.parametrize("rcpt", OPEN_RELAY_TRICKS)
async def test_no_open_relay(make_config, sender, rcpt):
    """Every trick, with every sender, is refused at RCPT with exactly 554 5.7.1 (naming
    the address, as Postfix does).

    For an untrusted client relay permission is decided before syntax: anything that
    is not a plain local@relay_domain gets the relay refusal, even when it is also
    malformed (user@remote@ourhost, a quoted "user@remote" without a domain).

    The domainless sender <ourhost.test!x> is accepted at MAIL, as Postfix does
    (reject_non_fqdn_sender is not a default) and qualified with our hostname
    (append_at_myorigin); the RCPT check is what keeps the relay closed.
    """
    config = relay_config(make_config)
    async with running(config):
        port = listener_port(config)
        async with await Wire.connect("127.0.0.1", port, local_addr=OUTSIDE) as w:
            await w.ehlo("outside.test")
            assert await w.cmd(f"MAIL FROM:<{sender}>") == "250 2.1.0 Ok"
            shown = rcpt.rpartition(":")[2] if rcpt.startswith("@") else rcpt   # a source route is dropped
            assert await w.cmd(f"RCPT TO:<{rcpt}>") == f"554 5.7.1 <{shown}>: Relay access denied", rcpt
            assert await w.cmd("DATA") == "503 5.5.1 Error: need RCPT command"
    with sqlite3.connect(config.queue.path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


async def test_outsider_may_send_to_relay_domains(make_config):
    config = relay_config(make_config)
    async with running(config):
        port = listener_port(config)
        assert await rcpt_reply(port, "x@remote.test", "user@ourhost.test") == "250 2.1.5 Ok"
        assert await rcpt_reply(port, "x@remote.test", "user@OURHOST.test") == "250 2.1.5 Ok"
        assert await rcpt_reply(port, "x@remote.test", "user@other.test") == \
            "554 5.7.1 <user@other.test>: Relay access denied"


async def test_domainless_sender_is_qualified_with_our_hostname(make_config):
    """Postfix's append_at_myorigin: <root> from a lab machine becomes root@<hostname>."""
    config = relay_config(make_config)
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        reply = await w.mail("root", ["user@remote.test"], b"Subject: cron\r\n\r\nx\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as"), reply
        assert await w.cmd("MAIL FROM:<host!user>") == "250 2.1.0 Ok"
    with sqlite3.connect(config.queue.path) as db:
        assert db.execute("SELECT sender FROM messages").fetchall() == [("root@relay.lab.test",)]


async def test_mynetworks_may_relay_anywhere(make_config):
    config = relay_config(make_config)
    async with running(config):
        port = listener_port(config)
        assert await rcpt_reply(port, "a@lab.test", "user@remote.test", local_addr=None) == "250 2.1.5 Ok"


async def test_swaks_relay_denied_and_accepted(make_config, tmp_path):
    import shutil
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed")
    config = relay_config(make_config)
    async with running(config):
        port = listener_port(config)
        proc = await asyncio.create_subprocess_exec(
            "swaks", "--server", f"127.0.0.1:{port}", "--from", "lab@lab.test", "--to", "bob@remote.test",
            "--helo", "labhost.test", "--body", "swaks body", "--header", "Subject: via swaks",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        text = out.decode()
        assert proc.returncode == 0, text
        assert "<-  250 2.1.5 Ok" in text
        assert "<-  250 2.0.0 Ok: queued as " in text
        assert "<-  221 2.0.0 Bye" in text
    with sqlite3.connect(config.queue.path) as db:
        sender, data = db.execute(
            "SELECT m.sender, b.data FROM messages m JOIN bodies b ON b.message_id = m.id").fetchone()
    assert sender == "lab@lab.test"
    assert b"Subject: via swaks\r\n" in data and b"\r\n\r\nswaks body\r\n" in data
    assert data.startswith(b"Received: from labhost.test (localhost [127.0.0.1])\r\n")


# ----------------------------------------------------------------------------- submission / AUTH

def submission_config(make_config, users_file, **listener):
    lc = {"name": "submission", "address": f"127.0.0.1:{free_port()}", "mode": "submission"}
    lc.update(listener)
    return make_config(listeners=[lc], auth={"users_file": str(users_file)})


def keywords(ehlo_lines):
    return [line[4:] for line in ehlo_lines[1:]]


def plain(user, password):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def test_submission_requires_auth(make_config, users_file):
    config = submission_config(make_config, users_file, allow_insecure_auth=True)
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config, "submission")) as w:
        lines = await w.ehlo()
        assert "AUTH LOGIN PLAIN" in keywords(lines)
        assert await w.cmd("MAIL FROM:<alice@lab.test>") == "530 5.7.0 Authentication required"
        assert await w.cmd("AUTH PLAIN " + plain("alice", "wrong")) == \
                "535 5.7.8 Error: authentication failed"
        assert await w.cmd("MAIL FROM:<alice@lab.test>") == "530 5.7.0 Authentication required"
        assert await w.cmd("AUTH PLAIN " + plain("alice", "s3cret pass")) == \
                "235 2.7.0 Authentication successful"
        assert await w.cmd("AUTH PLAIN " + plain("alice", "s3cret pass")) == \
                "503 5.5.1 Already authenticated"
        # An authenticated client may relay anywhere.
        assert await w.cmd("MAIL FROM:<alice@lab.test>") == "250 2.1.0 Ok"
        assert await w.cmd("RCPT TO:<bob@anywhere.example>") == "250 2.1.5 Ok"
        await w.cmd("DATA")
        await w.send(b"Subject: no id\r\n\r\nbody\r\n.")
        assert (await w.reply())[-1].startswith("250 2.0.0 Ok: queued as")
    with sqlite3.connect(config.queue.path) as db:
        data, listener = db.execute("SELECT b.data, m.listener FROM messages m JOIN bodies b ON b.message_id = m.id").fetchone()
    head = data.split(b"\r\n\r\n")[0]
    assert listener == "submission"
    assert b"with ESMTPA id" in head
    # The MSA added what the author left out (RFC 6409 §8).
    assert b"\r\nMessage-ID: <" in head and b"@relay.lab.test>" in head
    assert b"\r\nDate: " in head


async def test_submission_keeps_existing_message_id(make_config, users_file):
    config = submission_config(make_config, users_file, allow_insecure_auth=True)
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config, "submission")) as w:
        await w.ehlo()
        await w.cmd("AUTH PLAIN " + plain("alice", "s3cret pass"))
        await w.cmd("MAIL FROM:<alice@lab.test>")
        await w.cmd("RCPT TO:<bob@anywhere.example>")
        await w.cmd("DATA")
        await w.send(b"Message-ID: <keep@me>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n.")
        await w.reply()
    with sqlite3.connect(config.queue.path) as db:
        data = db.execute("SELECT data FROM bodies").fetchone()[0]
    assert data.count(b"Message-ID:") == 1 and data.count(b"\r\nDate:") == 1


async def test_auth_login(make_config, users_file):
    config = submission_config(make_config, users_file, allow_insecure_auth=True)
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config, "submission")) as w:
        await w.ehlo()
        assert await w.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
        assert await w.cmd(base64.b64encode(b"alice").decode()) == "334 UGFzc3dvcmQ6"
        assert await w.cmd(base64.b64encode(b"s3cret pass").decode()) == "235 2.7.0 Authentication successful"


async def test_auth_mechanism_names_ignore_case(make_config, users_file):
    config = submission_config(make_config, users_file, allow_insecure_auth=True)
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config, "submission")) as w:
        await w.ehlo()
        assert await w.cmd("AUTH") == "501 5.5.4 Not enough value"
        assert await w.cmd("auth login") == "334 VXNlcm5hbWU6"
        assert await w.cmd("*") == "501 5.7.0 Auth aborted"
        assert await w.cmd("AUTH Plain " + plain("alice", "s3cret pass")) == \
                "235 2.7.0 Authentication successful"


async def test_auth_garbage(make_config, users_file):
    config = submission_config(make_config, users_file, allow_insecure_auth=True)
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config, "submission")) as w:
        await w.ehlo()
        assert await w.cmd("AUTH PLAIN !!!notbase64") == "501 5.5.2 Cannot decode base64"
        assert await w.cmd("AUTH CRAM-MD5") == "504 5.5.4 Unrecognized authentication type"
        assert await w.cmd("AUTH PLAIN " + base64.b64encode(b"no-nuls").decode()) == \
                "501 5.5.2 Cannot decode AUTH PLAIN response"
        assert await w.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
        assert await w.cmd("*") == "501 5.7.0 Auth aborted"
        assert await w.cmd("NOOP") == "250 2.0.0 OK"


async def test_repeated_auth_failures_are_delayed(make_config, users_file):
    config = submission_config(make_config, users_file, allow_insecure_auth=True)
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config, "submission")) as w:
        await w.ehlo()
        timings = []
        for _ in range(5):
            start = time.monotonic()
            assert (await w.cmd("AUTH PLAIN " + plain("alice", "guess"), timeout=20)).startswith("535 5.7.8")
            timings.append(time.monotonic() - start)
    # Three free failures, then the delay grows (1 s, 2 s): guessing slows down.
    assert max(timings[:3]) < 0.9
    assert timings[3] >= 0.9 and timings[4] >= 1.9


async def test_auth_needs_tls_unless_allowed(make_config, users_file, tls_cert):
    cert, key, client_ctx = tls_cert
    config = submission_config(make_config, users_file, tls={"cert": cert, "key": key})
    async with running(config):
        port = listener_port(config, "submission")
        async with await Wire.connect("127.0.0.1", port) as w:
            lines = await w.ehlo()
            assert "STARTTLS" in keywords(lines) and not any("AUTH" in line for line in lines)
            assert await w.cmd("AUTH PLAIN " + plain("alice", "s3cret pass")) == \
                "538 5.7.11 Encryption required for requested authentication mechanism"
            assert await w.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
            await w.writer.start_tls(client_ctx, server_hostname="relay.lab.test")
            lines = await w.ehlo()
            assert "AUTH LOGIN PLAIN" in keywords(lines) and "250-STARTTLS" not in lines
            assert await w.cmd("AUTH PLAIN " + plain("alice", "s3cret pass")) == \
                "235 2.7.0 Authentication successful"
            reply = await w.mail("alice@lab.test", ["b@example.org"], b"Subject: t\r\n\r\nx\r\n", ehlo=False)
            assert reply.startswith("250 2.0.0 Ok")
    with sqlite3.connect(config.queue.path) as db:
        assert b"with ESMTPSA id" in db.execute("SELECT data FROM bodies").fetchone()[0]


async def test_starttls_plaintext_injection_is_discarded(make_config, users_file, tls_cert):
    """CVE-2011-0411: a command sent with STARTTLS in one write is not answered inside TLS."""
    cert, key, client_ctx = tls_cert
    config = submission_config(make_config, users_file, tls={"cert": cert, "key": key})
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config, "submission")) as w:
        await w.ehlo()
        await w.send(b"STARTTLS\r\nRSET")
        assert await w.reply() == ["220 2.0.0 Ready to start TLS"]
        await w.writer.start_tls(client_ctx, server_hostname="relay.lab.test")
        assert await w.cmd("NOOP") == "250 2.0.0 OK"  # the first reply inside TLS answers NOOP


async def test_implicit_tls(make_config, users_file, tls_cert):
    cert, key, client_ctx = tls_cert
    config = submission_config(make_config, users_file, tls={"cert": cert, "key": key, "implicit": True})
    async with running(config):
        w = await Wire.connect("127.0.0.1", listener_port(config, "submission"), ssl_context=client_ctx)
        lines = await w.ehlo()
        assert "AUTH LOGIN PLAIN" in keywords(lines) and "250-STARTTLS" not in lines
        assert await w.cmd("AUTH PLAIN " + plain("alice", "s3cret pass")) == "235 2.7.0 Authentication successful"
        await w.close()


async def test_relay_listener_without_users_offers_no_auth(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        lines = await w.ehlo()
        assert not any("AUTH" in line for line in lines)


@pytest.mark.parametrize("offer", [True, False])
async def test_dsn_for_untrusted_clients_follows_the_key(make_config, offer):
    """dsn.offer_to_untrusted: false is Postfix's smtpd_discard_ehlo_keywords = dsn for clients
    neither in mynetworks nor authenticated; a trusted client keeps DSN either way."""
    untrusted = make_config(mynetworks=["10.0.0.0/8"], relay_domains=["lab.example"],
                            dsn={"offer_to_untrusted": offer})
    async with running(untrusted), await Wire.connect("127.0.0.1", listener_port(untrusted)) as w:
        assert ("DSN" in keywords(await w.ehlo())) is offer
        mail = await w.cmd("MAIL FROM:<a@outside.test> RET=FULL ENVID=x1")
        if offer:
            assert mail == "250 2.1.0 Ok"
            assert await w.cmd("RCPT TO:<b@lab.example> NOTIFY=SUCCESS") == "250 2.1.5 Ok"
        else:
            assert mail == "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
            assert await w.cmd("MAIL FROM:<a@outside.test>") == "250 2.1.0 Ok"
            assert await w.cmd("RCPT TO:<b@lab.example> NOTIFY=SUCCESS") == \
                    "555 5.5.4 RCPT TO parameters not recognized or not implemented"
            assert await w.cmd("RCPT TO:<b@lab.example>") == "250 2.1.5 Ok"
    trusted = make_config(dsn={"offer_to_untrusted": offer})   # 127.0.0.0/8 is in the default mynetworks
    async with running(trusted), await Wire.connect("127.0.0.1", listener_port(trusted)) as w:
        assert "DSN" in keywords(await w.ehlo())
        assert await w.cmd("MAIL FROM:<a@lab.test> RET=FULL") == "250 2.1.0 Ok"
        assert await w.cmd("RCPT TO:<b@example.org> NOTIFY=SUCCESS") == "250 2.1.5 Ok"
