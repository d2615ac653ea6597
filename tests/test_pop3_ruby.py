"""Ruby's net-pop (Net::POP3) as a second real POP3 client: the messages it
retrieves are byte-for-byte the stored ones, and its delete_all empties the
mailbox in the store. Skipped only when ``ruby`` is not installed."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from tests.support.pop3 import ALICE, USERS, pop3_lab
from tests.support.tls import make_tls

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby is not installed"),
]

# Prints "number uid size octets\n" then the message as Net::POP3 returned it.
RETRIEVE = r"""
require "net/pop"
$stdout.binmode
host, port, user, pass, ca = ARGV
pop = Net::POP3.new(host, Integer(port))
pop.enable_ssl(ca_file: ca, verify_mode: OpenSSL::SSL::VERIFY_PEER) if ca
pop.start(user, pass) do |session|
  session.mails.each do |m|
    data = m.pop
    $stdout.write("#{m.number} #{m.unique_id} #{m.length} #{data.bytesize}\n", data)
  end
end
"""

DELETE_ALL = r"""
require "net/pop"
host, port, user, pass = ARGV
Net::POP3.start(host, Integer(port), user, pass) do |pop|
  puts pop.n_mails
  pop.delete_all
end
"""


async def ruby(script: str, *args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "ruby", "-rnet/pop", "-e", script, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")
    return out


def parse(out: bytes) -> list[tuple[int, str, int, bytes]]:
    mails = []
    while out:
        head, _, out = out.partition(b"\n")
        number, uid, size, octets = head.decode().split()
        data, out = out[:int(octets)], out[int(octets):]
        mails.append((int(number), uid, int(size), data))
    return mails


def as_retrieved(stored: bytes) -> bytes:
    # The one message stored without a final CRLF gets one on the wire (RFC 1939 §3).
    return stored if stored.endswith(b"\r\n") else stored + b"\r\n"


async def test_ruby_net_pop_retrieves_exact_bytes(tmp_path):
    async with pop3_lab(tmp_path) as lab:
        stored = await lab.mailboxes.messages("alice@lab.test")
        out = await ruby(RETRIEVE, "127.0.0.1", str(lab.port), "alice@lab.test", USERS["alice@lab.test"])
        assert parse(out) == [(n, m.uid, m.size, as_retrieved(data))
                              for n, (m, data) in enumerate(zip(stored, ALICE, strict=True), 1)]
        # Retrieving deletes nothing.
        assert lab.stored("alice@lab.test") == ALICE


async def test_ruby_net_pop_over_implicit_tls(tmp_path):
    tls = make_tls(tmp_path)
    listener = {"allow_insecure_auth": False, "tls": {"cert": tls.cert, "key": tls.key, "implicit": True}}
    async with pop3_lab(tmp_path, listener=listener) as lab:
        out = await ruby(RETRIEVE, "127.0.0.1", str(lab.port), "alice@lab.test", USERS["alice@lab.test"],
                         tls.ca_file)
        assert [mail[3] for mail in parse(out)] == [as_retrieved(data) for data in ALICE]


async def test_ruby_net_pop_delete_all(tmp_path):
    async with pop3_lab(tmp_path) as lab:
        await lab.deliver("bob@lab.test", b"Subject: for bob\r\n\r\nstays\r\n")
        out = await ruby(DELETE_ALL, "127.0.0.1", str(lab.port), "alice@lab.test", USERS["alice@lab.test"])
        assert out == b"3\n"
        assert lab.stored("alice@lab.test") == []
        assert lab.stored("bob@lab.test") == [b"Subject: for bob\r\n\r\nstays\r\n"]
