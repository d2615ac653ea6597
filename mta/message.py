"""Where a message's header section ends and its body begins (RFC 5322 §2.1).

The one place that splits a message: inbound (headers to inspect and complete),
bounces (the returned header), local delivery (the Subject), sendmail, the POP3
TOP command and ``mta queue show``. Pure, and offsets rather than slices, so a
caller that needs only the header does not copy the body.
"""

from __future__ import annotations


def header_bounds(data: bytes) -> tuple[int, int]:
    """(end of the header section, start of the body) as offsets into ``data``.

    The header section ends just past the line end of its last field, where the
    empty line begins; the body starts after that empty line. A message that
    starts with the empty line has no header section, ``(0, 1 or 2)``; one with
    no empty line is all header, ``(len(data), len(data))``. Lines may end in
    CRLF or, in text that was never normalised, a bare LF.
    """
    if data.startswith(b"\r\n"):
        return 0, 2
    if data.startswith(b"\n"):
        return 0, 1
    crlf = data.find(b"\n\r\n")
    # A bare-LF empty line ("\n\n") counts only if it comes first; in CRLF text there
    # is none, and the search stops where the CRLF one was found (no scan of the body).
    lf = data.find(b"\n\n", 0, len(data) if crlf < 0 else crlf + 1)
    if lf >= 0:
        return lf + 1, lf + 2
    if crlf >= 0:
        return crlf + 1, crlf + 3
    return len(data), len(data)


def header_section(data: bytes) -> bytes:
    """The header fields, each with its line end, without the empty line after them."""
    return data[:header_bounds(data)[0]]
