"""Delivery status notifications: every DSN is parsed back with the standard email package."""

from __future__ import annotations

import email
import email.policy
import email.utils
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta import bounce
from mta.bounce import ReportedRecipient, build_dsn, remote_mta_of
from mta.model import Reply

NOW = 1_700_000_200.0
ARRIVAL = 1_700_000_000.0
ATTEMPT = 1_700_000_100.0
ORIGINAL = (b"Received: from client.example.com (client.example.com [192.0.2.9])\r\n"
            b"\tby relay.example.test (mta) with ESMTP id ABC123\r\n"
            b"From: Alice <alice@example.com>\r\n"
            b"To: bob@example.org\r\n"
            b"Subject: lunch?\r\n"
            b"Message-ID: <orig-1@example.com>\r\n"
            b"\r\n"
            b"Shall we meet at noon?\r\n"
            b"-- \r\nAlice\r\n")
ORIGINAL_HEADERS = ORIGINAL[:ORIGINAL.index(b"\r\n\r\n") + 2]
USER_UNKNOWN = Reply(550, "5.1.1", "<bob@example.org>: Recipient address rejected: User unknown")


def rcpt(address="bob@example.org", reply=USER_UNKNOWN, remote="mx1.example.test", **kw):
    return ReportedRecipient(address=address, reply=reply, remote_mta=remote, last_attempt=ATTEMPT, **kw)


def dsn(recipients=None, **kw) -> bytes:
    args = dict(hostname="relay.example.test", original_queue_id="ABC123", sender="alice@example.com",
                original=ORIGINAL, arrival=ARRIVAL, now=NOW,
                recipients=[rcpt()] if recipients is None else recipients,
                message_id="20231114221640.DEF456@relay.example.test")
    args.update(kw)
    return build_dsn(**args)


def check_lines(data: bytes) -> None:
    """CRLF line ends only; no line over 998 octets (RFC 5322 §2.1.1)."""
    assert data.endswith(b"\r\n")
    bare = data.replace(b"\r\n", b"")
    assert b"\r" not in bare and b"\n" not in bare
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def parse(data: bytes):
    """(message, [text part, delivery-status part, returned part]) after the structural checks."""
    check_lines(data)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert len(parts) == 3
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == "message/delivery-status"
    assert parts[2].get_content_type() in ("text/rfc822-headers", "message/rfc822")
    return msg, parts


def status_blocks(part):
    """The per-message block and the per-recipient blocks of a message/delivery-status part."""
    blocks = part.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 1
    return blocks[0], blocks[1:]


def date_of(value: str) -> datetime:
    return email.utils.parsedate_to_datetime(str(value))


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def unfold(value) -> str:
    return " ".join(str(value).split())


# ----------------------------------------------------------------------------- remote_mta_of

@pytest.mark.parametrize("relay, name", [
    ("mx1.example.test[127.0.0.2]:25", "mx1.example.test"),
    ("mx1.example.test[127.0.0.2]:2525", "mx1.example.test"),
    ("127.0.0.2[127.0.0.2]:25", "127.0.0.2"),
    ("mx6.example.test[2001:db8::1]:25", "mx6.example.test"),
    ("[2001:db8::1]:25", "2001:db8::1"),
    ("mx1.example.test:25", "mx1.example.test"),
    ("mx1.example.test", "mx1.example.test"),
    ("none", None),
    ("NONE", None),
    ("", None),
    ("  ", None),
])
def test_remote_mta_of(relay, name):
    assert remote_mta_of(relay) == name


# ----------------------------------------------------------------------------- a plain failure

def test_top_level_headers():
    data = dsn()
    msg, _ = parse(data)
    assert b"\r\nFrom: MAILER-DAEMON@relay.example.test (Mail Delivery System)\r\n" in data
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.example.test"
    assert msg["To"] == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Message-ID"] == "<20231114221640.DEF456@relay.example.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert date_of(msg["Date"]) == at(NOW)
    assert msg.get_boundary()
    assert "Content-Transfer-Encoding" not in msg   # all 7-bit: no label needed


def test_message_id_gets_angle_brackets_once():
    assert parse(dsn(message_id="<a.b@relay.example.test>"))[0]["Message-ID"] == "<a.b@relay.example.test>"
    assert parse(dsn(message_id=""))[0]["Message-ID"].endswith("@relay.example.test>")


def test_text_part_is_postfix_wording():
    _, (text, _, _) = parse(dsn())
    assert text.get_content_charset() == "us-ascii"
    body = unfold(text.get_content())
    assert body.startswith("This is the mail system at host relay.example.test.")
    assert "I'm sorry to have to inform you that your message could not be delivered to one or more " \
           "recipients." in body
    assert ("<bob@example.org>: host mx1.example.test said: 550 5.1.1 <bob@example.org>: "
            "Recipient address rejected: User unknown") in body


def test_delivery_status_fields():
    _, (_, status, _) = parse(dsn(envid="QQ314159"))
    per_message, per_rcpt = status_blocks(status)
    assert per_message["Reporting-MTA"] == "dns; relay.example.test"
    assert per_message["X-Mta-Queue-ID"] == "ABC123"
    assert per_message["X-Mta-Sender"] == "rfc822; alice@example.com"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert date_of(per_message["Arrival-Date"]) == at(ARRIVAL)
    [block] = per_rcpt
    assert block["Final-Recipient"] == "rfc822; bob@example.org"
    assert "Original-Recipient" not in block
    assert block["Action"] == "failed"
    assert block["Status"] == USER_UNKNOWN.enhanced
    assert block["Remote-MTA"] == "dns; mx1.example.test"
    assert unfold(block["Diagnostic-Code"]) == f"smtp; {USER_UNKNOWN}"
    assert date_of(block["Last-Attempt-Date"]) == at(ATTEMPT)
    assert "Will-Retry-Until" not in block


def test_returned_headers_are_exactly_the_original_headers():
    _, (_, _, returned) = parse(dsn())
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Transfer-Encoding"] is None
    payload = returned.get_payload()
    assert payload.encode() == ORIGINAL_HEADERS
    assert "Shall we meet" not in payload


def test_ret_full_returns_the_whole_message():
    _, (_, _, returned) = parse(dsn(ret_full=True))
    assert returned.get_content_type() == "message/rfc822"
    [inner] = returned.get_payload()
    assert inner["Subject"] == "lunch?"
    assert inner["Message-ID"] == "<orig-1@example.com>"
    assert inner.get_content() == "Shall we meet at noon?\r\n-- \r\nAlice\r\n"
    raw = dsn(ret_full=True)
    assert ORIGINAL in raw


def test_ret_full_over_the_size_limit_returns_headers_only():
    _, (_, _, returned) = parse(dsn(ret_full=True, size_limit=len(ORIGINAL) - 1))
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload().encode() == ORIGINAL_HEADERS
    _, (_, _, returned) = parse(dsn(ret_full=True, size_limit=len(ORIGINAL)))
    assert returned.get_content_type() == "message/rfc822"


# ----------------------------------------------------------------------------- other actions

def test_delayed_notification():
    until = ARRIVAL + 5 * 86400
    reply = Reply(451, "4.4.1", "connect to mx1.example.test[192.0.2.1]:25: Connection timed out")
    msg, (text, status, _) = parse(dsn([rcpt(reply=reply, remote=None, action="delayed",
                                             will_retry_until=until)], now=ARRIVAL + 4 * 3600))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    body = unfold(text.get_content())
    assert "THIS IS A WARNING ONLY." in body
    assert "could not be delivered for 4 hour(s)." in body
    assert "retried until it is 5 day(s) old." in body
    assert "<bob@example.org>: connect to mx1.example.test[192.0.2.1]:25: Connection timed out" in body
    assert "sorry" not in body
    _, [block] = status_blocks(status)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert date_of(block["Will-Retry-Until"]) == at(until)
    assert "Remote-MTA" not in block   # nobody answered
    assert unfold(block["Diagnostic-Code"]) == f"X-mta; {reply.text}"


@pytest.mark.parametrize("action", ["relayed", "delivered"])
def test_success_notification(action):
    ok = Reply(250, "2.0.0", "Ok: queued as 4XYZ")
    msg, (text, status, _) = parse(dsn([rcpt(reply=ok, action=action)]))
    assert msg["Subject"] == "Successful Mail Delivery Report"
    body = unfold(text.get_content())
    assert "Your message was successfully delivered" in body
    assert "<bob@example.org>: delivery via mx1.example.test: 250 2.0.0 Ok: queued as 4XYZ" in body
    _, [block] = status_blocks(status)
    assert block["Action"] == action
    assert block["Status"] == "2.0.0"
    assert unfold(block["Diagnostic-Code"]) == "smtp; 250 2.0.0 Ok: queued as 4XYZ"


def test_several_recipients_in_one_notification():
    quota = Reply(552, "5.2.2", "Mailbox full")
    later = Reply(450, "4.2.0", "Greylisted, try again later")
    recipients = [
        rcpt(),
        rcpt("carol@example.net", quota, "mx.example.net", orcpt="rfc822;carol@example.net"),
        rcpt("dave@example.net", later, "mx.example.net", action="delayed", will_retry_until=NOW + 3600),
    ]
    msg, (text, status, _) = parse(dsn(recipients))
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"   # the worst news wins
    _, blocks = status_blocks(status)
    assert [b["Final-Recipient"] for b in blocks] == \
        ["rfc822; bob@example.org", "rfc822; carol@example.net", "rfc822; dave@example.net"]
    assert [b["Action"] for b in blocks] == ["failed", "failed", "delayed"]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.2.2", "4.2.0"]
    assert [b["Remote-MTA"] for b in blocks] == \
        ["dns; mx1.example.test", "dns; mx.example.net", "dns; mx.example.net"]
    assert blocks[1]["Original-Recipient"] == "rfc822; carol@example.net"
    assert "Will-Retry-Until" not in blocks[1] and "Will-Retry-Until" in blocks[2]
    body = unfold(text.get_content())
    for r in recipients:
        assert f"<{r.address}>: host {r.remote_mta} said: {r.reply}" in body


def test_original_recipient_is_normalised_and_xtext_decoded():
    _, (_, status, _) = parse(dsn([rcpt(orcpt="rfc822;bob+2Btag@example.org")], envid="id+3D42"))
    per_message, [block] = status_blocks(status)
    assert block["Original-Recipient"] == "rfc822; bob+tag@example.org"
    assert per_message["Original-Envelope-Id"] == "id=42"


def test_no_envid_no_original_envelope_id():
    _, (_, status, _) = parse(dsn())
    assert "Original-Envelope-Id" not in status_blocks(status)[0]


# ----------------------------------------------------------------------------- odd input

@pytest.mark.parametrize("original, headers", [
    (b"", b""),
    (b"Subject: no body\r\n", b"Subject: no body\r\n"),
    (b"Subject: no separator, no final CRLF", b"Subject: no separator, no final CRLF\r\n"),
    (b"Subject: bare LF\nFrom: a@b\n\nbody\n", b"Subject: bare LF\r\nFrom: a@b\r\n"),
    (b"Subject: bare CR\rFrom: a@b\r\rbody\r", b"Subject: bare CR\r\nFrom: a@b\r\n"),
    (b"\r\nbody without headers\r\n", b""),
    (b"Subject: nul\x00 byte\r\n\r\n\x00\r\n", b"Subject: nul byte\r\n"),
    (b"Subject: caf\xc3\xa9\r\nX-Raw: \xff\xfe\r\n\r\nbody\r\n",
     b"Subject: caf\xc3\xa9\r\nX-Raw: \xff\xfe\r\n"),
])
def test_odd_originals(original, headers):
    for ret_full in (False, True):
        data = dsn(original=original, ret_full=ret_full)
        _, (_, _, returned) = parse(data)
        if not ret_full:
            assert returned.get_payload(decode=True) == headers
        assert headers in data


def test_8bit_original_headers_are_labelled_8bit():
    original = b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n"
    msg, (text, _, returned) = parse(dsn(original=original))
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert text.get_content_charset() == "us-ascii"


def test_long_original_lines_are_broken():
    long_header = b"X-Long: " + b"a" * 5000
    long_body = "é".encode() * 3000
    data = dsn(original=long_header + b"\r\n\r\n" + long_body + b"\r\n", ret_full=True)
    _, (_, _, returned) = parse(data)
    [inner] = returned.get_payload()
    assert inner["X-Long"].replace(" ", "") == "a" * 5000   # folded, not lost
    # The body was only broken between characters, never inside one.
    assert b"".join(data.split(b"\r\n ")).count(long_body) == 1


def test_reply_with_line_breaks_cannot_inject_fields():
    evil = Reply(550, "5.7.1", "rejected\r\nAction: delivered\r\n\r\nX-Injected: yes\nmore")
    msg, (text, status, _) = parse(dsn([rcpt(reply=evil)]))
    _, [block] = status_blocks(status)
    assert block["Action"] == "failed"
    assert "X-Injected" not in block and "X-Injected" not in msg
    assert unfold(block["Diagnostic-Code"]) == \
        "smtp; 550 5.7.1 rejected Action: delivered X-Injected: yes more"
    assert "X-Injected: yes more" in unfold(text.get_content())


def test_very_long_reply_text_is_folded_and_trimmed():
    words = Reply(550, "5.7.1", " ".join(["word"] * 3000))
    _, (_, status, _) = parse(dsn([rcpt(reply=words)]))
    _, [block] = status_blocks(status)
    diagnostic = unfold(block["Diagnostic-Code"])
    assert diagnostic.startswith("smtp; 550 5.7.1 word word")
    assert len(diagnostic) <= bounce.MAX_DIAGNOSTIC + len("smtp; ")

    blob = Reply(550, "5.7.1", "x" * 5000)   # one "word" longer than a line
    _, (_, status, _) = parse(dsn([rcpt(reply=blob)]))
    _, [block] = status_blocks(status)
    assert unfold(block["Diagnostic-Code"]).replace(" ", "").startswith("smtp;5505.7.1xxxx")


def test_non_ascii_reply_text():
    reply = Reply(550, "5.1.1", "Benutzer unbekannt: Müller \udcff")
    _, (text, status, _) = parse(dsn([rcpt(reply=reply)]))
    _, [block] = status_blocks(status)
    assert block["Diagnostic-Code"].isascii()   # message/delivery-status stays 7-bit
    assert "M?ller" in block["Diagnostic-Code"]
    assert text.get_content_charset() == "utf-8"
    assert "Müller" in text.get_content()


def test_non_ascii_recipient_uses_utf8_address_type():
    msg, (text, status, _) = parse(dsn([rcpt("jürgen@bücher.example")], sender="zoë@example.com"))
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert text.get_content_charset() == "utf-8"
    assert text["Content-Transfer-Encoding"] == "8bit"
    assert "<jürgen@bücher.example>" in text.get_content()
    per_message, [block] = status_blocks(status)
    assert block["Final-Recipient"] == r"utf-8; j\x{FC}rgen@b\x{FC}cher.example"
    assert per_message["X-Mta-Sender"] == r"utf-8; zo\x{EB}@example.com"


def test_invalid_status_and_action_fall_back():
    _, (_, status, _) = parse(dsn([rcpt(reply=Reply(554, "garbage", "no"), action="exploded"),
                                   rcpt(reply=Reply(0, "", "odd"), remote=None, action="delayed")]))
    _, blocks = status_blocks(status)
    assert [b["Action"] for b in blocks] == ["failed", "delayed"]
    assert [b["Status"] for b in blocks] == ["5.0.0", "4.0.0"]
    assert unfold(blocks[1]["Diagnostic-Code"]) == "X-mta; odd"


def test_sender_needing_quotes_and_null_sender():
    msg, _ = parse(dsn(sender='john doe"x@example.com'))
    assert msg["To"].addresses[0].addr_spec == '"john doe\\"x"@example.com'
    parse(dsn(sender=""))


@pytest.mark.parametrize("when", [float("nan"), float("inf"), -1e300, 1e300, -1.7e308, 1.7e308])
def test_absurd_times_do_not_raise(when):
    _, (_, status, _) = parse(dsn([rcpt(action="delayed", will_retry_until=when)], now=when, arrival=-when))
    date_of(status_blocks(status)[0]["Arrival-Date"])


def test_no_recipients_does_not_raise():
    _, (_, status, _) = parse(dsn([]))
    assert status_blocks(status)[1] == []


def test_boundary_never_occurs_in_the_content(monkeypatch):
    tokens = iter(["0000000000000001", "0000000000000002"])
    monkeypatch.setattr(bounce, "_token", lambda: next(tokens))
    clash = f"ABC123.{int(NOW)}.0000000000000001/relay.example.test".encode()
    original = b"Subject: trap\r\n\r\n--" + clash + b"\r\n\r\nhi\r\n--" + clash.upper() + b"--\r\n"
    msg, (_, _, returned) = parse(dsn(original=original, ret_full=True))
    assert msg.get_boundary().endswith("0000000000000002/relay.example.test")
    assert returned.get_payload()[0].get_content().startswith("--" + clash.decode())


def test_odd_hostname_and_queue_id():
    msg, (_, status, _) = parse(dsn(hostname="bad host\r\nX: y", original_queue_id="Q\r\nX-Evil: 1"))
    per_message, _ = status_blocks(status)
    assert "X" not in msg and "X-Evil" not in per_message
    assert per_message["X-Mta-Queue-ID"] == "Q X-Evil: 1"


# ----------------------------------------------------------------------------- property

addresses = st.one_of(
    st.just("bob@example.org"),
    st.emails(),
    st.text(max_size=60),
)
replies = st.builds(Reply, st.integers(min_value=-1, max_value=1000),
                    st.one_of(st.sampled_from(["5.1.1", "4.4.1", "2.0.0", ""]), st.text(max_size=12)),
                    st.text(max_size=3000))
reported = st.builds(ReportedRecipient, address=addresses, reply=replies,
                     remote_mta=st.one_of(st.none(), st.just("mx1.example.test"), st.text(max_size=40)),
                     last_attempt=st.floats(allow_nan=True, allow_infinity=True),
                     action=st.sampled_from(["failed", "delayed", "relayed", "delivered", "?"]),
                     orcpt=st.one_of(st.none(), st.text(max_size=80)),
                     will_retry_until=st.one_of(st.none(), st.floats(min_value=0, max_value=4e9)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(original=st.binary(max_size=4000), recipients=st.lists(reported, min_size=1, max_size=3),
       ret_full=st.booleans(), sender=addresses, envid=st.one_of(st.none(), st.text(max_size=40)),
       now=st.floats(), arrival=st.floats())
def test_any_input_gives_a_well_formed_report(original, recipients, ret_full, sender, envid, now, arrival):
    data = dsn(original=original, recipients=recipients, ret_full=ret_full, sender=sender, envid=envid,
               now=now, arrival=arrival)
    msg, (_, status, _) = parse(data)
    assert msg["Auto-Submitted"] == "auto-replied"
    _, blocks = status_blocks(status)
    assert len(blocks) == len(recipients)
    for block, r in zip(blocks, recipients, strict=True):
        assert block["Action"] == (r.action if r.action != "?" else "failed")
        assert block["Status"][0] in "245"


@settings(max_examples=50, deadline=None)
@given(hostname=st.text(max_size=1200), queue_id=st.text(max_size=1200), message_id=st.text(max_size=1200),
       envid=st.text(max_size=1200), sender=st.text(max_size=1200))
def test_any_identifiers_give_a_well_formed_report(hostname, queue_id, message_id, envid, sender):
    msg, (_, status, _) = parse(dsn(hostname=hostname, original_queue_id=queue_id, message_id=message_id,
                                    envid=envid, sender=sender))
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert [b["Final-Recipient"] for b in status_blocks(status)[1]] == ["rfc822; bob@example.org"]
