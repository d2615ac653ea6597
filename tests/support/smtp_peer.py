"""A scriptable, recording SMTP server for delivery tests.

Written directly on asyncio streams (not aiosmtpd) so that it can misbehave on
purpose: refuse connections, never answer, greet with 421, hang up in the middle
of DATA, time out an idle client with an unsolicited 421, inject plaintext after
STARTTLS. It records the exact command lines it received, which commands arrived
in the same read (to see RFC 2920 pipelining), and every message's data exactly
as received (after un-dot-stuffing, line endings untouched).

    async with RecordingPeer("127.0.0.2") as peer:
        ...deliver to 127.0.0.2:peer.port...
        await peer.wait_for_messages(1)
        assert peer.connections[0].transcript == ["EHLO relay.test", "MAIL FROM:<a@x> SIZE=12", ...]

Reply hook: ``replies(verb, arg, connection) -> str | None``. ``verb`` is the
upper-cased command word ("EHLO", "MAIL", "RCPT", "DATA", "RSET", ...), or
END_OF_DATA (".") for the reply after the message data; ``arg`` the rest of
the line. Return a reply (several lines joined with CRLF are fine) or None for
the default; an async hook may sleep first. A hook reply steers the state like a default one would: a 2xx to
RCPT adds the recipient, a 354 to DATA starts the data, a 421 closes.
``peer.counts`` counts verbs over all connections, for "451 the first two DATA".
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.support.ports import free_port
from tests.support.tls import tls_material

DEFAULT_EXTENSIONS = ("PIPELINING", "SIZE 10240000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")
END_OF_DATA = "."

ReplyHook = Callable[[str, str, "Connection"], "str | None | Awaitable[str | None]"]


@dataclass
class ReceivedMessage:
    sender: str
    rcpts: list[str]
    data: bytes


@dataclass(eq=False)
class Connection:
    peer: RecordingPeer
    number: int
    transcript: list[str] = field(default_factory=list)     # exact command lines, no CRLF
    batches: list[list[str]] = field(default_factory=list)  # commands grouped by the read that brought them
    messages: list[ReceivedMessage] = field(default_factory=list)
    tls: bool = False
    auth_user: str | None = None
    closed_by_peer: bool = False   # this server ended it (221 after QUIT, a 421, a drop)
    client_closed: bool = False    # the client hung up without waiting for us
    finished: bool = False         # the handler is done; the socket is closed
    last_read: int = field(default=-1, repr=False)   # which read() the last command came in

    @property
    def verbs(self) -> list[str]:
        """The transcript's command words: ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]."""
        return [line.split(" ", 1)[0].upper() for line in self.transcript]


class _Hangup(Exception):
    """End the connection (after whatever was already sent)."""


class _LineIO:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection):
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.buf = bytearray()
        self.reads = 0

    async def readline(self, idle: float | None = None) -> bytes:
        """One line including its LF; _Hangup on EOF; TimeoutError after ``idle`` seconds."""
        while (end := self.buf.find(b"\n")) < 0:
            async with asyncio.timeout(idle):
                chunk = await self.reader.read(65536)
            if not chunk:
                self.conn.client_closed = True
                raise _Hangup
            self.buf += chunk
            self.reads += 1
        line = bytes(self.buf[:end + 1])
        del self.buf[:end + 1]
        return line

    async def send(self, text: str, extra: bytes = b"") -> None:
        self.writer.write(text.encode("utf-8") + b"\r\n" + extra)
        await self.writer.drain()


class RecordingPeer:
    def __init__(self, host: str = "127.0.0.2", port: int = 0, *, name: str = "mx.peer.test",
                 extensions: Sequence[str] = DEFAULT_EXTENSIONS, starttls: bool = False,
                 auth: dict[str, str] | None = None, auth_mechanisms: str = "PLAIN LOGIN",
                 replies: ReplyHook | None = None,
                 greeting: str | None = None, refuse: bool = False, silent: bool = False,
                 drop_after_data_bytes: int | None = None, idle_421_after: float | None = None,
                 inject_after_starttls: bytes = b""):
        self.host = host
        self.port = port
        self.name = name
        self.extensions = list(extensions)
        self.starttls = starttls                  # advertise STARTTLS (trustme certificate)
        self.auth = auth                          # {user: password}: advertise AUTH
        self.auth_mechanisms = auth_mechanisms
        self.replies = replies
        self.greeting = greeting or f"220 {name} ESMTP RecordingPeer"
        self.refuse = refuse                      # do not listen at all: connections are refused
        self.silent = silent                      # accept, then never say a word
        self.drop_after_data_bytes = drop_after_data_bytes
        self.idle_421_after = idle_421_after      # "421 4.4.2 ... timeout" after this long idle
        self.inject_after_starttls = inject_after_starttls   # plaintext sent right after the 220
        self.connections: list[Connection] = []
        self.counts: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> RecordingPeer:
        if self.refuse:
            if not self.port:
                self.port = free_port(self.host)
            return self
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> RecordingPeer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ observing

    @property
    def messages(self) -> list[ReceivedMessage]:
        return [m for conn in self.connections for m in conn.messages]

    @property
    def transcripts(self) -> list[list[str]]:
        return [conn.transcript for conn in self.connections]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)

    async def wait_for_messages(self, n: int, timeout: float = 3.0) -> list[ReceivedMessage]:
        await self.wait_for(lambda: len(self.messages) >= n, timeout)
        return self.messages

    async def wait_finished(self, timeout: float = 3.0) -> None:
        """Until every connection so far has ended."""
        await self.wait_for(lambda: all(c.finished for c in self.connections), timeout)

    # ------------------------------------------------------------------ the server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = Connection(self, len(self.connections))
        self.connections.append(conn)
        io = _LineIO(reader, writer, conn)
        try:
            await self._serve(io, conn)
        except _Hangup:
            pass
        except (ConnectionError, ssl.SSLError, OSError):
            conn.client_closed = True
        except asyncio.CancelledError:
            # stop(). Ending normally keeps asyncio's client_connected_cb done-callback
            # (3.11) from logging the cancellation as an error.
            pass
        finally:
            if not writer.is_closing():
                writer.close()
            try:
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except BaseException:   # noqa: BLE001 -- reset, timeout or stop(): just drop it
                writer.transport.abort()
            conn.finished = True
            self._handlers.discard(task)

    def _record(self, io: _LineIO, conn: Connection, line: str) -> None:
        conn.transcript.append(line)
        if conn.batches and conn.last_read == io.reads:
            conn.batches[-1].append(line)
        else:
            conn.batches.append([line])
            conn.last_read = io.reads

    async def _line(self, io: _LineIO, conn: Connection) -> str:
        """The next command line (recorded), or a 421 and hang-up after idle_421_after."""
        try:
            raw = await io.readline(self.idle_421_after)
        except TimeoutError:
            await io.send(f"421 4.4.2 {self.name} Error: timeout exceeded")
            conn.closed_by_peer = True
            raise _Hangup from None
        line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        self._record(io, conn, line)
        return line

    async def _command(self, io: _LineIO, conn: Connection) -> tuple[str, str]:
        verb, _, arg = (await self._line(io, conn)).partition(" ")
        return verb.upper(), arg

    async def _reply(self, io: _LineIO, conn: Connection, reply: str, extra: bytes = b"") -> None:
        await io.send(reply, extra)
        if reply.startswith("421"):
            conn.closed_by_peer = True
            raise _Hangup

    async def _serve(self, io: _LineIO, conn: Connection) -> None:
        if self.silent:
            while True:
                await io.readline()
        await self._reply(io, conn, self.greeting)
        greeted = self.greeting.startswith("2")
        sender: str | None = None
        rcpts: list[str] = []
        while True:
            verb, arg = await self._command(io, conn)
            self.counts[verb] += 1
            reply = await self._hook(verb, arg, conn)
            if reply is None:
                if not greeted:
                    # RFC 5321 3.1: after a 554 greeting only QUIT is answered normally.
                    reply = "221 2.0.0 Bye" if verb == "QUIT" else "503 5.5.1 Error: no service"
                else:
                    reply = self._default(verb, arg, conn, sender, rcpts)
            code = reply[:3]
            if verb == "AUTH" and reply == "AUTH":
                await self._auth(io, conn, arg)
                continue
            if verb == "STARTTLS" and code == "220":
                await self._reply(io, conn, reply, self.inject_after_starttls)
                io.buf.clear()   # RFC 3207 4.2: what came before the handshake is void
                _, ctx = tls_material()
                await io.writer.start_tls(ctx)
                conn.tls = True
                sender, rcpts = None, []
                continue
            await self._reply(io, conn, reply)
            if verb == "QUIT":
                conn.closed_by_peer = True
                return
            if verb in ("EHLO", "HELO", "RSET") and code.startswith("2"):
                sender, rcpts = None, []
            elif verb == "MAIL" and code.startswith("2"):
                sender, rcpts = _path(arg, "FROM:"), []
            elif verb == "RCPT" and code.startswith("2"):
                rcpts.append(_path(arg, "TO:"))
            elif verb == "DATA" and code == "354":
                await self._data(io, conn, sender or "", rcpts)
                sender, rcpts = None, []

    async def _hook(self, verb: str, arg: str, conn: Connection) -> str | None:
        if self.replies is None:
            return None
        reply = self.replies(verb, arg, conn)
        if inspect.isawaitable(reply):   # an async hook can also delay its answer
            reply = await reply
        return reply

    def _default(self, verb: str, arg: str, conn: Connection, sender: str | None,
                 rcpts: list[str]) -> str:
        if verb == "EHLO":
            ext = list(self.extensions)
            if self.starttls and not conn.tls:
                ext.append("STARTTLS")
            if self.auth is not None:
                ext.append(f"AUTH {self.auth_mechanisms}")
            return "\r\n".join(f"250-{e}" for e in [self.name, *ext[:-1]]) + f"\r\n250 {ext[-1]}" \
                if ext else f"250 {self.name}"
        if verb == "HELO":
            return f"250 {self.name}"
        if verb == "MAIL":
            if sender is not None:
                return "503 5.5.1 Error: nested MAIL command"
            for param in arg.split()[1:]:
                key, _, value = param.partition("=")
                limit = next((int(e.split()[1]) for e in self.extensions
                              if e.upper().startswith("SIZE ")), 0)
                if key.upper() == "SIZE" and limit and value.isdigit() and int(value) > limit:
                    return "552 5.3.4 Error: message file too big"
            return "250 2.1.0 Ok"
        if verb == "RCPT":
            return "250 2.1.5 Ok" if sender is not None else "503 5.5.1 Error: need MAIL command"
        if verb == "DATA":
            if sender is None:
                return "503 5.5.1 Error: need RCPT command"
            if not rcpts:
                return "554 5.5.1 Error: no valid recipients"
            return "354 End data with <CR><LF>.<CR><LF>"
        if verb in ("RSET", "NOOP"):
            return "250 2.0.0 Ok"
        if verb == "QUIT":
            return "221 2.0.0 Bye"
        if verb == "STARTTLS":
            if not self.starttls or conn.tls:
                return "502 5.5.1 Error: command not implemented"
            return "220 2.0.0 Ready to start TLS"
        if verb == "AUTH" and self.auth is not None and conn.auth_user is None:
            return "AUTH"   # marker: run the exchange in _auth
        return "502 5.5.2 Error: command not recognized"

    async def _auth(self, io: _LineIO, conn: Connection, arg: str) -> None:
        """RFC 4954 AUTH PLAIN (initial response or 334 challenge) and LOGIN."""
        mechanism, _, initial = arg.partition(" ")
        try:
            if mechanism.upper() == "PLAIN":
                if not initial:
                    await io.send("334 ")
                    initial = await self._line(io, conn)
                _, user, password = base64.b64decode(initial, validate=True).decode().split("\0")
            elif mechanism.upper() == "LOGIN":
                await io.send("334 VXNlcm5hbWU6")
                user = base64.b64decode(await self._line(io, conn), validate=True).decode()
                await io.send("334 UGFzc3dvcmQ6")
                password = base64.b64decode(await self._line(io, conn), validate=True).decode()
            else:
                await io.send("504 5.5.4 Unrecognized authentication type")
                return
        except ValueError:
            await io.send("501 5.5.2 Cannot decode response")
            return
        assert self.auth is not None
        if self.auth.get(user) == password:
            conn.auth_user = user
            await io.send("235 2.7.0 Authentication successful")
        else:
            await io.send("535 5.7.8 Error: authentication failed")

    async def _data(self, io: _LineIO, conn: Connection, sender: str, rcpts: list[str]) -> None:
        data = bytearray()
        received = 0
        while True:
            raw = await io.readline()
            received += len(raw)
            if self.drop_after_data_bytes is not None and received >= self.drop_after_data_bytes:
                io.writer.transport.abort()
                conn.closed_by_peer = True
                raise _Hangup
            if raw == b".\r\n":
                break
            data += raw[1:] if raw.startswith(b".") else raw
        self.counts[END_OF_DATA] += 1
        reply = await self._hook(END_OF_DATA, "", conn)
        if reply is None:
            reply = f"250 2.0.0 Ok: queued as M{len(self.messages) + 1}"
        if reply.startswith("2"):
            conn.messages.append(ReceivedMessage(sender, list(rcpts), bytes(data)))
        await self._reply(io, conn, reply)


def _path(arg: str, prefix: str) -> str:
    """The address in 'FROM:<a@b> SIZE=1' (or 'TO:<...>')."""
    rest = arg[len(prefix):] if arg.upper().startswith(prefix) else arg
    rest = rest.strip()
    if rest.startswith("<"):
        return rest[1:rest.find(">")] if ">" in rest else rest[1:]
    return rest.split(" ", 1)[0]
