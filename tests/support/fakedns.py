"""A small authoritative DNS server for tests, on 127.0.0.1 (UDP and TCP, same port).

Fed from a ``zones`` table the test may change while the server runs::

    zones = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        "alias.test": {"CNAME": "example.test"},
        "nullmx.test": {"MX": [(0, ".")]},          # RFC 7505 null MX
        "broken.test": "SERVFAIL",                   # any dnslib RCODE name
        "slow.test": "TIMEOUT",                      # never answer
        "half.test": {"A": ["127.0.0.2"], "AAAA": "SERVFAIL"},  # per-type failure
    }

A name not in the table gets NXDOMAIN; a name present without the asked type gets
NOERROR with an empty answer (NODATA). Negative answers carry an SOA in the authority
section (owned by the name's top-level label) only when ``negative_ttl`` is set, so
resolvers can be tested with and without RFC 2308 negative-caching data.

``queries`` counts questions per (name, type), names lower-case without the trailing
dot, so tests can see what a resolver's cache saved.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, SOA, A, DNSRecord

Zones = dict[str, Any]

_TIMEOUT = "TIMEOUT"
_MAX_CNAME_CHAIN = 8


class _Handler(socketserver.BaseRequestHandler):
    server: _UDPServer | _TCPServer

    def handle(self) -> None:
        fake = self.server.fake
        if isinstance(self.request, tuple):  # UDP: (datagram, socket)
            data, sock = self.request
            reply = fake.answer(data)
            if reply is not None:
                sock.sendto(reply, self.client_address)
            return
        # TCP (RFC 1035 §4.2.2): two-byte length prefix per message.
        conn: socket.socket = self.request
        conn.settimeout(5)
        try:
            head = _recv_exactly(conn, 2)
            data = _recv_exactly(conn, int.from_bytes(head, "big"))
        except (OSError, EOFError):
            return
        reply = fake.answer(data)
        if reply is None:
            # "Never answer": hold the connection until the server stops.
            fake._stopping.wait()
            return
        conn.sendall(len(reply).to_bytes(2, "big") + reply)


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    # Non-daemon threads joined by server_close(): stop() leaves nothing running.
    daemon_threads = False
    block_on_close = True
    fake: FakeDNS


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = False
    block_on_close = True
    fake: FakeDNS


class FakeDNS:
    """Authoritative test DNS server; ``start()`` picks a free port, ``stop()`` frees it."""

    host = "127.0.0.1"

    def __init__(self, zones: Zones | None = None, *, ttl: int = 300, negative_ttl: int | None = None):
        self.zones: Zones = zones if zones is not None else {}
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.port = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._servers: list[_UDPServer | _TCPServer] = []
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeDNS:
        self._stopping.clear()
        udp, tcp = self._bind()
        self.port = udp.server_address[1]
        for server in (udp, tcp):
            server.fake = self
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                                      name=f"fakedns-{socket.SocketKind(server.socket_type).name}-{self.port}")
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def _bind(self) -> tuple[_UDPServer, _TCPServer]:
        # Let the kernel pick a free UDP port, then take the same TCP port; another
        # process may hold that TCP port, so try again with a new UDP port.
        for _ in range(50):
            udp = _UDPServer((self.host, 0), _Handler)
            try:
                tcp = _TCPServer((self.host, udp.server_address[1]), _Handler)
            except OSError:
                udp.server_close()
                continue
            return udp, tcp
        raise RuntimeError("FakeDNS: no port free for both UDP and TCP")

    def stop(self) -> None:
        self._stopping.set()  # releases TCP handlers that are "never answering"
        for server in self._servers:
            server.shutdown()
        for server in self._servers:
            server.server_close()  # closes the socket and joins handler threads
        for thread in self._threads:
            thread.join()
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> FakeDNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def nameserver(self) -> str:
        return self.host

    def count(self, name: str, qtype: str) -> int:
        """Questions seen so far for (name, type)."""
        with self._lock:
            return self.queries[(name.lower().rstrip("."), qtype.upper())]

    # ------------------------------------------------------------------ answering

    def answer(self, data: bytes) -> bytes | None:
        """The wire reply to a query, or None to stay silent."""
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        reply = request.reply(ra=1, aa=1)
        qname = request.q.qname
        qtype = QTYPE.get(request.q.qtype)
        key = str(qname).rstrip(".").lower()
        with self._lock:
            self.queries[(key, str(qtype))] += 1

        name = key
        owner = qname
        for _ in range(_MAX_CNAME_CHAIN):
            entry = self.zones.get(name)
            if entry is None:
                reply.header.rcode = RCODE.NXDOMAIN
                self._add_soa(reply, name)
                break
            if isinstance(entry, str):
                return self._fail(reply, entry)
            records = entry.get(qtype)
            if records is None and qtype != "CNAME" and "CNAME" in entry:
                target = str(entry["CNAME"]).rstrip(".").lower()
                reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(target + "."), ttl=self.ttl))
                name, owner = target, target + "."
                continue
            if isinstance(records, str):
                return self._fail(reply, records)
            if not records:
                self._add_soa(reply, name)  # NODATA
                break
            if qtype == "CNAME":
                records = [records]
            for record in records:
                reply.add_answer(RR(owner, getattr(QTYPE, qtype), rdata=self._rdata(qtype, record),
                                    ttl=self.ttl))
            break
        return bytes(reply.pack())

    def _fail(self, reply: DNSRecord, what: str) -> bytes | None:
        if what == _TIMEOUT:
            return None
        reply.header.rcode = getattr(RCODE, what)
        return bytes(reply.pack())

    def _add_soa(self, reply: DNSRecord, name: str) -> None:
        if self.negative_ttl is None:
            return
        apex = name.rsplit(".", 1)[-1] + "."
        soa = SOA("ns." + apex, "hostmaster." + apex, (1, 3600, 600, 86400, self.negative_ttl))
        reply.add_auth(RR(apex, QTYPE.SOA, rdata=soa, ttl=self.ttl))

    @staticmethod
    def _rdata(qtype: str, record: Any) -> Any:
        if qtype == "A":
            return A(record)
        if qtype == "AAAA":
            return AAAA(record)
        if qtype == "MX":
            preference, exchange = record
            return MX(exchange if exchange == "." else exchange.rstrip(".") + ".", preference)
        if qtype == "CNAME":
            return CNAME(str(record).rstrip(".") + ".")
        raise ValueError(f"FakeDNS: unsupported record type {qtype}")


@contextlib.contextmanager
def fake_dns(zones: Zones | None = None, *, ttl: int = 300,
             negative_ttl: int | None = None) -> Iterator[FakeDNS]:
    """``with fake_dns({...}) as dns:`` a started FakeDNS, stopped on exit."""
    server = FakeDNS(zones, ttl=ttl, negative_ttl=negative_ttl)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def mx(dns: FakeDNS, domain: str, *hosts: tuple[int, str, str]) -> None:
    """MX records for ``domain`` and an A record for each host; hosts: (preference, name, ip)."""
    dns.zones[domain] = {"MX": [(pref, name) for pref, name, _ in hosts]}
    for _, name, ip in hosts:
        dns.zones[name] = {"A": [ip]}
