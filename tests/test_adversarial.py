"""Adversarial input: what a hostile or broken client may send, over real sockets.

Already covered elsewhere, and not repeated here:
  * open-relay matrix (every trick x sender <>, <x@remote>, <ourhost!x>: 554 5.7.1),
    STARTTLS plaintext injection inbound, AUTH guessing throttle: test_relay_auth.py
  * message of exactly the size limit and one byte over, smuggling patterns inbound
    (<LF>.<CR><LF> and friends never end DATA; stored data is CRLF only): test_inbound.py
  * mta's own client discards a reply injected before the TLS handshake
    (CVE-2011-0411): test_smtp_client.py::test_plaintext_injected_before_tls_handshake_is_discarded
  * to_wire never puts a bare CR or LF on the wire (property): test_data_reader.py
  * queue database and users file created 0600: test_store.py, test_cli.py

MTA_LONG_TESTS=1 runs the long versions (10,000 connections, 100,000 RCPTs, more
hypothesis examples, ten minutes of fuzzing).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import os
import resource
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mta.config import build_config
from mta.inbound import policy
from mta.inbound.replies import _DEFAULT_ENHANCED, _HAS_ENHANCED, enhance_reply
from mta.passwords import AuthThrottle, set_password
from tests.fuzz import fuzz_inbound
from tests.support.in_process import listener_port, running
from tests.support.ports import free_port
from tests.support.waiting import wait_until
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(120)

LONG = os.environ.get("MTA_LONG_TESTS") == "1"
BODY = b"Subject: hi\r\nFrom: a@lab.test\r\n\r\nhello\r\n"
PASSWORD = "s3cret pass"


def rows(config, sql, args=()):
    with sqlite3.connect(config.queue.path) as db:
        return db.execute(sql, args).fetchall()


def assert_clean_5xx(reply: str) -> None:
    """A permanent refusal with an enhanced status code (RFC 3463)."""
    assert reply[:1] == "5" and _HAS_ENHANCED.match(reply.encode()), reply


# ============================================================================ SMTP smuggling, outbound

class RawPeer:
    """A minimal next hop that records every byte it receives, untouched.

    RecordingPeer keeps message data after un-dot-stuffing; here the question is
    what crossed the wire. DATA ends only at a line that is exactly ".<CR><LF>".
    """

    def __init__(self, host: str = "127.0.0.2"):
        self.host = host
        self.port = 0
        self.raw = bytearray()
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawPeer:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()

        async def line() -> bytes:
            while b"\n" not in buf:
                chunk = await reader.read(65536)
                if not chunk:
                    raise EOFError
                self.raw += chunk
                buf.extend(chunk)
            end = buf.index(b"\n") + 1
            out = bytes(buf[:end])
            del buf[:end]
            return out

        async def reply(text: bytes) -> None:
            writer.write(text + b"\r\n")
            await writer.drain()

        try:
            await reply(b"220 raw.peer.test ESMTP")
            while True:
                command = await line()
                self.commands.append(command)
                verb = command[:4].upper()
                if verb == b"EHLO":
                    await reply(b"250-raw.peer.test\r\n250 8BITMIME")
                elif verb == b"DATA":
                    await reply(b"354 go ahead")
                    data = bytearray()
                    while (text := await line()) != b".\r\n":
                        data += text
                    self.messages.append(bytes(data))
                    await reply(b"250 2.0.0 Ok: queued")
                elif verb == b"QUIT":
                    await reply(b"221 2.0.0 Bye")
                    break
                else:
                    await reply(b"250 2.0.0 Ok")
        except (EOFError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


SMUGGLING = [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n..\n"]


async def test_nul_in_data_is_refused_and_never_relayed(make_config):
    """<CRLF>.<NUL><CRLF> (or <CRLF><NUL>.<CRLF>) is the end of data to a next hop that drops
    NULs: such a message is refused whole with 554 5.6.0 (RFC 5322 §2.3: NUL is not text),
    nothing is queued or relayed, and the session goes on."""
    async with RawPeer() as peer:
        config = make_config(delivery={"routes": {"example.org": f"127.0.0.2:{peer.port}"}})
        async with running(config, deliver=True):
            async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
                for n, body in enumerate([b"Subject: a\r\n\r\nbody\r\n.\x00\r\nMAIL FROM:<evil@evil.test>\r\n",
                                          b"Subject: b\r\n\r\nbody\r\n\x00.\r\nRCPT TO:<victim@example.org>\r\n",
                                          b"Subject: c\x00\r\n\r\nbody\r\n"]):
                    reply = await w.mail("a@lab.test", ["b@example.org"], body, ehlo=n == 0)
                    assert reply == "554 5.6.0 Message content rejected: NUL character in message"
                reply = await w.mail("a@lab.test", ["b@example.org"], b"Subject: clean\r\n\r\nok\r\n", ehlo=False)
                assert reply.startswith("250 2.0.0 Ok: queued as")
            await wait_until(lambda: len(peer.messages) == 1, 15)
    assert b"\x00" not in bytes(peer.raw)
    assert b"Subject: clean" in peer.messages[0]


async def test_relayed_mail_has_only_crlf_on_the_wire(make_config):
    """Bare LF / CR end-of-data look-alikes accepted inbound reach the next hop as
    content with CRLF line ends only: no lenient server behind us can see a
    second message in them (SMTP smuggling, outbound side)."""
    async with RawPeer() as peer:
        config = make_config(delivery={"routes": {"example.org": f"127.0.0.2:{peer.port}"},
                                       "connection_cache": {"idle_timeout": "1s"}})
        bodies = [b"Subject: smuggle %d\r\n\r\nbody" % i + pattern +
                  b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
                  b"Subject: smuggled\r\n\rbare CR\nbare LF\r\n" for i, pattern in enumerate(SMUGGLING)]
        async with running(config, deliver=True):
            async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
                for n, body in enumerate(bodies):
                    reply = await w.mail("a@lab.test", ["b@example.org"], body, ehlo=n == 0)
                    assert reply.startswith("250 2.0.0 Ok: queued as"), reply
            await wait_until(lambda: len(peer.messages) == len(bodies), 15, lambda: peer.commands)
    raw = bytes(peer.raw)
    assert raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n"), "a bare CR or LF crossed the wire"
    mails = [c for c in peer.commands if c[:5].upper() == b"MAIL "]
    assert len(mails) == len(bodies) and all(c.startswith(b"MAIL FROM:<a@lab.test>") for c in mails)
    assert not any(c.startswith(b"MAIL FROM:<evil") for c in peer.commands)
    for data in peer.messages[:len(SMUGGLING)]:
        assert b"\r\nMAIL FROM:<evil@evil.test>\r\n" in data  # still content, never a command


# ============================================================================ CR, LF, NUL in commands

async def test_cr_lf_nul_in_mail_and_rcpt_get_a_clear_5xx(make_config):
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        for line in [b"MAIL FROM:<a\rb@lab.test>", b"MAIL FROM:<a@lab.test\r>", b"MAIL FROM:<a\x00b@lab.test>",
                     b"MAIL FROM:<a@lab\x00.test>", b'MAIL FROM:<"a\x00b"@lab.test>',
                     b"MAIL FROM:<a@lab.test> RET=\x00"]:
            # aiosmtpd's parser alone reads <a@lab.test\r> as a@lab.test (CR as white space).
            assert await w.cmd(line) == "553 5.1.7 Bad sender address syntax", line
        # A bare LF ends the line: what is left over is a command of its own.
        await w.send(b"MAIL FROM:<a\nb@lab.test>")
        assert_clean_5xx((await w.reply())[-1])
        assert_clean_5xx((await w.reply())[-1])
        assert await w.cmd("MAIL FROM:<a@lab.test>") == "250 2.1.0 Ok"
        for line in [b"RCPT TO:<b\rc@example.org>", b"RCPT TO:<b@example.org\r>", b"RCPT TO:<b\x00@example.org>",
                     b'RCPT TO:<"b\x00c"@example.org>', b'RCPT TO:<"b\\\rc"@example.org>',
                     b"RCPT TO:<b@example.org> NOTIFY=NEVER\x00"]:
            assert await w.cmd(line) == "553 5.1.3 Bad recipient address syntax", line
        await w.send(b"RCPT TO:<b\nc@example.org>")
        assert_clean_5xx((await w.reply())[-1])
        assert_clean_5xx((await w.reply())[-1])
        assert await w.cmd("NOOP") == "250 2.0.0 OK"
        assert await w.cmd("RCPT TO:<ok@example.org>") == "250 2.1.5 Ok"
        assert await w.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        await w.send(BODY + b".")
        assert (await w.reply())[-1].startswith("250 2.0.0 Ok: queued as")
    assert rows(config, "SELECT sender FROM messages") == [("a@lab.test",)]
    assert rows(config, "SELECT address FROM recipients") == [("ok@example.org",)]


async def test_cr_nul_in_helo_and_ehlo_get_a_501(make_config):
    """The client's name is stored with each message (and PostgreSQL's text refuses a NUL):
    a name with NUL or CR is refused, and the session goes on with a proper one."""
    config = make_config()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        for line in [b"EHLO client\x00.lab.test", b"HELO client\x00.lab.test", b"EHLO client\r.lab.test"]:
            verb = line[:4].decode()
            assert await w.cmd(line) == f"501 5.5.4 Syntax: {verb} hostname", line
        assert (await w.cmd("EHLO client.lab.test")).startswith("250 ")


def submission_config(make_config, users_file, **limits):
    lc = {"name": "submission", "address": f"127.0.0.1:{free_port()}", "mode": "submission",
          "allow_insecure_auth": True}
    return make_config(listeners=[lc], auth={"users_file": str(users_file)}, limits=limits or None)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def plain(user: bytes, password: bytes, authzid: bytes = b"") -> str:
    """An AUTH PLAIN response (RFC 4616): authzid NUL authcid NUL password, base64."""
    return b64(authzid + b"\0" + user + b"\0" + password)


PW = PASSWORD.encode()
AUTH_TRICKS = [
    # (commands, the last one's reply): user names and passwords with NUL, CR, LF inside
    (["AUTH PLAIN " + plain(b"ali\rce", PW)], "535 5.7.8 Error: authentication failed"),
    (["AUTH PLAIN " + plain(b"alice\r", PW)], "535 5.7.8 Error: authentication failed"),
    (["AUTH PLAIN " + plain(b"alice\r\nMAIL FROM:<x@y.test>", PW)], "535 5.7.8 Error: authentication failed"),
    (["AUTH PLAIN " + plain(b"alice", PW + b"\r\n")], "535 5.7.8 Error: authentication failed"),
    (["AUTH PLAIN " + plain(b"ali\0ce", PW)], "501 5.5.2 Cannot decode AUTH PLAIN response"),
    (["AUTH PLAIN " + plain(b"alice", b"s3cret\0pass")], "501 5.5.2 Cannot decode AUTH PLAIN response"),
    (["AUTH PLAIN", plain(b"alice\0", PW)], "501 5.5.2 Cannot decode AUTH PLAIN response"),
    (["AUTH LOGIN", b64(b"alice\0"), b64(PW)], "535 5.7.8 Error: authentication failed"),
    (["AUTH LOGIN", b64(b"alice\r\nRSET"), b64(PW)], "535 5.7.8 Error: authentication failed"),
    (["AUTH LOGIN " + b64(b"alice"), b64(PW + b"\0")], "535 5.7.8 Error: authentication failed"),
    (["AUTH LOGIN", "YWxp\x00Y2U="], "501 5.5.2 Can't decode base64"),
    # Overlong responses: aiosmtpd raised ValueError here (a "451 local error").
    (["AUTH LOGIN", "x" * 100_000], "500 5.5.6 Authentication Exchange line is too long"),
    (["AUTH PLAIN", "x" * 100_000], "500 5.5.6 Authentication Exchange line is too long"),
    (["AUTH PLAIN " + "x" * 100_000], "500 5.5.2 Error: line too long"),
]


async def test_nul_cr_lf_in_auth_data_fail_cleanly(make_config, users_file):
    config = submission_config(make_config, users_file)
    async with running(config):
        port = listener_port(config, "submission")
        for n, (commands, expected) in enumerate(AUTH_TRICKS):
            # A client address of its own for each case: the guessing throttle stays out of it.
            async with await Wire.connect("127.0.0.1", port, local_addr=(f"127.0.1.{n + 1}", 0)) as w:
                await w.ehlo()
                for command in commands[:-1]:
                    assert (await w.cmd(command)).startswith("334 "), command
                assert await w.cmd(commands[-1], timeout=10) == expected, commands
                assert await w.cmd("NOOP") == "250 2.0.0 OK"
                assert await w.cmd("MAIL FROM:<alice@lab.test>") == "530 5.7.0 Authentication required"
                # The session goes on, and the right credentials still work in it.
                assert await w.cmd("AUTH PLAIN " + plain(b"alice", PW), timeout=10) == \
                    "235 2.7.0 Authentication successful"


# ============================================================================ volume from one client

async def test_ten_thousand_recipients_in_one_transaction(make_config):
    n = 100_000 if LONG else 10_000
    config = make_config()  # limits.max_recipients: 100, Postfix's smtpd_recipient_limit would be 1000
    limit = config.limits.max_recipients
    async with running(config) as app, await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        assert await w.cmd("MAIL FROM:<a@lab.test>") == "250 2.1.0 Ok"
        w.writer.write(b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(n)))  # pipelined
        replies = collections.Counter()
        for i in range(n):
            reply = (await w.reply(timeout=30))[-1]
            replies[reply] += 1
            if i < limit:
                assert reply == "250 2.1.5 Ok", (i, reply)
        assert replies == {"250 2.1.5 Ok": limit, "452 4.5.3 Too many recipients": n - limit}
        # Memory stays bounded: nothing is kept for a refused RCPT.
        session = next(s for s in app.listeners[0].sessions if s.transport is not None)
        assert len(session.envelope.rcpt_tos) == limit and len(session.envelope.rcpt_dsn) == limit
        assert len(session.envelope.rcpt_options) == 0
        # … and the session is still usable.
        assert await w.cmd("NOOP") == "250 2.0.0 OK"
        assert await w.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        await w.send(BODY + b".")
        assert (await w.reply())[-1].startswith("250 2.0.0 Ok: queued as")
    assert rows(config, "SELECT count(*) FROM recipients") == [(limit,)]


@contextlib.contextmanager
def open_files_limit(needed: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        yield
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
    except (ValueError, OSError):
        if hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} and cannot be raised")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_thousands_of_parallel_connections_from_one_address(make_config):
    """max_connections_per_ip holds under a flood: the first 20 get 220, every other
    one 421 4.7.0 and a close; another client is served meanwhile; slots come back.

    Every client socket stays open until the end, so n connections from 127.0.0.1
    exist at once on the client side (the server closes the refused ones).
    """
    n = 10_000 if LONG else 2_000
    per_ip = 20
    gate = asyncio.Semaphore(512)  # connects in flight (the listen backlog is 1024)
    config = make_config(limits={"max_connections_per_ip": per_ip, "max_connections": 200, "idle_timeout": "60s"})
    with open_files_limit(n + 2 * 512 + 1024):
        async with running(config) as app:
            port = listener_port(config)
            limiter = app.listeners[0].limiter
            held: list[asyncio.StreamWriter] = []
            refused: list[asyncio.StreamWriter] = []
            outcomes: collections.Counter[str] = collections.Counter()

            async def one() -> None:
                async with gate:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
                    try:
                        first = await asyncio.wait_for(reader.readline(), 30)
                    except BaseException:
                        writer.close()
                        raise
                if first.startswith(b"220 "):
                    held.append(writer)
                    outcomes["220"] += 1
                    return
                refused.append(writer)
                outcomes[first.decode().rstrip()] += 1
                assert await asyncio.wait_for(reader.read(), 30) == b""  # and the server closed it

            async def other_client() -> str:
                await asyncio.sleep(0.2)  # in the middle of the flood
                async with await Wire.connect("127.0.0.1", port, local_addr=("127.0.0.2", 0)) as w:
                    return await w.mail("a@lab.test", ["b@example.org"], BODY)

            started = time.monotonic()
            flood = [asyncio.create_task(one()) for _ in range(n)]
            other = await other_client()
            results = await asyncio.gather(*flood, return_exceptions=True)
            elapsed = time.monotonic() - started
            try:
                errors = [r for r in results if isinstance(r, BaseException)]
                assert not errors, errors[:5]
                assert other.startswith("250 2.0.0 Ok: queued as"), other
                assert outcomes == {"220": per_ip, "421 4.7.0 Error: too many connections": n - per_ip}, outcomes
                assert limiter.per_ip["127.0.0.1"] == per_ip
            finally:
                for writer in held + refused:
                    writer.close()
                for writer in held + refused:
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()
            await wait_until(lambda: limiter.total == 0, 10, lambda: (limiter.total, dict(limiter.per_ip)))
            async with await Wire.connect("127.0.0.1", port) as w:
                assert await w.cmd("NOOP") == "250 2.0.0 OK"
    print(f"{n} connections in {elapsed:.1f} s")


# ============================================================================ slow clients

async def dribble(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every)


@pytest.mark.parametrize("stage", ["command", "data"])
async def test_slowloris_gets_421_at_the_idle_timeout(make_config, stage):
    """One byte every 50 ms never completes a command (or the message) in time.

    aiosmtpd restarts its timer only when a complete, recognised command arrives,
    so idle_timeout is a deadline per command (and for the whole DATA content),
    not per byte: bytes trickling in do not keep the session alive.
    """
    config = make_config(limits={"idle_timeout": "1s"})
    async with running(config) as app:
        limiter = app.listeners[0].limiter
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            await w.ehlo()
            if stage == "data":
                await w.cmd("MAIL FROM:<a@lab.test>")
                await w.cmd("RCPT TO:<b@example.org>")
                assert await w.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
            started = time.monotonic()
            slow = asyncio.create_task(dribble(w.writer, b"NOOP" + b"x" * 400 if stage == "command"
                                               else BODY + b"y" * 400, 0.05))
            assert await w.reply(timeout=5) == ["421 4.4.2 Error: timeout exceeded"]
            assert 0.8 < time.monotonic() - started < 2.5
            assert await w.closed()
            slow.cancel()
        await wait_until(lambda: limiter.total == 0, 3)
    assert rows(config, "SELECT count(*) FROM messages") == [(0,)]


async def test_slow_but_complete_commands_each_get_the_full_timeout(make_config):
    """The deadline is per command: a client that completes each command within
    idle_timeout is served, however slowly it types (as with Postfix's smtpd_timeout)."""
    config = make_config(limits={"idle_timeout": "1s"})
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        started = time.monotonic()
        for _ in range(3):
            await dribble(w.writer, b"NOOP\r\n", 0.1)  # 0.6 s per command
            assert await w.reply() == ["250 2.0.0 OK"]
        assert time.monotonic() - started > 1.5


async def test_client_that_stops_reading_loses_its_slot(make_config):
    """A "slow read" client: it pipelines commands and never reads the replies.

    The server's writes back up, so its session blocks and the idle timeout fires;
    close() would wait for the write buffer to drain, which never happens. The
    session now aborts the connection shortly after its 421 (CLOSE_GRACE), so the
    connection slot comes back.
    """
    config = make_config(limits={"idle_timeout": "1s", "max_connections_per_ip": 2})
    async with running(config) as app:
        listener = app.listeners[0]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window that stays closed
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", listener_port(config)))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            await wait_until(lambda: listener.limiter.total == 1, 3)
            for session in listener.sessions:  # the kernel's send buffer, as small as it goes
                if session.transport is not None:
                    session.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            writer.write(b"EHLO slow.reader.test\r\n" * 5000)  # ~1 MB of replies, none read
            started = time.monotonic()
            await wait_until(lambda: listener.limiter.total == 0, 8, "the slot is still held")
            assert time.monotonic() - started < 6
            async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
                assert await w.cmd("NOOP") == "250 2.0.0 OK"
        finally:
            writer.transport.abort()


# ============================================================================ long lines

async def test_100_kb_lines_in_commands_and_data(make_config):
    config = make_config()
    long_data_lines = [b"L" * 100_000, b"M" * 1_000_000, b"bare LF\n" * 30_000]
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        for line in [b"X" * 100_000, b"EHLO " + b"h" * 100_000]:
            assert await w.cmd(line) == "500 5.5.2 Error: line too long"
        await w.ehlo()
        for line in [b"X" * 100_000, b"NOOP " + b"n" * 100_000, b"MAIL FROM:<" + b"a" * 100_000 + b"@lab.test>",
                     b"MAIL FROM:<a@lab.test> ENVID=" + b"e" * 100_000]:
            assert await w.cmd(line) == "500 5.5.2 Error: line too long"
        assert await w.cmd("MAIL FROM:<a@lab.test>") == "250 2.1.0 Ok"
        assert await w.cmd(b"RCPT TO:<" + b"r" * 100_000 + b"@example.org>") == "500 5.5.2 Error: line too long"
        assert await w.cmd("RCPT TO:<b@example.org>") == "250 2.1.5 Ok"
        assert await w.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        # In DATA, long lines are taken (a relay in a lab must carry what sloppy
        # programs send); only the message size limit applies.
        await w.send(b"Subject: long lines\r\n\r\n" + b"\r\n".join(long_data_lines) + b"\r\n.")
        assert (await w.reply(timeout=20))[-1].startswith("250 2.0.0 Ok: queued as")
        assert await w.cmd("NOOP") == "250 2.0.0 OK"
    data = rows(config, "SELECT data FROM bodies")[0][0]
    assert b"\r\n" + b"L" * 100_000 + b"\r\n" + b"M" * 1_000_000 + b"\r\n" in data
    assert data.endswith(b"bare LF\r\n" * 30_000 + b"\r\n")  # the last LF, then the CRLF before the dot


# ============================================================================ property tests: parsing

addresses = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="ab.@%!:\"[]<>\\\r\n\x00 _-é", max_size=40),
    st.builds(lambda local, d: f"{local}@{d}", st.text(max_size=70), st.text(max_size=70)),
    st.sampled_from(["", "@", "a@", "@b", "a@b", "user@[192.0.2.1]", "user@[IPv6:::1]", "u@[300.1.1.1]",
                     '"a@b"@ourhost.test', "a%b@ourhost.test", "b!a@ourhost.test", "a@ourhost.test.",
                     "a@OURHOST.test", "a" * 65 + "@ourhost.test", "a@" + "b" * 254]),
)
RELAY_DOMAINS = ("ourhost.test", "xn--bcher-kva.test")


@settings(max_examples=2000 if LONG else 300, deadline=None)
@given(addresses)
def test_split_address_invariants(address):
    parts = policy.split_address(address)
    if parts is not None:
        local, domain = parts
        assert f"{local}@{domain}" == address
        assert local and domain and "@" not in domain
        assert not any(c in address for c in "\r\n\x00") and len(address) <= 254


@settings(max_examples=2000 if LONG else 300, deadline=None)
@given(addresses, st.booleans())
def test_check_sender_invariants(address, smtputf8):
    reply = policy.check_sender(address, smtputf8=smtputf8)
    assert reply in (None, policy.REPLIES["bad_sender"], policy.REPLIES["needs_smtputf8"])
    if reply == policy.REPLIES["needs_smtputf8"]:   # 5.6.7 only for a UTF-8 address without SMTPUTF8
        assert not smtputf8 and not address.isascii()
        assert policy.check_sender(address, smtputf8=True) is None
    if reply is None and address:
        assert not any(c in address for c in "\r\n\x00")
        assert smtputf8 or address.isascii()
        if "@" in address:
            assert policy.valid_domain(address.rpartition("@")[2], smtputf8)


@settings(max_examples=2000 if LONG else 300, deadline=None)
@given(addresses, st.booleans(), st.booleans())
def test_check_recipient_invariants(address, trusted, smtputf8):
    reply = policy.check_recipient(address, trusted=trusted, relay_domains=RELAY_DOMAINS, smtputf8=smtputf8)
    assert reply in (None, policy.REPLIES["relay_denied"], policy.REPLIES["bad_rcpt"],
                     policy.REPLIES["needs_smtputf8"])
    if reply == policy.REPLIES["needs_smtputf8"]:
        assert not smtputf8 and not address.isascii()
        assert policy.check_recipient(address, trusted=trusted, relay_domains=RELAY_DOMAINS, smtputf8=True) is None
    if trusted:
        assert reply != policy.REPLIES["relay_denied"]
    elif reply is None:
        # No open relay: only a plain local part at one of our relay domains.
        local, _, domain = address.rpartition("@")
        assert domain.lower().rstrip(".") in RELAY_DOMAINS
        assert not any(c in local for c in "%!@")
        # … and whatever an outsider may send, a trusted client may too.
        assert policy.check_recipient(address, trusted=True, relay_domains=RELAY_DOMAINS, smtputf8=smtputf8) is None
    if reply is None:
        assert not any(c in address for c in "\r\n\x00") and "@" in address


@settings(max_examples=2000 if LONG else 300, deadline=None)
@given(st.text(max_size=300) | st.from_regex(r"\[(IPv6:)?[0-9a-fA-F:.%]{0,45}\]", fullmatch=True), st.booleans())
@example("\x00", True)                   # was valid with SMTPUTF8
@example("a\x7fb.test", True)
@example("[IPv6:fe80::1% x]", False)     # a zone id was taken as part of a literal
def test_valid_domain_invariants(domain, smtputf8):
    ok = policy.valid_domain(domain, smtputf8)
    assert isinstance(ok, bool)
    if ok:
        assert not any(c.isspace() or c == "@" or ord(c) < 0x20 or c == "\x7f" for c in domain)
        assert not (domain.startswith("[") and "%" in domain)
        assert smtputf8 or domain.isascii()
        assert len(domain) <= 253 or domain.startswith("[")


params = st.lists(st.one_of(
    st.text(max_size=30).filter(lambda s: " " not in s),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["RET", "ENVID", "NOTIFY", "ORCPT", "ret", "Notify", "SIZE"]),
              st.text(alphabet="FULHDRSNEVCAIOY,;+=0123456789abc@.\x00", max_size=20))), max_size=6)


@settings(max_examples=2000 if LONG else 300, deadline=None)
@given(params, st.sampled_from([("RET", "ENVID"), ("NOTIFY", "ORCPT")]))
def test_split_dsn_params_invariants(given_params, allowed):
    result = policy.split_dsn_params(given_params, allowed)
    if isinstance(result, policy.Reply):
        assert (result.code, result.enhanced) == (501, "5.5.4")
        return
    dsn, rest = result
    assert all(p in given_params for p in rest)
    assert all(p.partition("=")[0].upper() not in allowed for p in rest)
    assert len(rest) + sum(v is not None for v in (dsn.ret, dsn.envid, dsn.notify, dsn.orcpt)) == len(given_params)
    assert dsn.ret in (None, "FULL", "HDRS")
    assert dsn.notify is None or dsn.notify == "NEVER" or set(dsn.notify.split(",")) <= {"SUCCESS", "FAILURE", "DELAY"}
    for value in (dsn.envid, dsn.orcpt):
        assert value is None or not any(c in value for c in " \r\n\x00")


@settings(max_examples=2000 if LONG else 500, deadline=None)
@given(st.one_of(
    st.binary(max_size=120),
    st.builds(lambda code, sep, text: code + sep + text,
              st.sampled_from(sorted(_DEFAULT_ENHANCED) + [b"220", b"334", b"354", b"999", b"25"]),
              st.sampled_from([b" ", b"-", b"", b"x"]), st.binary(max_size=60)),
))
def test_enhance_reply_invariants(raw):
    out = enhance_reply(raw)
    assert isinstance(out, bytes)
    assert enhance_reply(out) == out  # idempotent
    if raw[:3].isdigit():
        assert out[:3] == raw[:3]  # the code never changes
    if raw[:3] in _DEFAULT_ENHANCED and raw[3:4] in (b" ", b"-", b""):
        assert _HAS_ENHANCED.match(out), out  # every code aiosmtpd may use gets one


# ============================================================================ random commands to a live daemon

@pytest.fixture(scope="module")
def live_daemon(tmp_path_factory):
    """The daemon (relay + submission with AUTH) on its own event loop in a thread,
    shared by every hypothesis example."""
    tmp = tmp_path_factory.mktemp("live")
    set_password(tmp / "users", "alice", PASSWORD)
    config = build_config({
        "hostname": fuzz_inbound.HOSTNAME,
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"},
                      {"name": "submission", "address": f"127.0.0.1:{free_port()}", "mode": "submission",
                       "allow_insecure_auth": True}],
        "auth": {"users_file": str(tmp / "users")},
        "relay_domains": ["ourhost.test"],
        "limits": {"max_connections_per_ip": 200, "message_size": 100_000, "max_recipients": 5},
        "queue": {"path": str(tmp / "queue.db")},
        "metrics": {"address": None},
    })
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        stop.append(asyncio.Event())
        async with running(config) as app:
            for listener in app.listeners:  # random AUTH failures must not slow every example down
                listener.handler.throttle = AuthThrottle(free_failures=10**9)
            ready.set()
            await stop[0].wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "daemon did not start"
    yield config
    loop.call_soon_threadsafe(stop[0].set)
    thread.join(10)
    loop.close()


def read_reply(f) -> list[bytes] | None:
    lines = []
    while True:
        line = f.readline()
        if not line:
            return lines or None
        lines.append(line)
        if not line.endswith(b"\r\n") or len(line) < 4 or line[3:4] != b"-":
            return lines


def converse(port: int, lines: list[bytes], source: str = "127.0.0.1") -> bytes:
    """Send one line at a time, read its reply; a 354 turns the rest into the message."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        f = s.makefile("rb")
        greeting = read_reply(f)
        assert greeting and greeting[0].startswith(b"220 "), greeting
        out += b"".join(greeting)
        for i, line in enumerate(lines):
            s.sendall(line + b"\r\n")
            reply = read_reply(f)
            assert reply is not None, f"no reply to {line[:100]!r}"
            out += b"".join(reply)
            code = reply[-1][:3]
            if code == b"354":
                s.sendall(b"\r\n".join(lines[i + 1:]) + b"\r\n.\r\n")
                reply = read_reply(f)
                assert reply is not None, "no reply after the data"
                out += b"".join(reply)
                break
            if code in (b"221", b"421") or reply[-1].startswith(b"502 5.5.1 Too many unrecognized"):
                break
    return out


VERBS = ["HELO", "EHLO", "MAIL FROM:", "RCPT TO:", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP",
         "AUTH PLAIN", "AUTH LOGIN", "STARTTLS", "BDAT", "mail from:", "", "X"]
ARGS = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"<a@lab.test>", b"<>", b"<b@ourhost.test>", b"<b@remote.test>", b"<@x:b@remote.test>",
                     b"<a@lab.test> SIZE=10 BODY=8BITMIME SMTPUTF8 RET=FULL ENVID=x", b"<b@x.test> NOTIFY=NEVER",
                     b"<b@x.test> ORCPT=rfc822;b@x.test", b"client.test", b"=", b"*",
                     base64.b64encode(b"\0alice\0" + PASSWORD.encode()), base64.b64encode(b"alice"),
                     base64.b64encode(PASSWORD.encode()), b"<\"a b\"@x.test>", b"<user@[>", b"<a@[IPv6:::1]>"]),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
).map(lambda b: b.replace(b"\n", b""))
COMMAND = st.builds(lambda verb, sep, arg: verb.encode() + sep + arg,
                    st.sampled_from(VERBS), st.sampled_from([b" ", b"", b"  "]), ARGS)
LINE = st.one_of(COMMAND, COMMAND, COMMAND, st.binary(max_size=700).map(lambda b: b.replace(b"\n", b"")))


@settings(max_examples=1500 if LONG else 150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=st.lists(LINE, max_size=15), submission=st.booleans(), outsider=st.booleans())
def test_random_command_lines_get_well_formed_replies(live_daemon, lines, submission, outsider):
    """Every reply is "ddd" SP/- text with an RFC 3463 code (greeting, EHLO/HELO,
    334 and 354 exempt); nothing raises inside the session (no 451 "local error");
    the daemon keeps answering."""
    port = listener_port(live_daemon, "submission" if submission else "mta")
    out = converse(port, lines, "127.0.0.9" if outsider else "127.0.0.1")
    fuzz_inbound.check_replies(out)


def test_daemon_survives_the_random_commands(live_daemon):
    out = converse(listener_port(live_daemon), [b"EHLO ok.test", b"NOOP", b"QUIT"])
    assert out.endswith(b"250 2.0.0 OK\r\n221 2.0.0 Bye\r\n")


# ============================================================================ fuzzing

@pytest.fixture(scope="module")
def harness():
    h = fuzz_inbound.Harness()
    yield h
    h.close()


def test_fuzz_seeds_replay(harness):
    seeds = sorted(fuzz_inbound.SEEDS.iterdir())
    assert len(seeds) >= 5
    for seed in seeds:
        harness.run(seed.read_bytes())


@settings(max_examples=3000 if LONG else 300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=3000) | st.lists(LINE, max_size=30).map(lambda ls: b"\x03" + b"\r\n".join(ls) + b"\r\n"))
def test_fuzz_target_without_atheris(harness, data):
    """The fuzz target's own checks over hypothesis' bytes (runs where atheris does not)."""
    harness.run(data)


def test_fuzz_target_under_atheris(tmp_path):
    """A short coverage-guided run in CI; run it for hours by hand (see tests/fuzz/fuzz_inbound.py)."""
    pytest.importorskip("atheris")
    seconds = 600 if LONG else 8
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    proc = subprocess.run(
        [sys.executable, str(Path(fuzz_inbound.__file__)), str(corpus), str(fuzz_inbound.SEEDS),
         f"-max_total_time={seconds}", "-timeout=20", "-rss_limit_mb=2048", "-print_final_stats=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=seconds + 120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done " in proc.stderr and not list(tmp_path.glob("crash-*"))


# ============================================================================ AUTH secrets and file modes

async def test_credentials_never_reach_the_logs(make_config, users_file, caplog):
    """AUTH PLAIN and LOGIN, right and wrong, well-behaved and blind clients: neither
    a password nor its base64 (in any letter case) is logged by any logger."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="mail.log")  # aiosmtpd's own logger
    wrong = "wrong-guess-42"
    secrets = [PASSWORD, wrong]
    encoded = [b64(p.encode()) for p in secrets] + [plain(b"alice", p.encode()) for p in secrets]
    config = submission_config(make_config, users_file)
    async with running(config):
        port = listener_port(config, "submission")
        async with await Wire.connect("127.0.0.1", port) as w:
            await w.ehlo()
            assert await w.cmd("AUTH PLAIN " + plain(b"alice", wrong.encode())) == \
                "535 5.7.8 Error: authentication failed"
            assert await w.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
            assert await w.cmd(b64(b"alice")) == "334 UGFzc3dvcmQ6"
            assert await w.cmd(wrong) == "501 5.5.2 Can't decode base64"  # a password sent unencoded
            assert await w.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
            assert await w.cmd(b64(b"alice")) == "334 UGFzc3dvcmQ6"
            assert await w.cmd(PASSWORD) == "501 5.5.2 Can't decode base64"
            assert await w.cmd("AUTH LOGIN " + b64(b"alice")) == "334 UGFzc3dvcmQ6"
            assert await w.cmd(b64(wrong.encode())) == "535 5.7.8 Error: authentication failed"
            assert await w.cmd("AUTH PLAIN") == "334 "
            assert await w.cmd(plain(b"alice", PW)) == "235 2.7.0 Authentication successful"
            # A blind client that sends its responses without waiting for 334.
            assert await w.cmd("AUTH PLAIN") == "503 5.5.1 Already authenticated"
            assert (await w.cmd(plain(b"alice", PW)))[:3] == "500"
            assert await w.cmd("AUTH LOGIN") == "503 5.5.1 Already authenticated"
            assert (await w.cmd(b64(b"alice")))[:3] == "500"
            assert (await w.cmd(b64(PASSWORD.encode())))[:3] == "500"
        async with await Wire.connect("127.0.0.1", port, local_addr=("127.0.0.2", 0)) as w:
            await w.ehlo()
            assert await w.cmd("AUTH LOGIN " + b64(b"alice")) == "334 UGFzc3dvcmQ6"
            assert await w.cmd(b64(PASSWORD.encode()), timeout=10) == "235 2.7.0 Authentication successful"
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records).lower()
    assert "alice" in text and "mail.log" in {r.name for r in caplog.records}  # the logs were captured
    for secret in secrets + encoded:
        assert secret.lower() not in text, secret


async def test_queue_files_are_private_whatever_the_umask(make_config):
    """test_store.py checks queue.db is 0600; its WAL and shared-memory files must be
    too, and not because of a friendly umask."""
    config = make_config()
    old = os.umask(0)
    try:
        async with running(config):
            async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
                assert (await w.mail("a@lab.test", ["b@example.org"], BODY)).startswith("250 ")
            paths = [Path(str(config.queue.path) + suffix) for suffix in ("", "-wal", "-shm")]
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths if p.exists()}
    finally:
        os.umask(old)
    assert len(modes) == 3 and set(modes.values()) == {0o600}, modes
