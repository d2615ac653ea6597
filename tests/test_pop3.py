"""The POP3 server on the wire (RFC 1939, RFC 2449 CAPA/RESP-CODES, RFC 2595 STLS,
RFC 5034 AUTH PLAIN): exact bytes with a raw client, and Python's poplib. The tests
about the maildrop (listing, retrieval, deletion at QUIT, UIDLs) run on both store
backends (``store_backend``): the same bytes from SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import logging
import poplib
import random
import time

import pytest

from mta.errors import StoreError
from mta.passwords import AuthThrottle
from mta.pop3.session import POP3Session
from mta.pop3.transaction import top_of
from tests.support.pop3 import ALICE, ONE, THREE, TWO, USERS, Client, capa, pop3_lab
from tests.support.tls import make_tls
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

GREETING = b"+OK relay.lab.test POP3 server ready\r\n"
LOGGED_IN = b"+OK alice@lab.test has 3 messages (177 octets)\r\n"
AUTH_FAILED = b"-ERR [AUTH] authentication failed\r\n"
NEEDS_STLS = b"-ERR [AUTH] plaintext authentication disallowed without TLS; use STLS first\r\n"
NEEDS_TLS = b"-ERR [AUTH] plaintext authentication disallowed without TLS\r\n"
IN_USE = b"-ERR [IN-USE] mailbox is locked by another POP3 session\r\n"
SIGN_OFF = b"+OK relay.lab.test POP3 server signing off"


def stuffed(data: bytes) -> bytes:
    """What RETR must send for ``data``, written out by hand for the test messages."""
    return {
        ONE: (b"From: carol@remote.test\r\nTo: alice@lab.test\r\nSubject: one\r\n\r\n"
              b"Hello\r\n..hidden\r\n..\r\n...two dots\r\nend\r\n.\r\n"),
        TWO: TWO + b".\r\n",
        THREE: THREE + b"\r\n.\r\n",
    }[data]


def plain(authzid: str, user: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


async def uids(lab) -> list[str]:
    return [m.uid for m in await lab.mailboxes.messages("alice@lab.test")]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("pop3-tls"))


# ---------------------------------------------------------------- the exact wire

async def test_sizes_of_the_test_messages():
    # The literals below (177 octets, "1 97") rest on these sizes.
    assert [len(m) for m in ALICE] == [97, 40, 40]


async def test_greeting_and_capa_when_plaintext_is_allowed(tmp_path):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        assert c.greeting == GREETING
        assert await c.multi("CAPA") == capa("TOP", "UIDL", "USER", "SASL PLAIN", "RESP-CODES",
                                             "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION mta")
        assert await c.login() == LOGGED_IN
        # RFC 2449 §5: what AUTHORIZATION offered is still announced in TRANSACTION.
        assert await c.multi("CAPA") == capa("TOP", "UIDL", "USER", "SASL PLAIN", "RESP-CODES",
                                             "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION mta")


async def test_capa_without_tls_and_without_insecure_auth(tmp_path):
    async with pop3_lab(tmp_path, listener={"allow_insecure_auth": False}) as lab, \
            await Client.connect(lab.port) as c:
        assert await c.multi("CAPA") == capa("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                                             "IMPLEMENTATION mta")
        assert await c.cmd("USER alice@lab.test") == NEEDS_TLS
        assert await c.cmd("PASS alice pw") == NEEDS_TLS
        assert await c.cmd("AUTH PLAIN " + plain("", "alice@lab.test", "alice pw")) == NEEDS_TLS
        assert await c.cmd("STLS") == b"-ERR STLS is not available on this listener\r\n"


async def test_user_pass_success_and_failure(tmp_path):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        assert await c.cmd("USER alice@lab.test") == b"+OK send PASS\r\n"
        assert await c.cmd("PASS wrong") == AUTH_FAILED
        # A failed PASS goes back to the start of AUTHORIZATION: USER again first.
        assert await c.cmd("PASS alice pw") == b"-ERR PASS must follow a successful USER\r\n"
        # Unknown users get the same +OK and the same failure (no user enumeration).
        assert await c.cmd("USER nobody@lab.test") == b"+OK send PASS\r\n"
        assert await c.cmd("PASS alice pw") == AUTH_FAILED
        assert await c.cmd("USER Alice@Lab.Test") == b"+OK send PASS\r\n"
        # Spaces belong to the password (RFC 1939 §7); the mailbox name is case-insensitive.
        assert await c.cmd("PASS alice pw") == b"+OK Alice@Lab.Test has 3 messages (177 octets)\r\n"


async def test_stat_list_uidl(tmp_path, store_backend):
    async with pop3_lab(tmp_path, backend=store_backend) as lab, await Client.connect(lab.port) as c:
        u1, u2, u3 = await uids(lab)
        assert await c.login() == LOGGED_IN
        assert await c.cmd("STAT") == b"+OK 3 177\r\n"
        assert await c.multi("LIST") == b"+OK 3 messages (177 octets)\r\n1 97\r\n2 40\r\n3 40\r\n.\r\n"
        assert await c.cmd("LIST 2") == b"+OK 2 40\r\n"
        assert await c.multi("UIDL") == \
            f"+OK unique-id listing follows\r\n1 {u1}\r\n2 {u2}\r\n3 {u3}\r\n.\r\n".encode()
        assert await c.cmd("UIDL 3") == f"+OK 3 {u3}\r\n".encode()
        assert await c.cmd("LIST 4") == b"-ERR no such message\r\n"
        assert await c.cmd("UIDL 0") == b"-ERR no such message\r\n"


async def test_retr_is_byte_stuffed_and_terminated(tmp_path, store_backend):
    async with pop3_lab(tmp_path, backend=store_backend) as lab, await Client.connect(lab.port) as c:
        await c.login()
        assert await c.multi("RETR 1") == b"+OK 97 octets\r\n" + stuffed(ONE)
        assert b"\r\n..hidden\r\n..\r\n...two dots\r\n" in stuffed(ONE)
        assert await c.multi("RETR 2") == b"+OK 40 octets\r\n" + stuffed(TWO)
        # No CRLF at the end of the stored message: one is added before the ".".
        assert await c.multi("RETR 3") == b"+OK 40 octets\r\nSubject: three\r\n\r\nno line end at the end\r\n.\r\n"


async def test_top(tmp_path, store_backend):
    async with pop3_lab(tmp_path, backend=store_backend) as lab, await Client.connect(lab.port) as c:
        await c.login()
        head = b"From: carol@remote.test\r\nTo: alice@lab.test\r\nSubject: one\r\n\r\n"
        assert await c.multi("TOP 1 0") == b"+OK top of message follows\r\n" + head + b".\r\n"
        assert await c.multi("TOP 1 2") == b"+OK top of message follows\r\n" + head + b"Hello\r\n..hidden\r\n.\r\n"
        assert await c.multi("TOP 2 99") == b"+OK top of message follows\r\n" + TWO + b".\r\n"
        assert await c.multi("TOP 3 1") == b"+OK top of message follows\r\n" + THREE + b"\r\n.\r\n"


def test_top_of_edge_cases():
    assert top_of(b"A: b\r\n\r\n1\r\n2\r\n", 1) == b"A: b\r\n\r\n1\r\n"
    assert top_of(b"A: b\r\nC: d\r\n", 5) == b"A: b\r\nC: d\r\n"          # no body at all
    assert top_of(b"\r\nbody\r\nmore\r\n", 1) == b"\r\nbody\r\n"           # no header at all
    assert top_of(b"A: b\n\nbare\nlf\n", 1) == b"A: b\n\nbare\n"


async def test_dele_rset_noop(tmp_path, store_backend):
    async with pop3_lab(tmp_path, backend=store_backend) as lab, await Client.connect(lab.port) as c:
        await c.login()
        assert await c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
        assert await c.cmd("DELE 1") == b"-ERR message 1 already deleted\r\n"
        assert await c.cmd("RETR 1") == b"-ERR message 1 already deleted\r\n"
        assert await c.cmd("TOP 1 0") == b"-ERR message 1 already deleted\r\n"
        assert await c.cmd("LIST 1") == b"-ERR message 1 already deleted\r\n"
        assert await c.cmd("UIDL 1") == b"-ERR message 1 already deleted\r\n"
        assert await c.cmd("STAT") == b"+OK 2 80\r\n"
        assert await c.multi("LIST") == b"+OK 2 messages (80 octets)\r\n2 40\r\n3 40\r\n.\r\n"
        assert await c.cmd("NOOP") == b"+OK\r\n"
        assert await c.cmd("RSET") == b"+OK maildrop has 3 messages (177 octets)\r\n"
        assert await c.cmd("STAT") == b"+OK 3 177\r\n"
        assert await c.cmd("QUIT") == SIGN_OFF + b" (0 messages deleted, 3 left)\r\n"
        assert await c.closed()
    assert lab.stored("alice@lab.test") == ALICE


async def test_quit_in_authorization_and_in_transaction(tmp_path, store_backend):
    async with pop3_lab(tmp_path, backend=store_backend) as lab:
        async with await Client.connect(lab.port) as c:
            assert await c.cmd("QUIT") == SIGN_OFF + b"\r\n"
            assert await c.closed()
        async with await Client.connect(lab.port) as c:
            await c.login()
            assert await c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
            assert await c.cmd("DELE 3") == b"+OK message 3 deleted\r\n"
            assert await c.cmd("QUIT") == SIGN_OFF + b" (2 messages deleted, 1 left)\r\n"
            assert await c.closed()
        assert lab.stored("alice@lab.test") == [TWO]


async def test_empty_mailbox(tmp_path, store_backend):
    async with pop3_lab(tmp_path, fill=False, backend=store_backend) as lab, await Client.connect(lab.port) as c:
        assert await c.login("bob@lab.test") == b"+OK bob@lab.test has 0 messages (0 octets)\r\n"
        assert await c.cmd("STAT") == b"+OK 0 0\r\n"
        assert await c.multi("LIST") == b"+OK 0 messages (0 octets)\r\n.\r\n"
        assert await c.multi("UIDL") == b"+OK unique-id listing follows\r\n.\r\n"
        assert await c.cmd("RETR 1") == b"-ERR no such message\r\n"
        assert await c.cmd("QUIT") == SIGN_OFF + b" (0 messages deleted, 0 left)\r\n"


@pytest.mark.parametrize("command", ["STAT", "LIST", "LIST 1", "UIDL", "RETR 1", "TOP 1 1", "DELE 1",
                                     "RSET", "NOOP"])
async def test_transaction_commands_before_login(tmp_path, command):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        keyword = command.split()[0]
        assert await c.cmd(command) == f"-ERR {keyword} is not valid before login\r\n".encode()
        assert await c.cmd(command.lower()) == f"-ERR {keyword} is not valid before login\r\n".encode()


@pytest.mark.parametrize("command", ["USER bob@lab.test", "PASS x", "AUTH PLAIN", "APOP alice 0123", "STLS"])
async def test_authorization_commands_after_login(tmp_path, command):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        await c.login()
        keyword = command.split()[0]
        assert await c.cmd(command) == f"-ERR {keyword} is not valid after login\r\n".encode()
        assert await c.cmd("STAT") == b"+OK 3 177\r\n"   # still logged in as alice


async def test_commands_are_case_insensitive(tmp_path):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        assert await c.cmd("user alice@lab.test") == b"+OK send PASS\r\n"
        assert await c.cmd("pAsS alice pw") == LOGGED_IN
        assert await c.cmd("stat") == b"+OK 3 177\r\n"
        assert await c.cmd("LiSt 2") == b"+OK 2 40\r\n"
        assert await c.cmd("quit") == SIGN_OFF + b" (0 messages deleted, 3 left)\r\n"


@pytest.mark.parametrize("line", [b"FOO", b"", b" STAT", b"STATX", b"XTND XMIT", "ſtat".encode(), b"\tNOOP"])
async def test_unknown_commands(tmp_path, line):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        assert await c.cmd(line) == b"-ERR unknown command\r\n"
        await c.login()
        assert await c.cmd(line) == b"-ERR unknown command\r\n"
        assert await c.cmd("NOOP") == b"+OK\r\n"


async def test_apop_is_refused_with_a_reason(tmp_path):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        assert b"<" not in c.greeting   # no APOP timestamp (RFC 1939 §7)
        assert await c.cmd("APOP alice@lab.test c4c9334bac560ecc979e58001b3e22fb") == \
            b"-ERR APOP is not supported (passwords are stored hashed); use USER/PASS or AUTH PLAIN\r\n"


@pytest.mark.parametrize(("command", "reply"), [
    ("LIST x", "-ERR invalid message number"),
    ("LIST -1", "-ERR invalid message number"),
    ("LIST +1", "-ERR invalid message number"),
    ("LIST 1.0", "-ERR invalid message number"),
    ("LIST \u0661", "-ERR invalid message number"),          # ARABIC-INDIC DIGIT ONE
    ("LIST 99999999999", "-ERR invalid message number"),
    ("LIST 0", "-ERR no such message"),
    ("LIST 1 2", "-ERR LIST takes at most one message number"),
    ("UIDL 1 2", "-ERR UIDL takes at most one message number"),
    ("RETR", "-ERR RETR needs one message number"),
    ("RETR 1 2", "-ERR RETR needs one message number"),
    ("RETR 9", "-ERR no such message"),
    ("DELE", "-ERR DELE needs one message number"),
    ("DELE one", "-ERR invalid message number"),
    ("TOP 1", "-ERR TOP needs a message number and a number of lines"),
    ("TOP 1 2 3", "-ERR TOP needs a message number and a number of lines"),
    ("TOP 1 x", "-ERR invalid number of lines"),
    ("TOP 1 -1", "-ERR invalid number of lines"),
    ("TOP 7 1", "-ERR no such message"),
    ("STAT 1", "-ERR STAT takes no arguments"),
    ("NOOP x", "-ERR NOOP takes no arguments"),
    ("RSET x", "-ERR RSET takes no arguments"),
    ("CAPA x", "-ERR CAPA takes no arguments"),
    ("QUIT now", "-ERR QUIT takes no arguments"),
])
async def test_malformed_arguments_in_transaction(tmp_path, command, reply):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        await c.login()
        assert await c.cmd(command) == reply.encode() + b"\r\n"
        assert await c.cmd("STAT") == b"+OK 3 177\r\n"


async def test_malformed_arguments_in_authorization(tmp_path):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        assert await c.cmd("USER") == b"-ERR USER needs a user name\r\n"
        assert await c.cmd("USER ") == b"-ERR USER needs a user name\r\n"
        assert await c.cmd("PASS alice pw") == b"-ERR PASS must follow a successful USER\r\n"
        assert await c.cmd("USER alice@lab.test") == b"+OK send PASS\r\n"
        assert await c.cmd("PASS") == b"-ERR PASS needs a password\r\n"
        # PASS must come right after USER (RFC 1939 §7): anything in between forgets the name.
        assert await c.cmd("USER alice@lab.test") == b"+OK send PASS\r\n"
        assert await c.cmd("NOOP") == b"-ERR NOOP is not valid before login\r\n"
        assert await c.cmd("PASS alice pw") == b"-ERR PASS must follow a successful USER\r\n"
        assert await c.cmd("AUTH") == b"-ERR AUTH needs a mechanism name\r\n"
        assert await c.cmd("AUTH LOGIN") == b"-ERR unsupported authentication mechanism; only PLAIN is offered\r\n"
        assert await c.cmd("STLS now") == b"-ERR STLS takes no arguments\r\n"
        assert await c.cmd("QUIT") == SIGN_OFF + b"\r\n"


async def test_line_length_limit(tmp_path):
    """RFC 2449 §4: 255 octets with the CRLF; a longer line is answered once and skipped."""
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        assert await c.cmd("USER " + "a" * 248) == b"+OK send PASS\r\n"                 # 255 octets
        assert await c.cmd("USER " + "a" * 249) == b"-ERR line too long\r\n"             # 256 octets
        assert await c.login() == LOGGED_IN
        # A long line arriving in pieces, then the next command on the same write.
        await c.send(b"RETR " + b"1" * 40000)
        await c.send(b"1" * 40000 + b"\r\nSTAT\r\n")
        assert await c.line() == b"-ERR line too long\r\n"
        assert await c.line() == b"+OK 3 177\r\n"
        assert await c.cmd(b"NOOP " + b"x" * 1000) == b"-ERR line too long\r\n"
        assert await c.cmd("NOOP") == b"+OK\r\n"


async def test_nul_and_invalid_utf8(tmp_path):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        assert await c.cmd(b"USER alice@lab.test\x00bob") == b"-ERR NUL characters are not allowed in commands\r\n"
        assert await c.cmd(b"USER \xff\xfe") == b"-ERR command is not valid UTF-8\r\n"
        assert await c.login() == LOGGED_IN
        assert await c.cmd(b"NOOP\x00") == b"-ERR NUL characters are not allowed in commands\r\n"
        assert await c.cmd(b"\xc3\x28") == b"-ERR command is not valid UTF-8\r\n"
        assert await c.cmd("NOOP") == b"+OK\r\n"


async def test_bare_lf_line_ends_are_accepted(tmp_path):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        await c.send(b"USER alice@lab.test\nPASS alice pw\nSTAT\n")
        assert [await c.line() for _ in range(3)] == [b"+OK send PASS\r\n", LOGGED_IN, b"+OK 3 177\r\n"]


async def test_pipelined_commands_get_one_reply_each_in_order(tmp_path):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        u1 = (await uids(lab))[0]
        await c.send(b"CAPA\r\nSTAT\r\nUSER alice@lab.test\r\nPASS alice pw\r\nSTAT\r\nLIST\r\nUIDL 1\r\n"
                     b"FOO\r\nRETR 2\r\nTOP 1 0\r\nDELE 2\r\nDELE 2\r\n" + b"NOOP " + b"y" * 300 +
                     b"\r\nLIST 2\r\nRSET\r\nDELE 3\r\nQUIT\r\nNOOP\r\n")
        replies = await asyncio.wait_for(c.reader.read(), 5)
        assert replies == b"".join([
            capa("TOP", "UIDL", "USER", "SASL PLAIN", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                 "IMPLEMENTATION mta"),
            b"-ERR STAT is not valid before login\r\n",
            b"+OK send PASS\r\n",
            LOGGED_IN,
            b"+OK 3 177\r\n",
            b"+OK 3 messages (177 octets)\r\n1 97\r\n2 40\r\n3 40\r\n.\r\n",
            f"+OK 1 {u1}\r\n".encode(),
            b"-ERR unknown command\r\n",
            b"+OK 40 octets\r\n" + stuffed(TWO),
            b"+OK top of message follows\r\nFrom: carol@remote.test\r\nTo: alice@lab.test\r\nSubject: one\r\n\r\n.\r\n",
            b"+OK message 2 deleted\r\n",
            b"-ERR message 2 already deleted\r\n",
            b"-ERR line too long\r\n",
            b"-ERR message 2 already deleted\r\n",
            b"+OK maildrop has 3 messages (177 octets)\r\n",
            b"+OK message 3 deleted\r\n",
            SIGN_OFF + b" (1 message deleted, 2 left)\r\n",
            # nothing for the NOOP after QUIT: the connection is closed
        ])
    assert lab.stored("alice@lab.test") == [ONE, TWO]


# ---------------------------------------------------------------- AUTH PLAIN (RFC 5034, RFC 4616)

async def test_auth_plain_initial_response(tmp_path):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        assert await c.cmd("AUTH PLAIN " + plain("", "alice@lab.test", "wrong")) == AUTH_FAILED
        assert await c.cmd("AUTH plain " + plain("alice@lab.test", "alice@lab.test", "alice pw")) == LOGGED_IN


async def test_auth_plain_continuation_cancel_and_errors(tmp_path):
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        assert await c.cmd("AUTH PLAIN") == b"+ \r\n"
        assert await c.cmd("*") == b"-ERR authentication cancelled\r\n"
        assert await c.cmd("AUTH PLAIN") == b"+ \r\n"
        assert await c.cmd("not base64!") == b"-ERR invalid base64 in authentication response\r\n"
        assert await c.cmd("AUTH PLAIN " + base64.b64encode(b"no nul here").decode()) == \
            b"-ERR malformed PLAIN response (authzid NUL authcid NUL password)\r\n"
        assert await c.cmd("AUTH PLAIN =") == b"-ERR malformed PLAIN response (authzid NUL authcid NUL password)\r\n"
        # Acting as someone else (an authzid other than the user) is a failed login.
        assert await c.cmd("AUTH PLAIN " + plain("bob@lab.test", "alice@lab.test", "alice pw")) == AUTH_FAILED
        assert await c.cmd("AUTH PLAIN") == b"+ \r\n"
        assert await c.cmd(plain("", "alice@lab.test", "alice pw")) == LOGGED_IN


# ---------------------------------------------------------------- deletion happens at QUIT only

async def test_deletions_only_at_quit(tmp_path, store_backend):
    async with pop3_lab(tmp_path, backend=store_backend) as lab:
        async with await Client.connect(lab.port) as c:
            await c.login()
            assert await c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
        # Dropped without QUIT: no UPDATE state, nothing deleted (RFC 1939 §6).
        await wait_until(lambda: not lab.listener.locks, 3.0)
        assert lab.stored("alice@lab.test") == ALICE
        async with await Client.connect(lab.port) as c:
            assert await c.login() == LOGGED_IN
            assert await c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
            assert await c.cmd("QUIT") == SIGN_OFF + b" (1 message deleted, 2 left)\r\n"
            assert await c.closed()
        assert lab.stored("alice@lab.test") == [TWO, THREE]


async def test_failed_update_keeps_everything(tmp_path, store_backend, monkeypatch):
    async with pop3_lab(tmp_path, backend=store_backend) as lab:
        async def broken(mailbox, ids):
            raise StoreError("disk full")

        monkeypatch.setattr(lab.mailboxes, "delete", broken)
        async with await Client.connect(lab.port) as c:
            await c.login()
            await c.cmd("DELE 2")
            assert await c.cmd("QUIT") == \
                b"-ERR [SYS/TEMP] some deleted messages not removed; they are kept, try again later\r\n"
            assert await c.closed()
        assert lab.stored("alice@lab.test") == ALICE
        await wait_until(lambda: not lab.listener.locks, 3.0)


async def test_idle_timeout_autologout_deletes_nothing(tmp_path):
    async with pop3_lab(tmp_path, limits={"idle_timeout": 0.3}) as lab:
        async with await Client.connect(lab.port) as c:
            await c.login()
            await c.cmd("DELE 1")
            assert await c.line(timeout=3) == b"-ERR autologout; idle too long\r\n"
            assert await c.closed()
        assert lab.stored("alice@lab.test") == ALICE
        async with await Client.connect(lab.port) as c:
            assert await c.login() == LOGGED_IN   # the lock went with the session


async def test_message_pruned_during_the_session(tmp_path, store_backend):
    async with pop3_lab(tmp_path, backend=store_backend) as lab, await Client.connect(lab.port) as c:
        await c.login()
        await lab.remove_row("alice@lab.test", 0)
        assert await c.cmd("RETR 1") == b"-ERR message 1 is no longer available\r\n"
        assert await c.cmd("TOP 1 0") == b"-ERR message 1 is no longer available\r\n"
        assert await c.multi("RETR 2") == b"+OK 40 octets\r\n" + stuffed(TWO)
        assert await c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
        assert await c.cmd("QUIT") == SIGN_OFF + b" (1 message deleted, 2 left)\r\n"
    assert lab.stored("alice@lab.test") == [TWO, THREE]


# ---------------------------------------------------------------- the maildrop lock

async def test_in_use_lock(tmp_path, store_backend):
    async with pop3_lab(tmp_path, backend=store_backend) as lab:
        async with await Client.connect(lab.port) as first, await Client.connect(lab.port) as second:
            assert await first.login() == LOGGED_IN
            assert await second.login() == IN_USE
            assert await second.login("ALICE@lab.test", "alice pw") == IN_USE    # same mailbox
            assert await second.cmd("STAT") == b"-ERR STAT is not valid before login\r\n"
            # A wrong password never learns whether the mailbox is in use.
            assert await second.login("alice@lab.test", "wrong") == AUTH_FAILED
            assert await first.cmd("QUIT") == SIGN_OFF + b" (0 messages deleted, 3 left)\r\n"
            assert await first.closed()
            assert await second.login() == LOGGED_IN
        # Lock released after a dropped connection too.
        await wait_until(lambda: not lab.listener.locks, 3.0)
        async with await Client.connect(lab.port) as third:
            assert await third.login() == LOGGED_IN


async def test_lock_is_shared_by_the_daemons_pop3_listeners(tmp_path):
    async with pop3_lab(tmp_path) as lab:
        other = lab.second_listener(allow_insecure_auth=True)
        await other.start()
        try:
            async with await Client.connect(lab.port) as first, \
                    await Client.connect(other.sockets()[0][1]) as second:
                assert await first.login() == LOGGED_IN
                assert await second.login() == IN_USE
                assert await second.login("bob@lab.test") == b"+OK bob@lab.test has 0 messages (0 octets)\r\n"
        finally:
            other.stop_accepting()
            await other.drain(1.0)


async def test_uidl_stable_and_numbers_change_only_in_a_new_session(tmp_path, store_backend):
    async with pop3_lab(tmp_path, backend=store_backend) as lab:
        u1, u2, u3 = await uids(lab)
        async with await Client.connect(lab.port) as c:
            await c.login()
            assert await c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
            # Still numbered 1..3 in this session; 1 is just marked.
            assert await c.cmd("UIDL 2") == f"+OK 2 {u2}\r\n".encode()
            assert await c.multi("UIDL") == f"+OK unique-id listing follows\r\n2 {u2}\r\n3 {u3}\r\n.\r\n".encode()
            await c.cmd("QUIT")
        async with await Client.connect(lab.port) as c:
            await c.login()
            assert await c.multi("UIDL") == f"+OK unique-id listing follows\r\n1 {u2}\r\n2 {u3}\r\n.\r\n".encode()
            # New mail during a session is not in its maildrop (snapshot at login).
            await lab.deliver("alice@lab.test", b"Subject: four\r\n\r\nnew\r\n")
            assert await c.cmd("STAT") == b"+OK 2 80\r\n"
            assert await c.cmd("LIST 3") == b"-ERR no such message\r\n"
            await c.cmd("QUIT")
        u4 = (await uids(lab))[-1]
        assert u4 not in (u1, u2, u3)
        async with await Client.connect(lab.port) as c:
            await c.login()
            assert await c.multi("UIDL") == \
                f"+OK unique-id listing follows\r\n1 {u2}\r\n2 {u3}\r\n3 {u4}\r\n.\r\n".encode()


# ---------------------------------------------------------------- TLS

async def test_stls_then_login(tmp_path, tls):
    listener = {"allow_insecure_auth": False, "tls": {"cert": tls.cert, "key": tls.key}}
    async with pop3_lab(tmp_path, listener=listener) as lab, await Client.connect(lab.port) as c:
        assert await c.multi("CAPA") == capa("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                                             "STLS", "IMPLEMENTATION mta")
        assert await c.cmd("USER alice@lab.test") == NEEDS_STLS
        assert await c.cmd("AUTH PLAIN " + plain("", "alice@lab.test", "alice pw")) == NEEDS_STLS
        assert await c.cmd("STLS") == b"+OK Begin TLS negotiation\r\n"
        await c.start_tls(tls.client)
        assert await c.multi("CAPA") == capa("TOP", "UIDL", "USER", "SASL PLAIN", "RESP-CODES",
                                             "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION mta")
        assert await c.cmd("STLS") == b"-ERR TLS is already active\r\n"
        assert await c.login() == LOGGED_IN
        assert await c.multi("RETR 1") == b"+OK 97 octets\r\n" + stuffed(ONE)
        assert await c.cmd("QUIT") == SIGN_OFF + b" (0 messages deleted, 3 left)\r\n"


async def test_stls_discards_pipelined_plaintext(tmp_path, tls):
    """CVE-2011-0411 style: commands sent with STLS in the same packet are not run inside TLS."""
    listener = {"allow_insecure_auth": True, "tls": {"cert": tls.cert, "key": tls.key}}
    async with pop3_lab(tmp_path, listener=listener) as lab, await Client.connect(lab.port) as c:
        await c.send(b"STLS\r\nUSER alice@lab.test\r\n")
        assert await c.line() == b"+OK Begin TLS negotiation\r\n"
        await c.start_tls(tls.client)
        # Had the injected USER been run, this PASS would log in (and its +OK come first).
        assert await c.cmd("PASS alice pw") == b"-ERR PASS must follow a successful USER\r\n"
        assert await c.login() == LOGGED_IN


async def test_poplib_stls(tmp_path, tls):
    listener = {"allow_insecure_auth": False, "tls": {"cert": tls.cert, "key": tls.key}}
    async with pop3_lab(tmp_path, listener=listener) as lab:
        def session() -> tuple[bytes, bytes]:
            pop = poplib.POP3("127.0.0.1", lab.port, timeout=5)
            try:
                with pytest.raises(poplib.error_proto, match=r"\[AUTH\] plaintext"):
                    pop.user("alice@lab.test")
                pop.stls(context=tls.client)
                pop.user("alice@lab.test")
                pop.pass_("alice pw")
                _, lines, _ = pop.retr(2)
                return b"\r\n".join(lines) + b"\r\n", pop.quit()
            finally:
                pop.close()

        retrieved, bye = await asyncio.to_thread(session)
        assert retrieved == TWO and bye.startswith(SIGN_OFF)


async def test_poplib_implicit_tls(tmp_path, tls):
    listener = {"allow_insecure_auth": False, "tls": {"cert": tls.cert, "key": tls.key, "implicit": True}}
    async with pop3_lab(tmp_path, listener=listener) as lab:
        def session() -> tuple[dict, bytes]:
            pop = poplib.POP3_SSL("127.0.0.1", lab.port, context=tls.client, timeout=5)
            try:
                caps = pop.capa()
                pop.user("alice@lab.test")
                pop.pass_("alice pw")
                _, lines, _ = pop.retr(1)
                pop.quit()
                return caps, b"\r\n".join(lines) + b"\r\n"
            finally:
                pop.close()

        caps, retrieved = await asyncio.to_thread(session)
        assert "STLS" not in caps and "USER" in caps and caps["SASL"] == ["PLAIN"]
        assert retrieved == ONE


async def test_implicit_tls_raw(tmp_path, tls):
    listener = {"tls": {"cert": tls.cert, "key": tls.key, "implicit": True}, "allow_insecure_auth": False}
    async with pop3_lab(tmp_path, listener=listener) as lab:
        async with await Client.connect(lab.port, ssl_context=tls.client) as c:
            assert c.greeting == GREETING
            assert await c.cmd("STLS") == b"-ERR TLS is already active\r\n"
            assert await c.login() == LOGGED_IN
        # A plaintext client on the TLS port gets nowhere and the listener carries on.
        reader, writer = await asyncio.open_connection("127.0.0.1", lab.port)
        writer.write(b"USER alice@lab.test\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
        async with await Client.connect(lab.port, ssl_context=tls.client) as c:
            assert c.greeting == GREETING


async def test_failed_stls_handshake_closes_only_that_session(tmp_path, tls):
    listener = {"tls": {"cert": tls.cert, "key": tls.key}}
    async with pop3_lab(tmp_path, listener=listener) as lab:
        async with await Client.connect(lab.port) as c:
            assert await c.cmd("STLS") == b"+OK Begin TLS negotiation\r\n"
            await c.send(b"this is not a TLS client hello\r\n" * 10)
            assert await c.closed()
        async with await Client.connect(lab.port) as c:
            assert await c.login() == LOGGED_IN


# ---------------------------------------------------------------- abuse and limits

async def test_three_failed_logins_close_the_session(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mta.pop3")
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        assert await c.login(password="guess 1") == AUTH_FAILED
        assert await c.cmd("AUTH PLAIN " + plain("", "alice@lab.test", "guess 2")) == AUTH_FAILED
        assert await c.login(password="guess 3") == \
            b"-ERR [AUTH] authentication failed; too many failures, closing connection\r\n"
        assert await c.closed()
    text = caplog.text
    assert "pop3-login: Authentication failed: user=<alice@lab.test>, method=USER, rip=127.0.0.1" in text
    assert "pop3-login: Disconnected (auth failed, 3 attempts in 0 secs): rip=127.0.0.1" in text
    assert "guess" not in text


async def test_login_throttle_per_ip_is_shared(tmp_path):
    """After free_failures the next attempt from that IP waits, in any session; success resets it."""
    now = [1000.0]
    throttle = AuthThrottle(free_failures=1, max_delay=0.3, clock=lambda: now[0])
    async with pop3_lab(tmp_path, throttle=throttle) as lab:
        async with await Client.connect(lab.port) as c:
            assert throttle.delay("127.0.0.1") == 0.0          # the first failure is free
            assert await c.login(password="bad") == AUTH_FAILED
            assert throttle.delay("127.0.0.1") == 0.3
        async with await Client.connect(lab.port) as c:   # a new session from the same IP
            start = time.monotonic()
            assert await c.login() == LOGGED_IN
            assert time.monotonic() - start >= 0.3
        assert throttle.delay("127.0.0.1") == 0.0          # success forgave the failures
        async with await Client.connect(lab.port) as c:
            await c.login("bob@lab.test", "bad")
            now[0] += throttle.window + 1                   # failures age out of the window
            assert throttle.delay("127.0.0.1") == 0.0


async def test_connection_limit_per_ip(tmp_path):
    async with pop3_lab(tmp_path, limits={"max_connections_per_ip": 1}) as lab:
        async with await Client.connect(lab.port) as first:
            async with await Client.connect(lab.port, greeting=False) as refused:
                assert await refused.line() == b"-ERR [SYS/TEMP] too many connections\r\n"
                assert await refused.closed()
            assert await first.login() == LOGGED_IN
        await wait_until(lambda: lab.listener.limiter.total == 0, 3.0)
        async with await Client.connect(lab.port) as again:
            assert again.greeting == GREETING


async def test_a_failing_session_does_not_take_the_server_down(tmp_path, monkeypatch, caplog):
    async def boom(self, arg):
        raise RuntimeError("bug in NOOP")

    monkeypatch.setattr(POP3Session, "_noop", boom)
    async with pop3_lab(tmp_path) as lab:
        async with await Client.connect(lab.port) as c:
            await c.login()
            assert await c.cmd("NOOP") == b"-ERR [SYS/TEMP] internal server error\r\n"
            assert await c.closed()
        assert "pop3: session from 127.0.0.1 failed" in caplog.text
        await wait_until(lambda: not lab.listener.locks, 3.0)
        async with await Client.connect(lab.port) as c:
            assert await c.login() == LOGGED_IN
            assert await c.cmd("STAT") == b"+OK 3 177\r\n"
    assert lab.stored("alice@lab.test") == ALICE


async def test_random_garbage_gets_one_reply_per_line(tmp_path):
    rng = random.Random(1939)
    lines = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))).replace(b"\n", b"")
             for _ in range(200)]
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        await c.send(b"".join(line + b"\r\n" for line in lines) + b"CAPA\r\n")
        for _ in lines:
            assert (await c.line()).startswith(b"-ERR ")
        assert (await c.multi()).startswith(b"+OK Capability list follows\r\n")
        assert await c.login() == LOGGED_IN


async def test_shutdown_ends_sessions_without_deleting(tmp_path):
    async with pop3_lab(tmp_path) as lab:
        async with await Client.connect(lab.port) as c, await Client.connect(lab.port) as idle:
            await c.login()
            assert await c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
            lab.listener.stop_accepting()
            start = time.monotonic()
            await lab.listener.drain(5.0)
            assert time.monotonic() - start < 1.0   # idle sessions are not waited for
            assert await c.line() == b"-ERR [SYS/TEMP] server shutting down\r\n"
            assert await c.closed()
            assert await idle.line() == b"-ERR [SYS/TEMP] server shutting down\r\n"
            assert await idle.closed()
        assert not lab.listener.locks and not lab.listener.sessions
        assert lab.stored("alice@lab.test") == ALICE


async def test_logs_like_dovecot_without_passwords(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mta.pop3")
    async with pop3_lab(tmp_path) as lab, await Client.connect(lab.port) as c:
        await c.login()
        await c.multi("RETR 1")
        await c.multi("TOP 2 1")
        await c.cmd("DELE 1")
        await c.cmd("QUIT")
        assert await c.closed()
    text = caplog.text
    assert f"listening on 127.0.0.1:{lab.port} (pop3, pop3)" in text
    assert "pop3-login: Login: user=<alice@lab.test>, method=USER, rip=127.0.0.1, lip=127.0.0.1" in text
    assert ("pop3(alice@lab.test): Disconnected: Logged out rip=127.0.0.1, lip=127.0.0.1, top=1/24, "
            "retrieved=1/97, deleted=1/3, size=177") in text
    assert USERS["alice@lab.test"] not in text


# ---------------------------------------------------------------- poplib end to end

async def test_poplib_end_to_end(tmp_path, store_backend):
    async with pop3_lab(tmp_path, backend=store_backend) as lab:
        expected_uids = await uids(lab)

        def session():
            pop = poplib.POP3("127.0.0.1", lab.port, timeout=5)
            try:
                welcome = pop.getwelcome()
                pop.user("alice@lab.test")
                pop.pass_("alice pw")
                stat = pop.stat()
                listing = pop.list()[1]
                uidl = pop.uidl()[1]
                bodies = [b"\r\n".join(pop.retr(n)[1]) + b"\r\n" for n in (1, 2, 3)]
                top = pop.top(1, 1)[1]
                pop.dele(1)
                bye = pop.quit()
                return welcome, stat, listing, uidl, bodies, top, bye
            finally:
                pop.close()

        welcome, stat, listing, uidl, bodies, top, bye = await asyncio.to_thread(session)
        assert welcome == GREETING.rstrip()
        assert stat == (3, 177)
        assert listing == [b"1 97", b"2 40", b"3 40"]
        assert uidl == [f"{n} {u}".encode() for n, u in enumerate(expected_uids, 1)]
        assert bodies == [ONE, TWO, THREE + b"\r\n"]   # poplib undoes the byte-stuffing
        assert top == [b"From: carol@remote.test", b"To: alice@lab.test", b"Subject: one", b"", b"Hello"]
        assert bye == SIGN_OFF + b" (1 message deleted, 2 left)"
        assert lab.stored("alice@lab.test") == [TWO, THREE]
