"""mta.message: the one header/body split."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.message import header_bounds, header_section
from mta.model import normalize_line_ends


@pytest.mark.parametrize("data, bounds", [
    (b"A: b\r\nC: d\r\n\r\nbody\r\n", (12, 14)),   # the usual message
    (b"A: b\r\n\r\n", (6, 8)),                       # empty body after the empty line
    (b"A: b\r\nC: d\r\n", (12, 12)),                 # no empty line: all header, no body
    (b"A: b", (4, 4)),                               # a bare header without its line end
    (b"\r\nbody\r\n\r\nmore\r\n", (0, 2)),           # starts with the empty line: no header
    (b"\r\n", (0, 2)),
    (b"", (0, 0)),
    (b"A: b\r\n\tfolded\r\n\r\nX: in body\r\n", (15, 17)),   # a folded field is part of the header
    (b"A: b\nC: d\n\nbody\n", (10, 11)),            # LF-only text (POP3 TOP, queue show)
    (b"\nbody\n", (0, 1)),
    (b"A: b\n\nbody\r\n\r\nmore", (5, 6)),          # the first empty line wins, whatever its line end
    (b"A: b\r\n\r\nbody\n\nmore", (6, 8)),
])
def test_header_bounds(data, bounds):
    assert header_bounds(data) == bounds
    assert header_section(data) == data[:bounds[0]]


@given(st.binary(max_size=300))
def test_crlf_text_splits_at_the_first_crlf_crlf(raw):
    """On normalised text (all the queue holds) the split is the old find(b"\\r\\n\\r\\n") rule."""
    data = normalize_line_ends(raw)
    end = data.find(b"\r\n\r\n")
    if data.startswith(b"\r\n"):
        expected = (0, 2)
    elif end < 0:
        expected = (len(data), len(data))
    else:
        expected = (end + 2, end + 4)
    assert header_bounds(data) == expected
