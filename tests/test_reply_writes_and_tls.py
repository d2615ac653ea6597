"""TLS and the wire: every reply, and every group of replies to pipelined commands, leaves
in one write; TLS is 1.2 or later with AEAD suites only, unless configured otherwise.

A client that reads once per reply (nmap's smtp-open-relay does) must see the
whole multi-line EHLO answer in one read. Over TLS each write is a TLS record,
and one SSL read returns at most one record: there the test is exact.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import warnings

import pytest

from tests.support.in_process import listener_port, running
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(30)

GROUP = b"MAIL FROM:<a@lab.test>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"


def read_once(sock: socket.socket) -> bytes:
    """One recv(): for TLS, the content of one record."""
    return sock.recv(65536)


def dialogue(sock: socket.socket) -> tuple[bytes, bytes, bytes]:
    greeting = read_once(sock)
    sock.sendall(b"EHLO client.test\r\n")
    ehlo = read_once(sock)
    sock.sendall(GROUP)
    group = read_once(sock)
    sock.sendall(b".\r\nQUIT\r\n")
    return greeting, ehlo, group


def check(greeting: bytes, ehlo: bytes, group: bytes) -> None:
    assert greeting.startswith(b"220 relay.lab.test") and greeting.endswith(b"\r\n")
    lines = ehlo.split(b"\r\n")
    assert lines[0] == b"250-relay.lab.test" and lines[-1] == b""
    assert lines[-2].startswith(b"250 ") and all(line.startswith(b"250-") for line in lines[1:-2]), ehlo
    assert b"250-PIPELINING" in lines
    assert group == (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
                     b"354 End data with <CR><LF>.<CR><LF>\r\n")


async def test_plain_ehlo_and_pipelined_group_each_in_one_read(make_config):
    config = make_config()
    async with running(config):
        with socket.create_connection(("127.0.0.1", listener_port(config)), timeout=10) as sock:
            check(*await asyncio.to_thread(dialogue, sock))


async def test_implicit_tls_ehlo_and_pipelined_group_each_in_one_record(make_config, tls_cert):  # noqa: F811
    cert, key, client_ctx = tls_cert
    config = make_config(listeners=[{"name": "smtps", "address": f"127.0.0.1:{free_port()}", "mode": "relay",
                                     "tls": {"cert": cert, "key": key, "implicit": True}}])

    def talk() -> tuple[bytes, bytes, bytes]:
        raw = socket.create_connection(("127.0.0.1", listener_port(config, "smtps")), timeout=10)
        with client_ctx.wrap_socket(raw, server_hostname="relay.lab.test") as sock:
            return dialogue(sock)

    async with running(config):
        check(*await asyncio.to_thread(talk))


async def test_starttls_reply_is_not_held_behind_injected_commands(make_config, tls_cert):  # noqa: F811
    """The 220 to STARTTLS goes out at once even with (injected) commands already
    buffered behind it; those are discarded (RFC 3207 §6), and the session goes on in TLS."""
    cert, key, client_ctx = tls_cert
    config = make_config(listeners=[{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay",
                                     "tls": {"cert": cert, "key": key}}])

    def talk() -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", listener_port(config)), timeout=10) as sock:
            read_once(sock)
            sock.sendall(b"EHLO client.test\r\n")
            read_once(sock)
            sock.sendall(b"STARTTLS\r\nRSET\r\n")
            ready = read_once(sock)
            with client_ctx.wrap_socket(sock, server_hostname="relay.lab.test") as tls:
                tls.sendall(b"NOOP\r\n")
                return ready, read_once(tls)

    async with running(config):
        ready, noop = await asyncio.to_thread(talk)
    assert ready == b"220 2.0.0 Ready to start TLS\r\n"
    assert noop == b"250 2.0.0 OK\r\n"



# ---------------------------------------------------------------- TLS versions and ciphers

def handshake(port: int, *, ciphers: str | None = None, max_version: ssl.TLSVersion | None = None) -> str | None:
    """The cipher an implicit-TLS listener agrees to, or None when it refuses the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():   # TLS 1.1 is deprecated: that is the point of asking for it
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        if max_version is not None:
            ctx.maximum_version = max_version
    if ciphers is not None:
        ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="relay.lab.test") as sock:
            return sock.cipher()[0]
    except (ssl.SSLError, ConnectionError):
        return None


async def test_tls_is_1_2_or_later_with_aead_suites_only_by_default(make_config, tls_cert):  # noqa: F811
    cert, key, _ = tls_cert
    config = make_config(listeners=[{"name": "smtps", "address": f"127.0.0.1:{free_port()}", "mode": "relay",
                                     "tls": {"cert": cert, "key": key, "implicit": True}}])
    port = listener_port(config, "smtps")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ALL:@SECLEVEL=0")
    tls12 = [c["name"] for c in client.get_ciphers() if c["protocol"] == "TLSv1.2"]
    async with running(config):
        accepted = []
        for name in tls12:
            if await asyncio.to_thread(handshake, port, ciphers=name, max_version=ssl.TLSVersion.TLSv1_2):
                accepted.append(name)
        tls11 = await asyncio.to_thread(handshake, port, max_version=ssl.TLSVersion.TLSv1_1)
        tls13 = await asyncio.to_thread(handshake, port)
    assert accepted, "no TLS 1.2 suite accepted at all"
    assert all("GCM" in name or "CHACHA20" in name for name in accepted), accepted
    assert not any("CBC" in name or name.endswith("-SHA") or "SHA256" in name and "GCM" not in name
                   for name in accepted), accepted
    assert tls11 is None
    assert tls13 is not None and tls13.startswith("TLS_")


async def test_tls_ciphers_and_min_version_are_configurable(make_config, tls_cert):  # noqa: F811
    cert, key, _ = tls_cert
    config = make_config(listeners=[{"name": "smtps", "address": f"127.0.0.1:{free_port()}", "mode": "relay",
                                     "tls": {"cert": cert, "key": key, "implicit": True, "min_version": "TLSv1.3"}}])
    async with running(config):
        port = listener_port(config, "smtps")
        assert await asyncio.to_thread(handshake, port, max_version=ssl.TLSVersion.TLSv1_2) is None
        assert await asyncio.to_thread(handshake, port) is not None
