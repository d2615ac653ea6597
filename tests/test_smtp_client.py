"""mta.delivery.client: one outbound SMTP session, checked on the wire."""

from __future__ import annotations

import asyncio
import time

import pytest

from mta.config import TimeoutsConfig
from mta.delivery.client import ConnectFailed, ConnectionLost, Session, connect, parse_reply, to_wire
from mta.errors import PermanentError, TransientError
from mta.model import Reply
from tests.support.ports import free_port
from tests.support.smtp_peer import END_OF_DATA, RecordingPeer

pytestmark = pytest.mark.timeout(10)

TIMEOUTS = TimeoutsConfig(connect=2.0, command=2.0)
BODY = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: hello\r\n\r\nline one\r\nline two\r\n"


async def open_session(peer: RecordingPeer, *, tls: str = "may", timeouts: TimeoutsConfig = TIMEOUTS,
                       auth: tuple[str, str] | None = None) -> Session:
    return await connect(peer.host, peer.port, server_name="mx.test", helo_name="relay.test", tls=tls,
                         timeouts=timeouts, auth=auth)


async def test_delivers_envelope_and_body_intact() -> None:
    async with RecordingPeer() as peer:
        session = await open_session(peer)
        assert session.peer == f"mx.test[127.0.0.2]:{peer.port}"
        assert not session.tls_active
        results = await session.send("a@x.test", ["b@y.test"], BODY)
        assert results["b@y.test"].code == 250
        assert session.transactions == 1
        await session.quit()
        await peer.wait_finished()
    conn, = peer.connections
    assert conn.transcript == ["EHLO relay.test", f"MAIL FROM:<a@x.test> SIZE={len(BODY)}",
                               "RCPT TO:<b@y.test>", "DATA", "QUIT"]
    msg, = conn.messages
    assert (msg.sender, msg.rcpts, msg.data) == ("a@x.test", ["b@y.test"], BODY)
    assert conn.closed_by_peer and not conn.client_closed


async def test_pipelining_sends_mail_rcpt_data_in_one_write() -> None:
    async with RecordingPeer() as peer:
        session = await open_session(peer)
        results = await session.send("a@x.test", ["b@y.test", "c@y.test", "d@y.test"], BODY)
        await session.quit()
    assert [r.code for r in results.values()] == [250, 250, 250]
    # RFC 2920 3.1: the whole envelope and DATA arrived in one read; DATA ends the group.
    assert [f"MAIL FROM:<a@x.test> SIZE={len(BODY)}", "RCPT TO:<b@y.test>", "RCPT TO:<c@y.test>",
            "RCPT TO:<d@y.test>", "DATA"] in peer.connections[0].batches


async def test_no_pipelining_when_not_offered() -> None:
    async with RecordingPeer(extensions=["SIZE 1000000", "8BITMIME"]) as peer:
        session = await open_session(peer)
        await session.send("a@x.test", ["b@y.test", "c@y.test"], BODY)
        await session.quit()
    batches = peer.connections[0].batches
    assert all(len(batch) == 1 for batch in batches), batches
    assert peer.connections[0].verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]


async def test_message_bigger_than_peer_size_fails_before_mail() -> None:
    async with RecordingPeer(extensions=["PIPELINING", "SIZE 100"]) as peer:
        session = await open_session(peer)
        with pytest.raises(PermanentError) as info:
            await session.send("a@x.test", ["b@y.test"], b"x" * 200 + b"\r\n")
        assert info.value.reply == Reply(552, "5.3.4", "Message size exceeds fixed limit of the next hop")
        await session.quit()
    assert peer.connections[0].verbs == ["EHLO", "QUIT"]


@pytest.mark.parametrize("smtputf8, sender", [(True, "a@x.test"), (False, "ä@x.test")])
async def test_smtputf8_needed_but_not_offered(smtputf8: bool, sender: str) -> None:
    async with RecordingPeer(extensions=["PIPELINING", "8BITMIME"]) as peer:
        session = await open_session(peer)
        with pytest.raises(PermanentError) as info:
            await session.send(sender, ["b@y.test"], BODY, smtputf8=smtputf8)
        assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.6.7")
        await session.quit()
    assert peer.connections[0].verbs == ["EHLO", "QUIT"]


async def test_smtputf8_and_8bitmime_parameters() -> None:
    async with RecordingPeer() as peer:
        session = await open_session(peer)
        data = "Subject: grüße\r\n\r\nÄ\r\n".encode()
        await session.send("ä@x.test", ["ö@y.test"], data, body_8bit=True)
        await session.quit()
    assert peer.connections[0].transcript[1:3] == [
        f"MAIL FROM:<ä@x.test> SIZE={len(data)} BODY=8BITMIME SMTPUTF8", "RCPT TO:<ö@y.test>"]
    assert peer.messages[0].data == data


async def test_mixed_recipient_results() -> None:
    def replies(verb: str, arg: str, conn: object) -> str | None:
        if verb == "RCPT" and "unknown" in arg:
            return "550 5.1.1 <unknown@y.test>: Recipient address rejected: User unknown"
        if verb == "RCPT" and "full" in arg:
            return "452 4.2.2 Mailbox full"
        return None

    async with RecordingPeer(replies=replies) as peer:
        session = await open_session(peer)
        results = await session.send("a@x.test", ["ok@y.test", "unknown@y.test", "full@y.test"], BODY)
        await session.quit()
    assert results["ok@y.test"].code == 250
    assert results["unknown@y.test"] == Reply(
        550, "5.1.1", "<unknown@y.test>: Recipient address rejected: User unknown")
    assert results["full@y.test"] == Reply(452, "4.2.2", "Mailbox full")
    assert peer.messages[0].rcpts == ["ok@y.test"]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_no_recipient_accepted_sends_no_data(pipelining: bool) -> None:
    ext = ["PIPELINING", "SIZE 1000000"] if pipelining else ["SIZE 1000000"]
    async with RecordingPeer(extensions=ext, replies=lambda v, a, c: "550 5.1.1 no" if v == "RCPT" else None
                             ) as peer:
        session = await open_session(peer)
        results = await session.send("a@x.test", ["b@y.test", "c@y.test"], BODY)
        assert {r.code for r in results.values()} == {550}
        # The session is still in step: a second transaction works.
        assert await session.rset()
        await session.quit()
    verbs = peer.connections[0].verbs
    assert verbs == (["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "RSET", "QUIT"] if pipelining
                     else ["EHLO", "MAIL", "RCPT", "RCPT", "RSET", "QUIT"])
    assert peer.messages == []


@pytest.mark.parametrize("reply, error", [("550 5.7.1 Sender rejected", PermanentError),
                                          ("451 4.3.0 Try later", TransientError)])
@pytest.mark.parametrize("pipelining", [True, False])
async def test_mail_refused_raises_and_session_survives(reply: str, error: type, pipelining: bool) -> None:
    ext = ["PIPELINING"] if pipelining else ["8BITMIME"]
    async with RecordingPeer(extensions=ext,
                             replies=lambda v, a, c: reply if v == "MAIL" and c.peer.counts["MAIL"] == 1
                             else None) as peer:
        session = await open_session(peer)
        with pytest.raises(error) as info:
            await session.send("a@x.test", ["b@y.test"], BODY)
        assert str(info.value.reply) == reply
        assert session.is_alive and await session.rset()
        results = await session.send("a@x.test", ["b@y.test"], BODY)
        assert results["b@y.test"].code == 250
        await session.quit()
    assert len(peer.messages) == 1


@pytest.mark.parametrize("tls", ["may", "encrypt"])
async def test_starttls_then_ehlo_again(tls: str) -> None:
    async with RecordingPeer(starttls=True) as peer:
        session = await open_session(peer, tls=tls)
        assert session.tls_active
        assert "STARTTLS" not in session.extensions and session.has("PIPELINING")
        await session.send("a@x.test", ["b@y.test"], BODY)
        await session.quit()
        await peer.wait_finished()
    conn = peer.connections[0]
    assert conn.tls
    assert conn.verbs == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert peer.messages[0].data == BODY


async def test_tls_none_ignores_starttls() -> None:
    async with RecordingPeer(starttls=True) as peer:
        session = await open_session(peer, tls="none")
        assert not session.tls_active
        await session.quit()
    assert peer.connections[0].verbs == ["EHLO", "QUIT"]


async def test_plaintext_injected_before_tls_handshake_is_discarded() -> None:
    # CVE-2011-0411: a man in the middle appends a reply to the 220 for STARTTLS. Were it
    # kept, it would be read as the answer to the EHLO sent inside TLS.
    async with RecordingPeer(starttls=True, inject_after_starttls=b"250 injected\r\n") as peer:
        session = await open_session(peer)
        assert session.tls_active and session.has("PIPELINING") and session.size_limit == 10240000
        results = await session.send("a@x.test", ["b@y.test"], BODY)
        assert results["b@y.test"].code == 250
        await session.quit()


async def test_encrypt_without_starttls_is_transient() -> None:
    async with RecordingPeer() as peer:
        with pytest.raises(TransientError) as info:
            await open_session(peer, tls="encrypt")
        assert info.value.reply.enhanced == "4.7.4"
        assert "TLS is required, but was not offered by host mx.test[127.0.0.2]" in info.value.reply.text
        await peer.wait_finished()
    assert peer.connections[0].verbs == ["EHLO", "QUIT"]


async def test_bare_cr_and_lf_are_normalised_on_the_wire() -> None:
    # A bare LF followed by "." and CRLF must not end the data early on a lenient
    # server (SMTP smuggling); every line ending on the wire is CRLF.
    data = b"Subject: x\n\nfirst\rsecond\nthird\n.\r\nMAIL FROM:<evil@x.test>\r\nlast"
    async with RecordingPeer() as peer:
        session = await open_session(peer)
        await session.send("a@x.test", ["b@y.test"], data)
        await session.quit()
    assert peer.messages[0].data == (b"Subject: x\r\n\r\nfirst\r\nsecond\r\nthird\r\n.\r\n"
                                     b"MAIL FROM:<evil@x.test>\r\nlast\r\n")
    assert peer.connections[0].verbs.count("MAIL") == 1
    wire, size = to_wire(data)
    assert b"\n." not in wire.replace(b"\r\n..", b"").replace(b"\r\n.\r\n", b"")
    assert size == len(peer.messages[0].data)


async def test_dot_stuffing() -> None:
    data = b".leading dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n"
    assert to_wire(data)[0] == b"..leading dot\r\n...two dots\r\n..\r\nafter a lone dot\r\n.\r\n"
    async with RecordingPeer() as peer:
        session = await open_session(peer)
        await session.send("a@x.test", ["b@y.test"], data)
        await session.quit()
    assert peer.messages[0].data == data


async def test_empty_body() -> None:
    assert to_wire(b"") == (b".\r\n", 0)


async def test_cr_lf_nul_in_addresses_refused_before_the_wire() -> None:
    async with RecordingPeer() as peer:
        session = await open_session(peer)
        with pytest.raises(PermanentError) as info:
            await session.send("a@x.test>\r\nRCPT TO:<evil@z.test", ["b@y.test"], BODY)
        assert info.value.reply.enhanced == "5.1.7"
        results = await session.send("a@x.test", ["b@y.test\r\nDATA", "c@y\0.test"], BODY)
        assert {r.enhanced for r in results.values()} == {"5.1.3"}
        results = await session.send("a@x.test", ["bad\n@y.test", "ok@y.test"], BODY)
        assert results["bad\n@y.test"].enhanced == "5.1.3" and results["ok@y.test"].code == 250
        await session.quit()
    assert peer.connections[0].transcript[:3] == ["EHLO relay.test", f"MAIL FROM:<a@x.test> SIZE={len(BODY)}",
                                                  "RCPT TO:<ok@y.test>"]
    assert peer.messages[0].rcpts == ["ok@y.test"]


async def test_ehlo_refused_falls_back_to_helo() -> None:
    async with RecordingPeer(replies=lambda v, a, c: "502 5.5.2 Error: command not recognized"
                             if v == "EHLO" else None) as peer:
        session = await open_session(peer)
        assert not session.esmtp and session.extensions == {}
        await session.send("a@x.test", ["b@y.test"], BODY, body_8bit=True)
        await session.quit()
    assert peer.connections[0].transcript == ["EHLO relay.test", "HELO relay.test", "MAIL FROM:<a@x.test>",
                                              "RCPT TO:<b@y.test>", "DATA", "QUIT"]


async def test_quit_waits_for_221() -> None:
    async def slow_quit(verb: str, arg: str, conn: object) -> str | None:
        if verb == "QUIT":
            await asyncio.sleep(0.3)
            return "221 2.0.0 Bye"
        return None

    async with RecordingPeer(replies=slow_quit) as peer:
        session = await open_session(peer)
        started = time.monotonic()
        await session.quit()
        assert 0.25 < time.monotonic() - started < 1.5
        assert not session.is_alive
        await peer.wait_finished()
    conn = peer.connections[0]
    assert conn.closed_by_peer and not conn.client_closed   # the client was still there for the 221


async def test_quit_gives_up_on_a_silent_peer() -> None:
    async def never(verb: str, arg: str, conn: object) -> str | None:
        if verb == "QUIT":
            await asyncio.sleep(30)
        return None

    async with RecordingPeer(replies=never) as peer:
        session = await open_session(peer, timeouts=TimeoutsConfig(connect=1, command=0.3))
        started = time.monotonic()
        await session.quit()   # min(2 s, command timeout)
        assert time.monotonic() - started < 1.0


# A 5xx greeting refuses service, not the mail: transient, so the router tries the
# next host and defers (Postfix's smtp_skip_5xx_greeting = yes).
@pytest.mark.parametrize("greeting, error, reply", [
    ("421 4.3.2 Service shutting down", ConnectionLost, "421 4.3.2 Service shutting down"),
    ("554 5.7.1 Go away", TransientError, "450 4.7.1 host mx.test[127.0.0.2] refused to talk to me: 554 5.7.1 Go away"),
    ("450 4.7.1 Busy", TransientError, "450 4.7.1 Busy")])
async def test_greeting_refusal(greeting: str, error: type, reply: str) -> None:
    async with RecordingPeer(greeting=greeting) as peer:
        with pytest.raises(error) as info:
            await open_session(peer)
        assert str(info.value.reply) == reply
        await peer.wait_finished()
    assert peer.connections[0].verbs == ([] if greeting.startswith("421") else ["QUIT"])


async def test_silent_peer_times_out_at_greeting() -> None:
    async with RecordingPeer(silent=True) as peer:
        with pytest.raises(ConnectionLost) as info:
            await open_session(peer, timeouts=TimeoutsConfig(connect=1, command=0.3))
    assert info.value.reply.enhanced == "4.4.2"
    assert info.value.reply.text == ("conversation with mx.test[127.0.0.2] timed out "
                                     "while receiving the initial server greeting")


async def test_connection_refused_in_postfix_words() -> None:
    port = free_port("127.0.0.2")
    with pytest.raises(ConnectFailed) as info:
        await connect("127.0.0.2", port, server_name="mx.test", helo_name="relay.test", tls="may",
                      timeouts=TIMEOUTS)
    assert info.value.reply == Reply(451, "4.4.1", f"connect to mx.test[127.0.0.2]:{port}: Connection refused")


async def test_421_mid_transaction_kills_the_session() -> None:
    async with RecordingPeer(replies=lambda v, a, c: "421 4.3.2 Shutting down" if v == "RCPT" else None) as peer:
        session = await open_session(peer)
        with pytest.raises(ConnectionLost) as info:
            await session.send("a@x.test", ["b@y.test"], BODY)
        assert info.value.reply.code == 421
        assert not session.is_alive
        assert not await session.rset()
        await session.quit()


async def test_connection_dropped_during_data() -> None:
    async with RecordingPeer(drop_after_data_bytes=10) as peer:
        session = await open_session(peer)
        with pytest.raises(ConnectionLost) as info:
            await session.send("a@x.test", ["b@y.test"], BODY * 100)
        assert info.value.reply.text.startswith("lost connection with mx.test[127.0.0.2] while sending")
        assert not session.is_alive
        await session.quit()
    assert peer.messages == []


async def test_data_refused_after_the_dot() -> None:
    async with RecordingPeer(replies=lambda v, a, c: "451 4.3.0 Queue trouble" if v == END_OF_DATA
                             else None) as peer:
        session = await open_session(peer)
        results = await session.send("a@x.test", ["b@y.test", "c@y.test"], BODY)
        await session.quit()
    assert set(results.values()) == {Reply(451, "4.3.0", "Queue trouble")}


async def test_unsolicited_421_while_idle_fails_rset() -> None:
    async with RecordingPeer(idle_421_after=0.2) as peer:
        session = await open_session(peer)
        await peer.wait_finished()   # the peer said 421 and hung up
        assert not await session.rset()
        await session.quit()
    assert peer.connections[0].verbs == ["EHLO"]


@pytest.mark.parametrize("mechanisms", ["PLAIN LOGIN", "LOGIN"])
async def test_auth(mechanisms: str) -> None:
    async with RecordingPeer(auth={"relay": "s3cret"}, auth_mechanisms=mechanisms) as peer:
        session = await open_session(peer, auth=("relay", "s3cret"))
        await session.send("a@x.test", ["b@y.test"], BODY)
        await session.quit()
    assert peer.connections[0].auth_user == "relay"
    assert peer.connections[0].verbs[1] == "AUTH"


async def test_auth_failure_defers() -> None:
    async with RecordingPeer(auth={"relay": "s3cret"}) as peer:
        with pytest.raises(TransientError) as info:
            await open_session(peer, auth=("relay", "wrong"))
        assert info.value.reply.enhanced == "4.7.8"
        assert "SASL authentication failed" in info.value.reply.text


def test_parse_multiline_reply() -> None:
    assert parse_reply(["550-5.1.1 The email account that you tried to reach does not exist.",
                        "550-5.1.1 Please try double-checking the recipient's email address",
                        "550 5.1.1 for typos."]) == Reply(
        550, "5.1.1", "The email account that you tried to reach does not exist. Please try "
        "double-checking the recipient's email address for typos.")
    assert parse_reply(["250 Ok"]) == Reply(250, "2.0.0", "Ok")
