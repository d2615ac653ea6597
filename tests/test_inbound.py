"""Inbound SMTP on real loopback sockets: replies on the wire, rows in the queue."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from mta.inbound.policy import split_dsn_params
from mta.model import Reply
from tests.support.in_process import listener_port, running
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(30)

BODY = b"Subject: hi\r\nFrom: a@lab.test\r\n\r\nhello\r\n"


def rows(config, sql, args=()):
    with sqlite3.connect(config.queue.path) as db:
        return db.execute(sql, args).fetchall()


async def test_ehlo_advertises_extensions(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        lines = await w.ehlo("client.test")
    assert lines == [
        "250-relay.lab.test",
        "250-PIPELINING",
        "250-SIZE 10000000",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-DSN",
        "250 ENHANCEDSTATUSCODES",
    ]


async def test_greeting_names_host(make_config):
    config = make_config()
    async with running(config):
        w = await Wire.connect("127.0.0.1", listener_port(config), greeting=False)
        assert (await w.reply()) == ["220 relay.lab.test ESMTP mta"]
        assert await w.cmd("QUIT") == "221 2.0.0 Bye"
        assert await w.closed()
        await w.close()


async def test_message_is_committed_before_250(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        reply = await w.mail("alice@lab.test", ["bob@example.org", "carol@example.net"], BODY)
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        queue_id = reply.rsplit(" ", 1)[1]
        # The 250 is on the wire: the rows must already be in the file, read by another connection.
        assert rows(config, "SELECT id, sender FROM messages") == [(queue_id, "alice@lab.test")]
        assert rows(config, "SELECT address, state, attempts FROM recipients ORDER BY rcpt_no") == [
            ("bob@example.org", "queued", 0), ("carol@example.net", "queued", 0)]
    data = rows(config, "SELECT data FROM bodies")[0][0]
    head, _, rest = data.partition(b"\r\n\tby relay.lab.test (mta) with ESMTP id " + queue_id.encode())
    assert head == b"Received: from client.test (localhost [127.0.0.1])"
    assert rest.startswith(b"\r\n\t(listener mta); ")
    assert data.endswith(b"\r\n" + BODY)
    assert rows(config, "PRAGMA journal_mode") == [("wal",)]


async def test_single_recipient_received_has_for_clause(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.mail("alice@lab.test", ["bob@example.org"], BODY)
    data = rows(config, "SELECT data FROM bodies")[0][0]
    assert b"\r\n\tfor <bob@example.org>; " in data.split(b"\r\n\r\n")[0]


@pytest.mark.parametrize("command, reply", [
    ("FOO bar", "500 5.5.1 Error: command not recognized"),
    ("MAIL FROM:<a@lab.test>", "503 5.5.1 Error: send HELO first"),
    ("EHLO", "501 5.5.4 Syntax: EHLO hostname"),
])
async def test_bad_commands_before_ehlo(make_config, command, reply):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        assert await w.cmd(command) == reply


async def test_bad_input_replies(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        assert await w.cmd("RCPT TO:<b@example.org>") == "503 5.5.1 Error: need MAIL command"
        assert await w.cmd("DATA") == "503 5.5.1 Error: need RCPT command"
        assert await w.cmd("MAIL FROM:a@b@c") == "553 5.1.3 Error: malformed address"
        assert await w.cmd("MAIL TO:<a@lab.test>") == \
                "501 5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"
        assert await w.cmd("MAIL FROM:<a@-bad-.test>") == "553 5.1.7 Bad sender address syntax"
        assert await w.cmd("MAIL FROM:<a@lab.test> FOO=BAR") == \
                "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
        assert await w.cmd("MAIL FROM:<a@lab.test>") == "250 2.1.0 Ok"
        assert await w.cmd("MAIL FROM:<a@lab.test>") == "503 5.5.1 Error: nested MAIL command"
        assert await w.cmd("RCPT TO:<bad address@@x>") == "553 5.1.3 Error: malformed address"
        assert await w.cmd("RCPT TO:<user@-bad-.example>") == "553 5.1.3 Bad recipient address syntax"
        assert await w.cmd("DATA extra") == "503 5.5.1 Error: need RCPT command"
        assert await w.cmd(b"\xff\xfe") == "500 5.5.2 Error: bad syntax"
        assert await w.cmd("NOOP") == "250 2.0.0 OK"
        assert await w.cmd("RSET") == "250 2.0.0 OK"
        assert await w.cmd("X" * 600) == "500 5.5.2 Error: line too long"
        assert await w.cmd("NOOP " + "n" * 600) == "500 5.5.2 Error: line too long"
        # MAIL may be longer by what its extensions add (RFC 1870 §3 etc.), not without bound.
        assert await w.cmd("MAIL FROM:<" + "a" * 1300 + "@lab.test>") == "500 5.5.2 Error: line too long"


async def test_session_survives_bad_input_and_still_queues(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        for junk in ["FOO", "MAIL FROM:<a@-bad-.test>", "X" * 2000, "RCPT TO:<x@y>"]:
            assert (await w.cmd(junk))[:1] == "5"
        reply = await w.mail("a@lab.test", ["b@example.org"], BODY, ehlo=False)
        assert reply.startswith("250 2.0.0 Ok: queued as ")
    assert len(rows(config, "SELECT id FROM messages")) == 1


async def test_too_many_recipients(make_config):
    config = make_config(limits={"max_recipients": 3})
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        await w.cmd("MAIL FROM:<a@lab.test>")
        replies = [await w.cmd(f"RCPT TO:<r{i}@example.org>") for i in range(5)]
        assert replies == ["250 2.1.5 Ok"] * 3 + ["452 4.5.3 Too many recipients"] * 2
        assert await w.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        await w.send(BODY + b".", crlf=True)
        assert (await w.reply())[-1].startswith("250 2.0.0 Ok: queued as")
    assert [r[0] for r in rows(config, "SELECT address FROM recipients ORDER BY rcpt_no")] == \
        ["r0@example.org", "r1@example.org", "r2@example.org"]


async def test_size_limit_exact_and_one_over(make_config):
    config = make_config(limits={"message_size": 2000})
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        assert await w.cmd("MAIL FROM:<a@lab.test> SIZE=2001") == \
                "552 5.3.4 Error: message size exceeds fixed maximum message size"
        head = b"Subject: s\r\n\r\n"
        exact = head + b"x" * (2000 - len(head) - 2) + b"\r\n"
        assert len(exact) == 2000
        assert (await w.mail("a@lab.test", ["b@example.org"], exact, ehlo=False)).startswith("250 ")
        # The client lies in SIZE= and sends one byte more: refused, and the session goes on.
        await w.cmd("MAIL FROM:<a@lab.test> SIZE=10")
        await w.cmd("RCPT TO:<b@example.org>")
        await w.cmd("DATA")
        await w.send(head + b"x" * (2000 - len(head) - 1) + b"\r\n.")
        assert (await w.reply())[-1] == "552 5.3.4 Message too big"
        assert await w.cmd("NOOP") == "250 2.0.0 OK"
    assert len(rows(config, "SELECT id FROM messages")) == 1


async def test_huge_message_is_refused_without_being_stored(make_config):
    config = make_config(limits={"message_size": 100_000})
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        await w.cmd("MAIL FROM:<a@lab.test>")
        await w.cmd("RCPT TO:<b@example.org>")
        await w.cmd("DATA")
        line = b"y" * 998 + b"\r\n"
        for _ in range(2000):  # 2 MB against a 100 kB limit
            w.writer.write(line)
        await w.send(b".")
        assert (await w.reply())[-1] == "552 5.3.4 Message too big"
    assert rows(config, "SELECT count(*) FROM messages") == [(0,)]


@pytest.mark.parametrize("pattern", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"])
async def test_smuggling_patterns_do_not_end_data(make_config, pattern):
    config = make_config()
    smuggled = (b"Subject: first\r\n\r\nbody" + pattern +
                b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nSubject: smuggled\r\n")
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        await w.cmd("MAIL FROM:<a@lab.test>")
        await w.cmd("RCPT TO:<b@example.org>")
        await w.cmd("DATA")
        await w.send(smuggled + b"\r\n.", crlf=True)
        replies = await w.reply()
        assert len(replies) == 1 and replies[0].startswith("250 2.0.0 Ok: queued as")
        assert await w.cmd("NOOP") == "250 2.0.0 OK"  # nothing else was answered in between
    stored = rows(config, "SELECT m.sender, b.data FROM messages m JOIN bodies b ON b.message_id = m.id")
    assert len(stored) == 1 and stored[0][0] == "a@lab.test"
    data = stored[0][1]
    assert b"MAIL FROM:<evil@evil.test>" in data  # kept as content, never a command
    # Every line end in the stored bytes is CRLF: no bare CR or LF remains.
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")


async def test_dot_stuffing_removed(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.mail("a@lab.test", ["b@example.org"], b"Subject: d\r\n\r\n..leading dot\r\n")
    assert rows(config, "SELECT data FROM bodies")[0][0].endswith(b"\r\n\r\n.leading dot\r\n")


async def test_too_many_hops(make_config):
    config = make_config()
    body = b"".join(b"Received: from x by y; Sun, 22 Nov 2026 00:00:00 +0000\r\n" for _ in range(51))
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        reply = await w.mail("a@lab.test", ["b@example.org"], body + b"Subject: loop\r\n\r\nx\r\n")
    assert reply == "554 5.4.6 Too many hops (mail loop?)"
    assert rows(config, "SELECT count(*) FROM messages") == [(0,)]


async def test_fifty_hops_still_accepted(make_config):
    config = make_config()
    body = b"".join(b"Received: from x by y; Sun, 22 Nov 2026 00:00:00 +0000\r\n" for _ in range(50))
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        reply = await w.mail("a@lab.test", ["b@example.org"], body + b"Subject: ok\r\n\r\nx\r\n")
    assert reply.startswith("250 2.0.0")


async def test_idle_client_gets_421(make_config):
    config = make_config(limits={"idle_timeout": "1s"})
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        assert await w.reply(timeout=5) == ["421 4.4.2 Error: timeout exceeded"]
        assert await w.closed()


async def test_connection_limits(make_config):
    config = make_config(limits={"max_connections_per_ip": 2, "max_connections": 3})
    async with running(config):
        port = listener_port(config)
        first = await Wire.connect("127.0.0.1", port)
        second = await Wire.connect("127.0.0.1", port)
        third = await Wire.connect("127.0.0.1", port, greeting=False)
        assert await third.reply() == ["421 4.7.0 Error: too many connections"]  # per-IP limit
        assert await third.closed()
        await third.close()
        # Another address still gets in, up to the listener's total of 3 …
        fourth = await Wire.connect("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        assert await fourth.cmd("NOOP") == "250 2.0.0 OK"
        fifth = await Wire.connect("127.0.0.1", port, local_addr=("127.0.0.3", 0), greeting=False)
        assert await fifth.reply() == ["421 4.7.0 Error: too many connections"]  # listener total
        await fifth.close()
        # … and a slot freed is a slot usable again.
        await first.close()
        await asyncio.sleep(0.2)
        again = await Wire.connect("127.0.0.1", port)
        assert await again.cmd("NOOP") == "250 2.0.0 OK"
        for w in (again, second, fourth):
            await w.close()


async def test_store_failure_answers_451_and_keeps_running(make_config):
    config = make_config()
    async with running(config) as app, await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await app.store.engine.db.execute("PRAGMA query_only = ON")  # every write now fails for real
        reply = await w.mail("a@lab.test", ["b@example.org"], BODY)
        assert reply == "451 4.3.0 Error: queue file write error"
        await app.store.engine.db.execute("PRAGMA query_only = OFF")
        reply = await w.mail("a@lab.test", ["b@example.org"], BODY, ehlo=False)
        assert reply.startswith("250 2.0.0 Ok: queued as")
    assert rows(config, "SELECT count(*) FROM messages") == [(1,)]


async def test_group_commit_batches_concurrent_sessions(make_config):
    config = make_config(limits={"max_connections_per_ip": 50})
    async with running(config) as app:
        port = listener_port(config)
        wires = [await Wire.connect("127.0.0.1", port) for _ in range(20)]
        for w in wires:
            await w.ehlo()
            await w.cmd("MAIL FROM:<a@lab.test>")
            await w.cmd("RCPT TO:<b@example.org>")
            await w.cmd("DATA")
        # All twenty end their DATA at once: fewer commits than messages.
        for w in wires:
            w.writer.write(BODY + b".\r\n")
        replies = await asyncio.gather(*(w.reply() for w in wires))
        assert all(r[-1].startswith("250 2.0.0 Ok: queued as") for r in replies)
        assert len({r[-1] for r in replies}) == 20
        assert app.store.engine.commits < 20
        for w in wires:
            await w.close()
    assert rows(config, "SELECT count(*) FROM messages") == [(20,)]


async def test_utf8_addresses_with_smtputf8(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        assert await w.cmd("MAIL FROM:<jörg@lab.test> SMTPUTF8") == "250 2.1.0 Ok"
        assert await w.cmd("RCPT TO:<zoë@exämple.org>") == "250 2.1.5 Ok"
        await w.cmd("DATA")
        await w.send("Subject: ü\r\n\r\nünïcode\r\n.".encode())
        assert (await w.reply())[-1].startswith("250 ")
    assert rows(config, "SELECT sender, smtputf8 FROM messages") == [("jörg@lab.test", 1)]
    assert rows(config, "SELECT address FROM recipients") == [("zoë@exämple.org",)]


async def test_dsn_parameters_are_stored(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        assert await w.cmd("MAIL FROM:<a@lab.test> RET=HDRS ENVID=QQ+2Bid SIZE=100") == "250 2.1.0 Ok"
        assert await w.cmd("RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.org") \
                == "250 2.1.5 Ok"
        assert await w.cmd("RCPT TO:<c@example.org> NOTIFY=NEVER") == "250 2.1.5 Ok"
        assert await w.cmd("RCPT TO:<d@example.org>") == "250 2.1.5 Ok"
        assert await w.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        await w.send(BODY + b".")
        assert (await w.reply())[-1].startswith("250 2.0.0 Ok")
    assert rows(config, "SELECT ret, envid FROM messages") == [("HDRS", "QQ+2Bid")]
    assert rows(config, "SELECT address, notify, orcpt FROM recipients ORDER BY rcpt_no") == [
        ("b@example.org", "SUCCESS,FAILURE", "rfc822;b@example.org"),
        ("c@example.org", "NEVER", None),
        ("d@example.org", None, None),
    ]


@pytest.mark.parametrize("command, reply", [
    ("MAIL FROM:<a@lab.test> RET=ALL", "501 5.5.4 Bad RET parameter (FULL or HDRS)"),
    ("MAIL FROM:<a@lab.test> RET=FULL RET=HDRS", "501 5.5.4 Bad RET parameter"),
    ("MAIL FROM:<a@lab.test> ENVID=bad=value", "501 5.5.4 Bad ENVID parameter"),
])
async def test_bad_dsn_parameters(make_config, command, reply):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        assert await w.cmd(command) == reply
        assert await w.cmd("MAIL FROM:<a@lab.test>") == "250 2.1.0 Ok"
        assert await w.cmd("RCPT TO:<b@example.org> NOTIFY=NEVER,SUCCESS") == \
                "501 5.5.4 Bad NOTIFY parameter (NEVER, or SUCCESS, FAILURE, DELAY)"
        assert await w.cmd("RCPT TO:<b@example.org> ORCPT=nosemicolon") == "501 5.5.4 Bad ORCPT parameter"
        # addr-type must be an atom (RFC 3461 4.2).
        assert await w.cmd("RCPT TO:<b@example.org> ORCPT=rfc(822;b@example.org") == \
                "501 5.5.4 Bad ORCPT parameter"
        assert await w.cmd("RCPT TO:<b@example.org> NOTIFY=DELAY") == "250 2.1.5 Ok"


def test_orcpt_addr_type_must_be_an_atom():
    # Found by hypothesis (test_split_dsn_params_invariants): a NUL as addr-type passed.
    # On the wire the NUL is refused earlier, with the rest of the line (553 5.1.3).
    bad = Reply(501, "5.5.4", "Bad ORCPT parameter")
    assert split_dsn_params(["ORCPT=\x00;"], ("NOTIFY", "ORCPT")) == bad
    assert split_dsn_params(["ORCPT=;b@example.org"], ("NOTIFY", "ORCPT")) == bad
    dsn, rest = split_dsn_params(["ORCPT=rfc822;b@example.org"], ("NOTIFY", "ORCPT"))
    assert dsn.orcpt == "rfc822;b@example.org" and rest == []


async def test_null_sender_is_accepted_and_stored_empty(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        reply = await w.mail("", ["postmaster@example.org"], BODY)
    assert reply.startswith("250 2.0.0 Ok: queued as")
    assert rows(config, "SELECT sender FROM messages") == [("",)]


async def test_unicode_address_without_smtputf8_gets_5_6_7(make_config):
    """RFC 6531 §3.4: a UTF-8 address needs SMTPUTF8 on MAIL; Postfix answers 553 5.6.7."""
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        assert await w.cmd("MAIL FROM:<jürgen@lab.test>") == \
                "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
        assert await w.cmd("MAIL FROM:<ci@lab.test>") == "250 2.1.0 Ok"
        assert await w.cmd("RCPT TO:<用户@example.org>") == \
                "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
        assert await w.cmd("RCPT TO:<bob@bücher.example>") == \
                "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
        assert await w.cmd("RSET") == "250 2.0.0 OK"
        assert await w.cmd("MAIL FROM:<jürgen@lab.test> SMTPUTF8") == "250 2.1.0 Ok"
        assert await w.cmd("RCPT TO:<用户@example.org>") == "250 2.1.5 Ok"
