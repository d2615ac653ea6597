"""A raw SMTP client for tests: send exact bytes, read exact reply lines.

smtplib hides the wire; these tests assert on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl


class Wire:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                      greeting: bool = True, local_addr: tuple[str, int] | None = None) -> Wire:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context, limit=1 << 20, local_addr=local_addr), 5)
        wire = cls(reader, writer)
        if greeting:
            try:
                await wire.reply()
            except BaseException:
                await wire.close()
                raise
        return wire

    async def reply(self, timeout: float = 5) -> list[str]:
        """One whole (possibly multi-line) reply, as text lines without CRLF."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionError(f"connection closed; got so far {lines!r}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    async def cmd(self, line: str | bytes, timeout: float = 5) -> str:
        """Send one command line; return the last line of the reply."""
        await self.send(line)
        return (await self.reply(timeout))[-1]

    async def send(self, data: str | bytes, crlf: bool = True) -> None:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        self.writer.write(raw + (b"\r\n" if crlf else b""))
        await self.writer.drain()

    async def ehlo(self, name: str = "client.test") -> list[str]:
        await self.send(f"EHLO {name}")
        return await self.reply()

    async def mail(self, sender: str, recipients: list[str], body: bytes, *, ehlo: bool = True) -> str:
        """A whole transaction; returns the final reply to the end of DATA."""
        if ehlo:
            await self.ehlo()
        assert (await self.cmd(f"MAIL FROM:<{sender}>")).startswith("250"), sender
        for r in recipients:
            reply = await self.cmd(f"RCPT TO:<{r}>")
            assert reply.startswith("250"), reply
        assert (await self.cmd("DATA")).startswith("354")
        await self.send(body, crlf=False)
        await self.send(b".")
        return (await self.reply())[-1]

    async def closed(self, timeout: float = 5) -> bool:
        data = await asyncio.wait_for(self.reader.read(), timeout)
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> Wire:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
