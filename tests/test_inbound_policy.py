"""Pure inbound rules: fast, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.inbound import policy
from mta.inbound.replies import enhance_reply


@pytest.mark.parametrize("raw, clean", [
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\rb\r", b"a\r\nb\r\n"),
    (b"a\r\r\nb", b"a\r\n\r\nb"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"\n.\n", b"\r\n.\r\n"),
])
def test_normalize_line_ends(raw, clean):
    assert policy.normalize_line_ends(raw) == clean


@given(st.binary(max_size=200))
def test_normalized_data_has_only_crlf(data):
    out = policy.normalize_line_ends(data)
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")
    assert out.replace(b"\r\n", b"") == data.replace(b"\r\n", b"").replace(b"\r", b"").replace(b"\n", b"")


def test_headers_added_at_end_of_header_section():
    data = b"Subject: x\r\nFrom: a@b\r\n\r\nbody\r\n"
    facts = policy.inspect_headers(data)
    assert not facts.has_message_id and not facts.has_date and facts.received_count == 0
    assert policy.add_headers(data, facts, [b"Date: now"]) == \
        b"Subject: x\r\nFrom: a@b\r\nDate: now\r\n\r\nbody\r\n"


def test_headers_added_to_headerless_and_bodyless_messages():
    assert policy.add_headers(b"\r\nbody\r\n", policy.inspect_headers(b"\r\nbody\r\n"), [b"X: 1"]) == \
        b"X: 1\r\n\r\nbody\r\n"
    only = b"Subject: x\r\n"
    assert policy.add_headers(only, policy.inspect_headers(only), [b"X: 1"]) == b"Subject: x\r\nX: 1\r\n"


def test_received_counted_in_header_section_only():
    data = b"Received: a\r\nreceived: b\r\n\tfolded\r\n\r\nReceived: in body\r\n"
    assert policy.inspect_headers(data).received_count == 2


@pytest.mark.parametrize("address, trusted, expected", [
    ("u@ourhost.test", False, None),
    ("u@remote.test", False, "554 5.7.1 Relay access denied"),
    ("u@remote.test", True, None),
    ("u%remote.test@ourhost.test", False, "554 5.7.1 Relay access denied"),
    ("remote!u@ourhost.test", False, "554 5.7.1 Relay access denied"),
    ('"u@remote.test"@ourhost.test', False, "554 5.7.1 Relay access denied"),
    ("u@[192.0.2.1]", True, None),
    ("u@[300.0.0.1]", True, "553 5.1.3 Bad recipient address syntax"),
    ("u@[IPv6:2001:db8::1]", True, None),
    ("u", False, "554 5.7.1 Relay access denied"),
    ("u", True, "553 5.1.3 Bad recipient address syntax"),
    ("u@bad_domain..test", True, "553 5.1.3 Bad recipient address syntax"),
    ("u\r\n@x.test", True, "553 5.1.3 Bad recipient address syntax"),
])
def test_check_recipient(address, trusted, expected):
    reply = policy.check_recipient(address, trusted=trusted, relay_domains=("ourhost.test",))
    assert (str(reply) if reply else None) == expected


@pytest.mark.parametrize("raw, out", [
    (b"250 OK", b"250 2.0.0 OK"),
    (b"221 Bye", b"221 2.0.0 Bye"),
    (b"503 Error: need RCPT command", b"503 5.5.1 Error: need RCPT command"),
    (b"530 5.7.0 Authentication required", b"530 5.7.0 Authentication required"),
    (b'500 Error: command "FOO" not recognized', b"500 5.5.1 Error: command not recognized"),
    (b"354 End data with <CR><LF>.<CR><LF>", b"354 End data with <CR><LF>.<CR><LF>"),
    (b"334 VXNlcm5hbWU6", b"334 VXNlcm5hbWU6"),
    (b"220 relay ESMTP", b"220 relay ESMTP"),
])
def test_enhance_reply(raw, out):
    assert enhance_reply(raw) == out


def test_session_setup_finds_the_same_commands_hooks_and_mechanisms():
    """InboundSMTP.__dir__ (a set-up speed-up) must not hide a command, hook or AUTH mechanism."""
    import asyncio

    from aiosmtpd.smtp import SMTP

    from mta.config import build_config
    from mta.inbound.handler import InboundHandler
    from mta.inbound.limiter import ConnectionLimiter
    from mta.inbound.session import InboundSMTP

    config = build_config({})
    handler = InboundHandler(config, config.listeners[0], None)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        session = InboundSMTP(handler, limiter=ConnectionLimiter(1, 1), loop=loop, hostname="x")
        smtp_names = {n[5:] for n in object.__dir__(session) if n.startswith("smtp_")}
        assert set(session._smtp_methods) == smtp_names
        assert set(session._handle_hooks) == {"MAIL", "RCPT", "DATA", "AUTH", "exception"}   # AUTH: chaos
        assert set(session._auth_methods) == {"PLAIN", "LOGIN"}
        assert isinstance(session, SMTP)
    finally:
        loop.close()
