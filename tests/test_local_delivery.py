"""Local delivery for local_domains: RCPT checks, the stored copy, limits, bounces, the log."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import sqlite3
import time

import pytest

from mta.config import build_config
from mta.errors import ConfigError, StoreError
from mta.model import MailboxCopy, NewMessage, RcptState, Recipient
from mta.passwords import set_password
from mta.store.api import RecipientUpdate
from mta.store.sqlite.store import SQLiteStore
from tests.support.in_process import listener_port, running
from tests.support.ports import free_port
from tests.support.smtp_peer import RecordingPeer
from tests.support.waiting import wait_until
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(60)

BODY = b"From: lab@lab.test\r\nSubject: test run 42\r\n\r\nline one\r\n.leading dot\r\n"
WIRE_BODY = BODY.replace(b"\r\n.", b"\r\n..")   # dot-stuffed for DATA (RFC 5321 §4.5.2)


@pytest.fixture
def mailboxes_file(tmp_path):
    path = tmp_path / "mailboxes.users"
    for user in ("alice@lab.test", "Bob@Lab.Test"):
        set_password(path, user, "pw")
    return path


@pytest.fixture
def lab(make_config, mailboxes_file, tmp_path):
    def make(**overrides):
        mailboxes = {"users_file": str(mailboxes_file), **overrides.pop("mailboxes", {})}
        return make_config(local_domains=["lab.test"], mailboxes=mailboxes, **overrides)
    return make


def mailbox_rows(config, columns="mailbox, sender, subject, size, data"):
    with sqlite3.connect(config.queue.path) as db:
        return db.execute(f"SELECT {columns} FROM mailbox_messages ORDER BY id").fetchall()


def queue_rows(config):
    with sqlite3.connect(config.queue.path) as db:
        return db.execute("SELECT address, state FROM recipients ORDER BY message_id, rcpt_no").fetchall()


async def rcpt_replies(config, recipients, sender="someone@example.test"):
    async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        assert (await w.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
        return [await w.cmd(f"RCPT TO:<{r}>") for r in recipients]


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("doc, problem", [
    ({"local_domains": ["lab.test"]},
     "mailboxes.users_file: missing (local_domains need mailbox users, or catch_all: true)"),
    ({"local_domains": ["lab.test"], "relay_domains": ["lab.test"], "mailboxes": {"catch_all": True}},
     'local_domains[0]: "lab.test" is also in relay_domains (mail for it is either kept here or relayed)'),
    ({"listeners": [{"name": "pop3", "address": "127.0.0.1:1110", "mode": "pop3"}],
      "mailboxes": {"catch_all": True}},
     "mailboxes.users_file: missing (a pop3 listener needs mailbox passwords)"),
    ({"mailboxes": {"max_messages": 0}}, "mailboxes.max_messages: 0 is below the minimum of 1"),
    ({"mailboxes": {"max_age": "soon"}}, 'mailboxes.max_age: "soon" is not a duration'),
    ({"mailboxes": {"quota": 5}}, "mailboxes.quota: unknown key"),
    ({"postmaster": "nobody"}, 'postmaster: "nobody" is not a mail address (user@domain)'),
    ({"mydestination": ["$myhostname", "bad domain"]}, 'mydestination[1]: "bad domain" is not a domain name'),
    ({"mydestination": ["lab.test"], "relay_domains": ["lab.test"]},
     'mydestination[0]: "lab.test" is also in relay_domains (mail for it is either kept here or relayed)'),
])
def test_config_errors_name_the_key(doc, problem):
    with pytest.raises(ConfigError) as err:
        build_config(doc)
    assert str(err.value) == problem


def test_config_defaults():
    config = build_config({"local_domains": ["Lab.Test."], "mailboxes": {"users_file": "u", "max_age": "2d"}})
    assert config.local_domains == ("lab.test",)
    assert config.mailboxes.max_messages == 10_000 and config.mailboxes.max_age == 2 * 86400
    assert config.mailboxes.catch_all is False


# --------------------------------------------------------------------------- RCPT

async def test_unknown_local_user_is_refused_at_rcpt(lab):
    config = lab()
    async with running(config):
        replies = await rcpt_replies(config, ["nobody@lab.test", "alice@lab.test", "BOB@lab.test"])
    assert replies == [
        "550 5.1.1 <nobody@lab.test>: Recipient address rejected: User unknown in local recipient table",
        "250 2.1.5 Ok",
        "250 2.1.5 Ok",
    ]


async def test_anyone_may_send_to_a_local_domain_but_not_relay(lab):
    config = lab(mynetworks=[])   # the client is not trusted: no relaying
    async with running(config):
        replies = await rcpt_replies(config, ["alice@lab.test", "x@example.test", "nobody@lab.test"])
    assert replies == [
        "250 2.1.5 Ok",
        "554 5.7.1 <x@example.test>: Relay access denied",
        "550 5.1.1 <nobody@lab.test>: Recipient address rejected: User unknown in local recipient table",
    ]


async def test_catch_all_accepts_any_local_address(lab):
    config = lab(mailboxes={"catch_all": True})
    async with running(config):
        replies = await rcpt_replies(config, ["whoever@lab.test", "x@other.lab.test"])
    assert replies[0] == "250 2.1.5 Ok"
    assert replies[1] == "250 2.1.5 Ok"   # trusted client (127.0.0.1 is in mynetworks): relayed


async def test_postmaster_without_domain_is_accepted(lab, mailboxes_file):
    """RFC 5321 §4.5.1: RCPT TO:<Postmaster> must be accepted."""
    set_password(mailboxes_file, "postmaster@lab.test", "pw")
    config = lab(mynetworks=[])
    async with running(config, deliver=True):
        assert await rcpt_replies(config, ["Postmaster"]) == ["250 2.1.5 Ok"]
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            assert (await w.mail("someone@example.test", ["Postmaster"], WIRE_BODY)).startswith("250 2.0.0")
        await wait_until(lambda: len(mailbox_rows(config)) == 1)
    assert mailbox_rows(config, "mailbox")[0] == ("postmaster@lab.test",)


async def test_every_postmaster_address_is_accepted_and_reaches_the_postmaster(make_config, mailboxes_file):
    """RFC 5321 §4.5.1: <Postmaster> and postmaster@ each local domain, each mydestination
    domain and our hostname are accepted from anyone -- no users file entry needed -- and
    delivered to the configured postmaster address; X-Original-To keeps what was given."""
    config = make_config(local_domains=["lab.test", "lab2.test"], mailboxes={"users_file": str(mailboxes_file)},
                         mynetworks=[], postmaster="alice@lab.test", mydestination=["$myhostname"])
    given = ["Postmaster", "postmaster@lab.test", "POSTMASTER@lab2.test", "postmaster@relay.lab.test"]
    async with running(config, deliver=True):
        assert await rcpt_replies(config, given) == ["250 2.1.5 Ok"] * 4
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            assert (await w.mail("someone@example.test", given, WIRE_BODY)).startswith("250 2.0.0")
        await wait_until(lambda: len(mailbox_rows(config)) == 4)
    rows = mailbox_rows(config, "mailbox, data")
    assert {mailbox for mailbox, _ in rows} == {"alice@lab.test"}
    originals = sorted(bytes(data).split(b"\r\n")[1].decode() for _, data in rows)
    assert originals == sorted(f"X-Original-To: {g}" for g in given)


async def test_postmaster_of_a_plain_relay_is_kept_in_its_own_mailbox(make_config, tmp_path):
    """No local domains, no mailbox users: postmaster@<hostname> is still accepted and kept
    (mailbox postmaster@<hostname>), never relayed to a smarthost or refused."""
    port = free_port("127.0.0.2")
    config = make_config(mynetworks=[], delivery={"smarthost": f"127.0.0.2:{port}"})
    async with RecordingPeer("127.0.0.2", port) as smarthost, running(config, deliver=True):
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            assert (await w.mail("someone@example.test", ["postmaster@relay.lab.test"], WIRE_BODY)).startswith("250")
        await wait_until(lambda: len(mailbox_rows(config)) == 1)
    assert mailbox_rows(config, "mailbox") == [("postmaster@relay.lab.test",)]
    assert smarthost.messages == []


async def test_mydestination_keeps_mail_for_our_hostname(make_config):
    """cron mails root@$(hostname): with mydestination: [$myhostname] it is kept here, in the
    mailbox root@<hostname>; without it, it is relayed as before (to the smarthost)."""
    port = free_port("127.0.0.2")
    local = make_config(mydestination=["$myhostname", "localhost"], delivery={"smarthost": f"127.0.0.2:{port}"})
    assert local.mydestination == ("relay.lab.test", "localhost")
    async with RecordingPeer("127.0.0.2", port) as smarthost, running(local, deliver=True):
        async with await Wire.connect("127.0.0.1", listener_port(local)) as w:
            assert (await w.mail("root@relay.lab.test", ["root@relay.lab.test", "www-data@localhost"],
                                 WIRE_BODY)).startswith("250")
        await wait_until(lambda: len(mailbox_rows(local)) == 2)
        assert smarthost.messages == []
    assert sorted(mailbox_rows(local, "mailbox")) == [("root@relay.lab.test",), ("www-data@localhost",)]

    port = free_port("127.0.0.2")
    relayed = make_config(delivery={"smarthost": f"127.0.0.2:{port}"})
    async with RecordingPeer("127.0.0.2", port) as smarthost, running(relayed, deliver=True):
        async with await Wire.connect("127.0.0.1", listener_port(relayed)) as w:
            assert (await w.mail("root@relay.lab.test", ["root@relay.lab.test"], WIRE_BODY)).startswith("250")
        [message] = await smarthost.wait_for_messages(1, timeout=10)
    assert message.rcpts == ["root@relay.lab.test"]


# --------------------------------------------------------------------------- delivery

async def test_local_and_remote_recipients_of_one_message(lab, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    port = free_port("127.0.0.2")
    config = lab(delivery={"routes": {"example.test": f"127.0.0.2:{port}"},
                           "connection_cache": {"idle_timeout": "0.2s"}})
    async with RecordingPeer("127.0.0.2", port) as peer, running(config, deliver=True):
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            reply = await w.mail("sender@example.test", ["alice@lab.test", "far@example.test", "bob@lab.test"],
                                 WIRE_BODY)
        queue_id = reply.rsplit(" ", 1)[1]
        await peer.wait_for_messages(1, timeout=10)
        await wait_until(lambda: queue_rows(config) == [] and len(mailbox_rows(config)) == 2)
    [relayed] = peer.messages
    assert relayed.rcpts == ["far@example.test"]
    rows = mailbox_rows(config, "mailbox, queue_id, sender, subject, size, data")
    assert [r[:4] for r in rows] == [("alice@lab.test", queue_id, "sender@example.test", "test run 42"),
                                     ("bob@lab.test", queue_id, "sender@example.test", "test run 42")]
    alice = rows[0][5]
    # The copy is: the trace fields of final delivery, then the message as queued (Received: first).
    assert alice.startswith(b"Return-Path: <sender@example.test>\r\nX-Original-To: alice@lab.test\r\n"
                            b"Delivered-To: alice@lab.test\r\nReceived: from client.test")
    assert alice.endswith(b"\r\n\r\n" + BODY.split(b"\r\n\r\n", 1)[1])
    assert relayed.data.endswith(BODY.split(b"\r\n\r\n", 1)[1])
    assert rows[0][4] == len(alice)
    assert b"Delivered-To: bob@lab.test\r\n" in rows[1][5]
    lines = [r.getMessage() for r in caplog.records if r.name == "mta.qmgr"]
    assert any(line.startswith(f"{queue_id}: to=<alice@lab.test>, relay=local, delay=")
               and line.endswith("dsn=2.0.0, status=sent (delivered to mailbox)") for line in lines), lines
    assert any("to=<far@example.test>, relay=127.0.0.2[127.0.0.2]" in line for line in lines), lines


async def test_user_removed_after_acceptance_bounces_to_the_sender_mailbox(lab, mailboxes_file):
    """A local sender gets the DSN for a local recipient that vanished: the bounce is local mail too."""
    config = lab()
    async with running(config), await Wire.connect("127.0.0.1", listener_port(config)) as w:   # accept only
        assert (await w.mail("alice@lab.test", ["bob@lab.test"], WIRE_BODY)).startswith("250")
    mailboxes_file.write_text("\n".join(line for line in mailboxes_file.read_text().splitlines()
                                    if not line.lower().startswith("bob@")) + "\n")
    async with running(config, deliver=True):
        await wait_until(lambda: queue_rows(config) == [] and len(mailbox_rows(config)) == 1)
    [(mailbox, sender, subject, _, data)] = mailbox_rows(config)
    assert (mailbox, sender) == ("alice@lab.test", "")
    assert data.startswith(b"Return-Path: <>\r\n")
    dsn = email.message_from_bytes(data, policy=email.policy.default)
    status = dsn.get_payload()[1].get_payload()[1]
    assert status["Action"] == "failed" and status["Status"] == "5.1.1"
    assert status["Final-Recipient"] == "rfc822; bob@lab.test"
    assert "Remote-MTA" not in status


async def test_notify_success_gets_a_delivered_report(lab):
    config = lab()
    async with running(config, deliver=True):
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            await w.ehlo()
            assert (await w.cmd("MAIL FROM:<alice@lab.test>")).startswith("250")
            assert (await w.cmd("RCPT TO:<bob@lab.test> NOTIFY=SUCCESS")).startswith("250")
            assert (await w.cmd("DATA")).startswith("354")
            await w.send(WIRE_BODY + b".", crlf=True)
            assert (await w.reply())[-1].startswith("250 2.0.0")
        await wait_until(lambda: len(mailbox_rows(config)) == 2 and queue_rows(config) == [])
    [(box1, _, _, _, _), (box2, sender, _, _, data)] = mailbox_rows(config)
    assert (box1, box2, sender) == ("bob@lab.test", "alice@lab.test", "")
    status = email.message_from_bytes(data, policy=email.policy.default).get_payload()[1].get_payload()[1]
    assert status["Action"] == "delivered" and status["Status"] == "2.0.0"


async def test_max_messages_keeps_the_newest(lab):
    config = lab(mailboxes={"max_messages": 3})
    async with running(config, deliver=True), await Wire.connect("127.0.0.1", listener_port(config)) as w:
        await w.ehlo()
        for n in range(5):
            body = f"Subject: number {n}\r\n\r\nbody\r\n".encode()
            assert (await w.mail("s@example.test", ["alice@lab.test"], body, ehlo=False)).startswith("250")
            await wait_until(lambda n=n: len(mailbox_rows(config, "id")) == min(n + 1, 3)
                             and queue_rows(config) == [])
    assert mailbox_rows(config, "subject") == [("number 2",), ("number 3",), ("number 4",)]


async def test_max_age_prunes_old_mail(lab):
    config = lab(mailboxes={"max_age": "1d"})
    store = SQLiteStore(config.queue.path)
    await store.open()
    from mta.store.sqlite.mailboxes import insert_copies
    copies = [MailboxCopy("alice@lab.test", "AAAA", "s@x.test", "old", b"Subject: old\r\n\r\n\r\n")]
    await store.engine.write(lambda conn: insert_copies(conn, copies, time.time() - 2 * 86400))
    copies = [MailboxCopy("alice@lab.test", "BBBB", "s@x.test", "new", b"Subject: new\r\n\r\n\r\n")]
    await store.engine.write(lambda conn: insert_copies(conn, copies, time.time() - 3600))
    await store.close()
    async with running(config):
        await wait_until(lambda: len(mailbox_rows(config, "id")) == 1)
    assert mailbox_rows(config, "subject") == [("new",)]


async def test_max_age_waits_for_a_pop3_session_holding_the_mailbox(lab, monkeypatch):
    # RFC 1939 8: the session has the maildrop to itself. Mail that grows too old
    # meanwhile stays until the session ends; the next round removes it.
    import mta.daemon.main_process
    monkeypatch.setattr(mta.daemon.main_process, "PRUNE_INTERVAL", 0.05)
    pop3 = {"name": "pop3", "address": f"127.0.0.1:{free_port()}", "mode": "pop3", "allow_insecure_auth": True}
    smtp = {"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"}
    config = lab(listeners=[smtp, pop3], mailboxes={"max_age": "1d"})
    store = SQLiteStore(config.queue.path)
    await store.open()
    from mta.store.sqlite.mailboxes import insert_copies
    for mailbox, received in (("alice@lab.test", 86400 - 3.0), ("bob@lab.test", 86400 - 3.0)):
        copies = [MailboxCopy(mailbox, "AAAA", "s@x.test", "ageing", b"Subject: ageing\r\n\r\nbody\r\n")]
        await store.engine.write(lambda conn, c=copies, r=received: insert_copies(conn, c, time.time() - r))
    await store.close()
    async with running(config):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener_port(config, "pop3"))
        try:
            assert (await reader.readline()).startswith(b"+OK")
            for line in (b"USER alice@lab.test\r\n", b"PASS pw\r\n"):
                writer.write(line)
                assert (await reader.readline()).startswith(b"+OK")
            # Past max_age now: bob's copy goes, alice's stays while her session lasts.
            await wait_until(lambda: mailbox_rows(config, "mailbox") == [("alice@lab.test",)])
            await asyncio.sleep(0.2)
            writer.write(b"RETR 1\r\n")
            assert (await reader.readline()).startswith(b"+OK")
            writer.write(b"QUIT\r\n")
            await writer.drain()
        finally:
            writer.close()
        await wait_until(lambda: mailbox_rows(config, "mailbox") == [])


async def test_mailbox_copy_and_delivered_state_are_one_commit(store_backend):
    """If the commit that marks a local recipient delivered fails, no copy is kept either
    (both backends: the queue's record_outcomes stores the copies)."""
    queue = store_backend.queue
    await queue.enqueue(NewMessage(id="AAAA00000001", sender="s@example.test",
                                   recipients=(Recipient("alice@lab.test"),), data=BODY, arrival=time.time()))
    [claimed] = (await queue.claim(time.time(), 10)).due
    delivered = RecipientUpdate(claimed.rcpt_no, RcptState.DELIVERED, 1, time.time(), None)
    copy = MailboxCopy("alice@lab.test", "AAAA00000001", "s@example.test", "t", BODY)
    clash = NewMessage(id="AAAA00000001", sender="", recipients=(Recipient("s@example.test"),),
                       data=b"dsn", arrival=time.time())   # same id: fails inside the commit
    with pytest.raises(StoreError):   # the commit fails whole
        await queue.record_outcomes("AAAA00000001", [delivered], time.time(), new_messages=[clash],
                                    mailbox_copies=[copy])
    assert await store_backend.query("SELECT COUNT(*) FROM mailbox_messages") == [(0,)]
    assert await store_backend.query("SELECT state FROM recipients") == [("active",)]
    assert await store_backend.mailboxes.messages("alice@lab.test") == []
