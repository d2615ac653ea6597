"""A client that keeps getting errors is dropped, as Postfix's smtpd does
(smtpd_hard_error_limit, smtpd_junk_command_limit), over real sockets."""

from __future__ import annotations

import pytest

from tests.support.in_process import listener_port, running
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(60)

TOO_MANY = "421 4.7.0 relay.lab.test Error: too many errors"


async def test_the_twentieth_error_ends_the_session(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        for _ in range(19):
            assert await w.cmd("RCPT TO:<b@example.org>") == "503 5.5.1 Error: need MAIL command"
        await w.send("RCPT TO:<b@example.org>")
        assert await w.reply() == ["503 5.5.1 Error: need MAIL command"]
        assert await w.reply() == [TOO_MANY]
        assert await w.closed()


async def test_a_lower_limit_and_good_commands_in_between(make_config):
    config = make_config(limits={"hard_error_limit": 3})
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        assert (await w.cmd("MAIL FROM:<a@lab.test> BOGUS=1")).startswith("555 ")
        assert await w.cmd("MAIL FROM:<a@lab.test>") == "250 2.1.0 Ok"
        assert await w.cmd("MAIL FROM:<a@lab.test>") == "503 5.5.1 Error: nested MAIL command"
        assert await w.cmd("RCPT TO:<b@example.org>") == "250 2.1.5 Ok"   # errors are not forgiven
        await w.send("DATA x")
        assert await w.reply() == ["501 5.5.4 Syntax: DATA"]
        assert await w.reply() == [TOO_MANY]
        assert await w.closed()


async def test_an_accepted_message_forgives_earlier_errors(make_config):
    # A relay client whose every message has one unknown recipient is not cut off
    # (Postfix: the limit is on errors "without delivering mail").
    config = make_config(limits={"hard_error_limit": 2})
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        for _ in range(5):
            assert await w.cmd("RCPT TO:<b@example.org>") == "503 5.5.1 Error: need MAIL command"
            assert await w.cmd("MAIL FROM:<a@lab.test>") == "250 2.1.0 Ok"
            assert await w.cmd("RCPT TO:<b@example.org>") == "250 2.1.5 Ok"
            assert await w.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
            await w.send(b"Subject: x\r\n\r\nbody\r\n.")
            assert (await w.reply())[0].startswith("250 2.0.0 Ok: queued as ")
        assert await w.cmd("RCPT TO:<b@example.org>") == "503 5.5.1 Error: need MAIL command"
        await w.send("RCPT TO:<b@example.org>")
        assert await w.reply() == ["503 5.5.1 Error: need MAIL command"]
        assert await w.reply() == [TOO_MANY]
        assert await w.closed()


async def test_too_many_recipients_is_not_an_error(make_config):
    config = make_config(limits={"max_recipients": 2, "hard_error_limit": 3})
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        assert await w.cmd("MAIL FROM:<a@lab.test>") == "250 2.1.0 Ok"
        replies = [await w.cmd(f"RCPT TO:<r{i}@example.org>") for i in range(10)]
        assert replies == ["250 2.1.5 Ok"] * 2 + ["452 4.5.3 Too many recipients"] * 8
        assert await w.cmd("NOOP") == "250 2.0.0 OK"


async def test_junk_commands_beyond_the_limit_count_as_errors(make_config):
    config = make_config(limits={"junk_command_limit": 5, "hard_error_limit": 3})
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        for verb in ["NOOP", "RSET", "NOOP", "RSET", "NOOP", "NOOP", "RSET"]:   # 5 free, 2 errors
            assert (await w.cmd(verb)).startswith("250 2.0.0")
        # An accepted message starts both counts again (Postfix: junk "is reset
        # after mail is delivered"; the error limit is "without delivering mail").
        assert await w.cmd("MAIL FROM:<a@lab.test>") == "250 2.1.0 Ok"
        assert await w.cmd("RCPT TO:<b@example.org>") == "250 2.1.5 Ok"
        assert await w.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        await w.send(b"Subject: x\r\n\r\nbody\r\n.")
        assert (await w.reply())[0].startswith("250 2.0.0 Ok: queued as ")
        for _ in range(5 + 2):   # 5 free, 2 errors
            assert await w.cmd("NOOP") == "250 2.0.0 OK"
        await w.send("NOOP")
        assert await w.reply() == ["250 2.0.0 OK"]
        assert await w.reply() == [TOO_MANY]
        assert await w.closed()
