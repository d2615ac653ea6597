"""Reading POP3 command lines: bounded in length, one result per line sent.

A session reads every command (and each AUTH continuation line) through a
LineReader, so an over-long or endless line never grows memory and still gets
exactly one reply, in order.
"""

from __future__ import annotations

import asyncio

READ_CHUNK = 65536


class TooLong:
    """What :meth:`LineReader.next` returns for a line over the limit."""


TOO_LONG = TooLong()


class LineReader:
    """Command lines from a stream, each at most ``limit`` octets with its line end.

    An over-long line is read to its end and discarded (memory stays bounded),
    then reported once as TOO_LONG, so the reply order still matches the
    command order. A bare LF ends a line too. Cancelling a read loses nothing."""

    def __init__(self, reader: asyncio.StreamReader):
        self.reader = reader
        self.buffer = bytearray()
        self._discarding = False

    async def next(self, limit: int) -> bytes | TooLong | None:
        """The next line without its CRLF; None at end of input."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                too_long = self._discarding or end + 1 > limit
                self._discarding = False
                return TOO_LONG if too_long else line.removesuffix(b"\r")
            if len(self.buffer) >= limit:
                # No line end within the limit: forget what came so far, keep reading to it.
                self._discarding = True
                self.buffer.clear()
            chunk = await self.reader.read(READ_CHUNK)
            if not chunk:
                return None
            self.buffer += chunk

    def discard_buffered(self) -> None:
        """Forget every byte received but not yet read as a command (before STLS)."""
        self.buffer.clear()
        self._discarding = False
        # RFC 2595 §4 / CVE-2011-0411: plaintext the client pipelined after STLS must
        # not be executed as if it had come over TLS. StreamReader has no public way to
        # drop its buffer; aiosmtpd's STARTTLS clears the same attribute.
        self.reader._buffer.clear()  # type: ignore[attr-defined]
