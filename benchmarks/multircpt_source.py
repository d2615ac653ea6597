"""smtp-source for messages with recipients in several domains.

smtp-source takes one -t address (-r N only numbers the local part, so all
recipients stay in one domain). This does what smtp-source does -- SESSIONS
parallel clients, a new connection per message, no pipelining, abort on any
unexpected reply -- but with every -t address as a recipient of every message.

    python multircpt_source.py -m 2000 -s 20 -l 1024 -f from@x -t a@d0 -t b@d1 127.0.0.1:2525
"""

from __future__ import annotations

import argparse
import asyncio
import sys


def make_body(size: int, recipients: list[str], sender: str) -> bytes:
    header = (f"From: <{sender}>\r\nTo: " + ", ".join(f"<{r}>" for r in recipients) +
              "\r\nSubject: multircpt_source\r\n\r\n").encode()
    line = b"La La La La La La La La La La La La La La La La La La La La La La La La La\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return header + body.rstrip(b"\r\n") + b"\r\n.\r\n"


async def expect(reader: asyncio.StreamReader, code: str, what: str) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError(f"connection lost after {what}")
        if not line.startswith(code.encode()):
            raise RuntimeError(f"{what}: unexpected reply {line.decode(errors='replace').strip()}")
        if line[3:4] != b"-":
            return


async def send_one(host: str, port: int, sender: str, recipients: list[str], body: bytes) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await expect(reader, "220", "greeting")
        writer.write(b"EHLO multircpt.bench.test\r\n")
        await expect(reader, "250", "EHLO")
        writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
        await expect(reader, "250", "MAIL")
        for rcpt in recipients:
            writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
            await expect(reader, "250", "RCPT")
        writer.write(b"DATA\r\n")
        await expect(reader, "354", "DATA")
        writer.write(body)
        await expect(reader, "250", "end of data")
        writer.write(b"QUIT\r\n")
        await expect(reader, "221", "QUIT")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def main(args: argparse.Namespace) -> None:
    host, _, port = args.server.rpartition(":")
    body = make_body(args.length, args.to, args.sender)
    remaining = iter(range(args.messages))

    async def session() -> None:
        for _ in remaining:
            await send_one(host, int(port), args.sender, args.to, body)

    await asyncio.gather(*(session() for _ in range(args.sessions)))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("-m", dest="messages", type=int, default=1)
    p.add_argument("-s", dest="sessions", type=int, default=1)
    p.add_argument("-l", dest="length", type=int, default=1024)
    p.add_argument("-f", dest="sender", default="bench@source.test")
    p.add_argument("-t", dest="to", action="append", required=True)
    p.add_argument("server")
    try:
        asyncio.run(main(p.parse_args()))
    except (OSError, RuntimeError, ConnectionError) as exc:
        print(f"multircpt_source: {exc}", file=sys.stderr)
        sys.exit(1)
