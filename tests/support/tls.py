"""Test certificates from a throwaway CA (trustme): files for the daemon's
listeners and a client context that trusts them; an in-memory context for the
recording SMTP peers."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme


@dataclass
class TLSFiles:
    cert: str
    key: str
    ca_file: str
    client: ssl.SSLContext


def make_tls(directory: Path) -> TLSFiles:
    """A certificate for relay.lab.test and 127.0.0.1 with its key and CA as PEM files in
    ``directory``, and a client context that trusts that CA."""
    ca = trustme.CA()
    issued = ca.issue_cert("relay.lab.test", "127.0.0.1")
    cert, key, ca_file = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    issued.private_key_pem.write_to_path(key)
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    ca.cert_pem.write_to_path(ca_file)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return TLSFiles(str(cert), str(key), str(ca_file), client)


_PEER_TLS: dict[str, Any] = {}


def tls_material() -> tuple[trustme.CA, ssl.SSLContext]:
    """(trustme CA, server SSLContext) shared by all recording peers of the test run."""
    if not _PEER_TLS:
        ca = trustme.CA()
        cert = ca.issue_cert("mx.peer.test", "localhost", "127.0.0.2", "127.0.0.3")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        _PEER_TLS.update(ca=ca, ctx=ctx)
    return _PEER_TLS["ca"], _PEER_TLS["ctx"]
