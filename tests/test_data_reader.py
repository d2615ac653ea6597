"""The DATA reader: exact bytes back for any content and any way the bytes arrive."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from mta.inbound.session import read_data


def stuff(content: bytes) -> bytes:
    """What a client sends (RFC 5321 §4.5.2): a leading dot doubled on every line, then CRLF.CRLF."""
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"


async def feed_and_read(wire: bytes, cuts: list[int], limit: int | None, reader_limit: int) -> bytes | None:
    reader = asyncio.StreamReader(limit=reader_limit)
    task = asyncio.ensure_future(read_data(reader, limit))
    start = 0
    for cut in sorted(set(c % (len(wire) + 1) for c in cuts)) + [len(wire)]:
        reader.feed_data(wire[start:cut])
        start = cut
        await asyncio.sleep(0)
    reader.feed_data(b"NOOP\r\n")  # what follows DATA must stay in the stream
    result = await asyncio.wait_for(task, 5)
    assert await reader.readuntil(b"\r\n") == b"NOOP\r\n"
    return result


lines = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")) |
                 st.sampled_from([b".", b"..", b".x", b"", b"a.", b"\n.", b".\r"]), max_size=30)


@settings(max_examples=300, deadline=None)
@given(lines, st.lists(st.integers(min_value=0), max_size=8), st.sampled_from([16, 64, 65536]))
def test_read_data_returns_the_content(content_lines, cuts, reader_limit):
    content = b"".join(line + b"\r\n" for line in content_lines)
    got = asyncio.run(feed_and_read(stuff(content), cuts, None, reader_limit))
    assert got == content


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=300), st.lists(st.integers(min_value=0), max_size=5))
def test_size_limit_is_exact(size, cuts):
    content = b"x" * max(0, size - 2) + b"\r\n" if size >= 2 else b""
    got = asyncio.run(feed_and_read(stuff(content), cuts, 100, 32))
    assert got == (content if len(content) <= 100 else None)


def test_empty_message_and_smuggling_patterns():
    assert asyncio.run(feed_and_read(b".\r\n", [], None, 64)) == b""
    for pattern in (b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r", b"\r.\r\n"):
        wire = b"a" + pattern + b"MAIL FROM:<x@y>\r\n.\r\n"
        got = asyncio.run(feed_and_read(wire, [3], None, 64))
        assert got is not None and b"MAIL FROM:<x@y>" in got


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=5))
def test_what_we_send_is_read_back_exactly(data, cuts):
    """Outbound stuffing (client.to_wire) and inbound unstuffing (read_data) agree byte for byte,
    and nothing on the wire has a bare CR or LF."""
    from mta.delivery.client import to_wire
    from mta.inbound.policy import normalize_line_ends
    wire, size = to_wire(data)
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    expected = normalize_line_ends(data)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert size == len(expected)
    assert asyncio.run(feed_and_read(wire, cuts, None, 32)) == expected
