"""Issue 12 part 7: expected events are not errors.

A real `mta serve` with STARTTLS and implicit-TLS SMTP listeners and STLS and
implicit-TLS POP3 listeners (trustme certificates). Scanner-like clients send
garbage instead of a ClientHello, or start a handshake and then close or reset
(SO_LINGER 0) half-way; a POP3 client pipelines RETRs and resets with replies
pending. Each client connects from its own loopback address, so the log lines
about it can be counted: exactly one INFO or warning line per aborted connection,
naming it; no error line, no traceback; and the daemon still serves afterwards.
Run on uvloop (the default where installed) and on asyncio's own loop.
"""

from __future__ import annotations

import poplib
import re
import smtplib
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.ports import free_port
from tests.support.tls import make_tls
from tests.support.users import write_users

PASSWORD = "alice pw"


def client_hello() -> bytes:
    """A real TLS ClientHello, as the first flight of any TLS client."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def until_closed(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
    sock.close()


def to_tls(sock: socket.socket, kind: str) -> None:
    """For STARTTLS/STLS: the plaintext dialogue up to the server's go-ahead."""
    if kind == "starttls":
        assert read_line(sock).startswith(b"220 ")
        sock.sendall(b"EHLO scanner.test\r\n")
        while not read_line(sock).startswith(b"250 "):
            pass
        sock.sendall(b"STARTTLS\r\n")
        assert read_line(sock).startswith(b"220 ")
    elif kind == "stls":
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(b"STLS\r\n")
        assert read_line(sock).startswith(b"+OK")


def abort(sock: socket.socket, how: str, hello: bytes) -> None:
    if how == "garbage":
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)))
        until_closed(sock)
        return
    sock.sendall(hello)
    assert sock.recv(1), "the server did not answer the ClientHello"   # it is mid-handshake now
    if how == "close":
        sock.close()
    else:
        reset(sock)


def lines_about(log: str, ip: str) -> list[str]:
    # [127.0.0.12] in SMTP lines, rip=127.0.0.12 in POP3 lines; never 127.0.0.120.
    pattern = re.compile(rf"(?:\[|rip=){re.escape(ip)}(?:\]|,|$)")
    return [line for line in log.splitlines() if pattern.search(line)]


@pytest.fixture(params=["uvloop", "asyncio"])
def daemon(request, tmp_path: Path, monkeypatch):
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    else:
        monkeypatch.setenv("MTA_EVENT_LOOP", "asyncio")
    tls = make_tls(tmp_path)
    cert = {"cert": tls.cert, "key": tls.key}
    users = tmp_path / "mailboxes"
    write_users(users, {"alice@lab.test": PASSWORD})
    ports = {name: free_port() for name in ("smtp", "smtps", "pop3", "pop3s")}
    doc = {
        "hostname": "relay.lab.test",
        "listeners": [
            {"name": "smtp", "address": f"127.0.0.1:{ports['smtp']}", "mode": "relay", "tls": cert},
            {"name": "smtps", "address": f"127.0.0.1:{ports['smtps']}", "mode": "relay",
             "tls": {**cert, "implicit": True}},
            {"name": "pop3", "address": f"127.0.0.1:{ports['pop3']}", "mode": "pop3", "allow_insecure_auth": True,
             "tls": cert},
            {"name": "pop3s", "address": f"127.0.0.1:{ports['pop3s']}", "mode": "pop3",
             "tls": {**cert, "implicit": True}},
        ],
        "mynetworks": ["127.0.0.0/8"],
        "local_domains": ["lab.test"],
        "mailboxes": {"users_file": str(users)},
        "queue": {"path": str(tmp_path / "queue.db")},
        "metrics": {"address": None},
        "limits": {"max_connections_per_ip": 50},
    }
    d = Daemon(tmp_path, doc)
    d.ports = ports   # type: ignore[attr-defined]
    d.tls = tls       # type: ignore[attr-defined]
    d.start()
    try:
        d.wait_for("the daemon to start", lambda: "mta ready" in d.log_text() or d.proc.poll() is not None)
        assert d.proc is not None and d.proc.poll() is None, d.log_tail()
        yield d
    finally:
        d.ensure_dead()


def assert_quiet(log: str) -> None:
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if ": error: " in line or ": fatal: " in line]
    assert errors == [], "\n".join(errors)


def still_serves(daemon: Any) -> None:
    """A real client over each kind of TLS: STARTTLS mail in, POP3S out."""
    ports, tls = daemon.ports, daemon.tls
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as client:
        client.starttls(context=tls.client)
        client.sendmail("carol@remote.test", ["alice@lab.test"], "Subject: after\r\n\r\nstill here\r\n")
    with smtplib.SMTP_SSL("127.0.0.1", ports["smtps"], timeout=10, context=tls.client) as client:
        assert client.noop()[0] == 250

    def retrieved() -> bool:
        pop = poplib.POP3_SSL("127.0.0.1", ports["pop3s"], timeout=10, context=tls.client)
        try:
            pop.user("alice@lab.test")
            pop.pass_(PASSWORD)
            return any(b"still here" in b"\r\n".join(pop.retr(n)[1]) for n in range(1, len(pop.list()[1]) + 1))
        finally:
            pop.quit()

    daemon.wait_for("the message over POP3S", retrieved)


@pytest.mark.timeout(120)
def test_aborted_tls_handshakes_are_one_line_each(daemon):
    hello = client_hello()
    cases = [(port_name, kind, how)
             for port_name, kind in (("smtps", "implicit"), ("smtp", "starttls"),
                                     ("pop3s", "implicit"), ("pop3", "stls"))
             for how in ("garbage", "close", "reset")]
    clients: dict[str, tuple[str, str, str]] = {}
    for n, (port_name, kind, how) in enumerate(cases):
        ip = f"127.0.0.{20 + n}"
        clients[ip] = (port_name, kind, how)
        sock = connect(daemon.ports[port_name], ip)
        to_tls(sock, kind)
        abort(sock, how, hello)
        # One line about this client, and it has been written: the next one gets its own.
        daemon.wait_for(f"the line about {ip} ({port_name}, {how})",
                        lambda ip=ip: lines_about(daemon.log_text(), ip))

    time.sleep(0.5)   # anything a client caused later than its first line would show now
    log = daemon.log_text()
    for ip, case in clients.items():
        about = lines_about(log, ip)
        assert len(about) == 1, (case, about)
        assert re.search(r"mta/\w+\[\d+\]: (?!error: |fatal: )", about[0]), (case, about)   # INFO or warning
        assert ("SSL_accept error from" in about[0]) if case[0].startswith("smtp") else \
            ("TLS handshaking: " in about[0]), (case, about)
    assert_quiet(log)
    still_serves(daemon)
    assert_quiet(daemon.log_text())


@pytest.mark.timeout(120)
def test_pop3_reset_with_replies_pending_is_one_line(daemon):
    ports = daemon.ports
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as client:
        for n in range(3):
            client.sendmail("carol@remote.test", ["alice@lab.test"], f"Subject: {n}\r\n\r\nsmall {n}\r\n")
    daemon.wait_for("delivery to the mailbox",
                    lambda: daemon.log_text().count("status=sent (delivered to mailbox)") == 3)
    pipeline = b"RETR 1\r\nRETR 2\r\nRETR 3\r\nLIST\r\nUIDL\r\n" * 1500   # ~50 kB of commands
    sources = []
    for n, delay in enumerate((0.02, 0.05, 0.1, 0.15, 0.2, 0.3)):
        ip = f"127.0.0.{80 + n}"
        sources.append(ip)
        sock = connect(ports["pop3"], ip)
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(f"USER alice@lab.test\r\nPASS {PASSWORD}\r\n".encode())
        assert read_line(sock).startswith(b"+OK") and read_line(sock).startswith(b"+OK")
        sock.sendall(pipeline)
        time.sleep(delay)   # the server is part-way through the replies: we never read them
        reset(sock)
        daemon.wait_for(f"the end of the session from {ip}",
                        lambda ip=ip: any("Disconnected" in line for line in lines_about(daemon.log_text(), ip)))

    time.sleep(0.5)
    log = daemon.log_text()
    for ip in sources:
        about = lines_about(log, ip)
        assert [line for line in about if "Login:" not in line and "Disconnected" not in line] == [], about
        ends = [line for line in about if "Disconnected" in line]
        assert len(ends) == 1 and re.search(r"mta/\w+\[\d+\]: (?!warning: |error: |fatal: )", ends[0]), about
        assert "Internal error" not in ends[0], about
    assert_quiet(log)
    still_serves(daemon)
    assert_quiet(daemon.log_text())
