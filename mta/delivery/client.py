"""One outbound SMTP session (RFC 5321), written directly on asyncio streams.

Why not aiosmtplib (checked against the installed 5.1 source, smtp.py/protocol.py):

* ``SMTP.sendmail()`` awaits the reply to MAIL, then to each RCPT in turn
  (``_send_recipients`` loops over ``rcpt()``), then DATA: one round trip per
  command. It parses the PIPELINING keyword but never batches commands, so it
  does not do RFC 2920 pipelining.
* Its protocol silently drops bytes that arrive while no command is waiting for
  a reply (``data_received`` ignores them). A connection cache must *see* such
  data -- typically "421 idle timeout" before the peer closes -- to throw the
  session away instead of reusing it.
* Plaintext that arrives after the 220 to STARTTLS must be discarded
  (CVE-2011-0411, RFC 3207 section 4.2). aiosmtplib 5.1 does clear its buffer
  there, but we need that together with the two points above, so we own the
  stream and do all three explicitly.

TLS policy (``tls``): "none" never uses STARTTLS; "may" uses it when offered
and falls back to plaintext if the server refuses it; "encrypt" requires it
(absent or refused is a 4.7.4 TransientError). In both "may" and "encrypt" the
certificate is NOT verified: like Postfix's "may"/"encrypt" levels this protects
against passive eavesdropping only (opportunistic TLS, RFC 7435). Verification
would need a trust policy per destination, which the config does not have.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import ssl

from mta.config import TimeoutsConfig
from mta.errors import PermanentError, TransientError
from mta.model import Reply, normalize_line_ends

log = logging.getLogger("mta.delivery")

_LINE_LIMIT = 64 * 1024        # longest reply line we accept (RFC 5321 4.5.3.1.5 says 512)
_MAX_REPLY_LINES = 200         # a multi-line reply longer than this is hostile
_CHUNK = 64 * 1024             # message data is written (and drained) in chunks of this size
_QUIT_WAIT = 2.0               # how long QUIT waits for its 221
_BAD_ADDRESS_CHARS = ("\r", "\n", "\0")
TLS_MODES = ("may", "encrypt", "none")


class ConnectionLost(TransientError):
    """The session is unusable: network error, timeout, or a 421 from the peer.

    The router tells this apart from an ordinary 4xx: it is the cue to move on
    to the next host, or to retry once on a fresh connection when the session
    came from the cache.
    """


class ConnectFailed(ConnectionLost):
    """No TCP connection could be made (refused, unreachable, connect timeout)."""


class _Reader(asyncio.StreamReader):
    """A StreamReader that can report and drop what it has buffered.

    asyncio has no public API for either; both are needed to discard injected
    plaintext at STARTTLS and to notice unsolicited data on an idle session.
    """

    def pending(self) -> int:
        return len(self._buffer)  # type: ignore[attr-defined]

    def has_line(self) -> bool:
        """A whole line is buffered: readline() returns without waiting."""
        return b"\n" in self._buffer  # type: ignore[attr-defined]

    def discard(self) -> int:
        n = len(self._buffer)  # type: ignore[attr-defined]
        self._buffer.clear()  # type: ignore[attr-defined]
        self._maybe_resume_transport()  # type: ignore[attr-defined]
        return n


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_reply(lines: list[str]) -> Reply:
    """Turn the lines of a (possibly multi-line, RFC 5321 4.2.1) reply into one Reply."""
    first = Reply.parse(f"{lines[0][:3]} {lines[0][4:]}")   # "250-..." parses like "250 ..."
    texts = [first.text]
    for line in lines[1:]:
        rest = line[4:]
        if rest.startswith(first.enhanced + " "):   # repeated enhanced code on each line
            rest = rest[len(first.enhanced) + 1:]
        texts.append(rest)
    return Reply(first.code, first.enhanced, " ".join(t for t in texts if t))


def to_wire(data: bytes) -> tuple[bytes, int]:
    """Message data as sent after DATA, and its RFC 1870 size.

    Every bare CR or LF becomes CRLF (RFC 5321 2.3.8) so that no downstream
    server, however lenient, sees a line ending we did not mean -- the SMTP
    smuggling pattern. Lines starting with "." are dot-stuffed (4.5.2) and the
    data ends with CRLF "." CRLF. The size counts the normalised data without
    stuffing or terminator, as RFC 1870 section 3 asks.
    """
    body = normalize_line_ends(data)  # the queue holds CRLF-only data: usually the fast path
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n", len(body)


class Session:
    """An open, greeted (and possibly TLS-protected and authenticated) SMTP session."""

    def __init__(self, reader: _Reader, writer: asyncio.StreamWriter, *, address: str, port: int,
                 server_name: str, timeouts: TimeoutsConfig):
        self._reader = reader
        self._writer = writer
        self.address = address
        self.port = port
        self.server_name = server_name
        self.timeouts = timeouts
        self.extensions: dict[str, str] = {}   # EHLO keyword (upper case) -> parameters
        self.esmtp = False
        self.tls_active = False
        self.transactions = 0
        self._dead = False
        self._unsolicited = False
        self._rset_due = False   # a reused session: RSET goes first in the next transaction
        self._stage = "receiving the initial server greeting"

    # ------------------------------------------------------------------ properties

    @property
    def peer(self) -> str:
        """'mx1.example.test[127.0.0.2]:25' -- Postfix's relay= form."""
        return f"{self.server_name}[{self.address}]:{self.port}"

    @property
    def host(self) -> str:
        """'mx1.example.test[127.0.0.2]' -- the form Postfix uses in conversation errors."""
        return f"{self.server_name}[{self.address}]"

    @property
    def is_alive(self) -> bool:
        return not (self._dead or self._writer.is_closing() or self._reader.at_eof())

    @property
    def size_limit(self) -> int | None:
        """The peer's SIZE (RFC 1870); None when not announced or 0 (no fixed limit)."""
        value = self.extensions.get("SIZE", "").split()
        if value and value[0].isdigit() and int(value[0]) > 0:
            return int(value[0])
        return None

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    # ------------------------------------------------------------------ low-level I/O

    def _lost(self, why: str) -> ConnectionLost:
        self._close_now()
        return ConnectionLost(Reply(451, "4.4.2", f"{why} with {self.host} while {self._stage}"))

    async def _write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise self._lost("lost connection")
        try:
            self._writer.write(data)
            transport = self._writer.transport
            if transport.get_write_buffer_size() == 0 and not transport.is_closing():
                return   # all of it went to the kernel: nothing to wait for, no timer to set
            async with asyncio.timeout(self.timeouts.command):
                await self._writer.drain()
        except TimeoutError:
            raise self._timed_out() from None
        except (OSError, RuntimeError):
            raise self._lost("lost connection") from None

    def _timed_out(self) -> ConnectionLost:
        self._close_now()
        return ConnectionLost(Reply(451, "4.4.2",
                                    f"conversation with {self.host} timed out while {self._stage}"))

    # A deadline of our own, not asyncio.timeout() around the call (ASYNC109): no timer at
    # all for a reply already buffered, which is most replies to a pipelined group.
    async def _read_lines(self, timeout: float | None = None) -> list[str]:  # noqa: ASYNC109
        """One reply's lines, decoded. Raises ConnectionLost on EOF, timeout or garbage."""
        lines: list[str] = []
        reader = self._reader
        # One deadline for the whole reply; a timer only when a line has to be waited
        # for (the replies to a pipelined group usually arrive, and wait, together).
        deadline = asyncio.get_running_loop().time() + (self.timeouts.command if timeout is None else timeout)
        try:
            while True:
                if reader.has_line():
                    raw = await reader.readline()
                else:
                    async with asyncio.timeout_at(deadline):
                        raw = await reader.readline()
                if not raw.endswith(b"\n"):
                    raise self._lost("lost connection")
                line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-") \
                        or (lines and line[:3] != lines[0][:3]):
                    self._close_now()
                    raise ConnectionLost(Reply(451, "4.5.0", f"{self.host} sent a malformed reply "
                                               f"while {self._stage}: {line[:100]!r}"))
                lines.append(line)
                if line[3:4] != "-":
                    return lines
                if len(lines) > _MAX_REPLY_LINES:
                    raise self._lost("reply too long")
        except TimeoutError:
            raise self._timed_out() from None
        except (OSError, ValueError):   # ValueError: line longer than the reader's limit
            raise self._lost("lost connection") from None

    async def _read_reply(self, timeout: float | None = None) -> Reply:  # noqa: ASYNC109 (see _read_lines)
        return self._check_421(parse_reply(await self._read_lines(timeout)))

    def _check_421(self, reply: Reply) -> Reply:
        if reply.code == 421:
            # RFC 5321 3.8: the server is closing the transmission channel.
            self._close_now()
            raise ConnectionLost(reply)
        return reply

    async def _command(self, line: str, stage: str, *, utf8: bool = False) -> Reply:
        self._stage = stage
        await self._write(line.encode("utf-8" if utf8 else "ascii") + b"\r\n")
        return await self._read_reply()

    def _close_now(self) -> None:
        self._dead = True
        if not self._writer.is_closing():
            self._writer.close()

    async def _close(self) -> None:
        self._close_now()
        try:
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()
        except Exception:   # timeout, reset, TLS shutdown trouble: just drop it
            self._writer.transport.abort()

    # ------------------------------------------------------------------ handshake

    async def _handshake(self, helo_name: str, tls: str, auth: tuple[str, str] | None) -> None:
        greeting = await self._read_reply()
        if greeting.code != 220:
            if greeting.permanent:
                # RFC 5321 3.1 lets a server refuse service with a 554 greeting; that says
                # nothing about the mail. Like Postfix (smtp_skip_5xx_greeting = yes), try
                # the next host, and defer when none is left.
                greeting = Reply(450, "4" + greeting.enhanced[1:],   # parse() always fills enhanced
                                 f"host {self.host} refused to talk to me: {greeting}")
            await self._fail(greeting)
        await self._ehlo(helo_name)
        if tls != "none":
            if self.has("STARTTLS"):
                await self._starttls(helo_name, tls)
            elif tls == "encrypt":
                await self._fail(Reply(451, "4.7.4",
                                       f"TLS is required, but was not offered by host {self.host}"))
        if auth is not None:
            await self._auth(*auth)

    async def _fail(self, reply: Reply) -> None:
        """Give up on this session: QUIT politely, close, raise with ``reply``."""
        await self.quit()
        if reply.permanent:
            raise PermanentError(reply)
        raise TransientError(reply)

    async def _ehlo(self, helo_name: str) -> None:
        self._stage = "performing the EHLO handshake"
        await self._write(f"EHLO {helo_name}\r\n".encode("ascii"))
        lines = await self._read_lines()
        reply = self._check_421(parse_reply(lines))
        if reply.code == 250:
            self.esmtp = True
            self.extensions = {}
            for line in lines[1:]:
                keyword, _, params = line[4:].strip().partition(" ")
                if "=" in keyword:   # the pre-RFC 4954 "AUTH=PLAIN LOGIN" form
                    keyword, _, first = keyword.partition("=")
                    params = f"{first} {params}"
                if keyword:
                    self.extensions.setdefault(keyword.upper(), params.strip())
            return
        if reply.permanent:
            # RFC 5321 3.2: a server that does not do ESMTP answers EHLO with 5xx; try HELO.
            helo = await self._command(f"HELO {helo_name}", "performing the HELO handshake")
            if helo.code == 250:
                self.esmtp = False
                self.extensions = {}
                return
            reply = helo
        await self._fail(reply)

    async def _starttls(self, helo_name: str, tls: str) -> None:
        reply = await self._command("STARTTLS", "sending STARTTLS")
        if reply.code != 220:
            if tls == "encrypt":
                await self._fail(Reply(451, "4.7.4", f"TLS is required, but host {self.host} "
                                       f"refused to start TLS: {reply}"))
            log.debug("%s refused STARTTLS (%s); continuing in plaintext", self.peer, reply)
            return
        # RFC 3207 4.2 / CVE-2011-0411: anything received after the 220 and before the
        # handshake was not protected by TLS and may have been injected; drop it.
        dropped = self._reader.discard()
        if dropped:
            log.warning("%s sent %d bytes of plaintext after STARTTLS; discarded", self.peer, dropped)
        context = ssl.create_default_context()
        context.check_hostname = False          # see the module docstring: opportunistic TLS
        context.verify_mode = ssl.CERT_NONE
        self._stage = "performing the TLS handshake"
        try:
            async with asyncio.timeout(self.timeouts.command):
                await self._writer.start_tls(
                    context, server_hostname=None if _is_ip(self.server_name) else self.server_name)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            self._dead = True
            self._writer.transport.abort()
            raise ConnectionLost(Reply(451, "4.7.5", f"Cannot start TLS with {self.host}: "
                                       f"{getattr(exc, 'reason', None) or exc or 'handshake timeout'}")) from None
        self.tls_active = True
        # The server speaks only after our EHLO; anything already here (plaintext that
        # slipped in before reading paused for the handshake) would desync replies.
        self._reader.discard()
        await self._ehlo(helo_name)  # RFC 3207 4.2: forget what we knew, ask again

    async def _auth(self, username: str, password: str) -> None:
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        self._stage = "authenticating"
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
            reply = await self._command(f"AUTH PLAIN {token}", "sending AUTH")
        elif "LOGIN" in mechanisms:
            reply = await self._command("AUTH LOGIN", "sending AUTH")
            for secret in (username, password):
                if reply.code != 334:
                    break
                reply = await self._command(base64.b64encode(secret.encode()).decode("ascii"),
                                            "sending AUTH")
        else:
            await self._fail(Reply(451, "4.7.0", f"SASL authentication failed; server {self.host} "
                                   "offered no compatible authentication mechanisms"))
            return
        if reply.code != 235:
            # Like Postfix (smtp_sasl_auth_soft_bounce=yes) an AUTH failure defers: it is
            # usually our configuration, and bouncing mail for that would be harsh.
            await self._fail(Reply(451, "4.7.8" if reply.code == 535 else "4.7.0",
                                   f"SASL authentication failed; server {self.host} said: {reply}"))

    # ------------------------------------------------------------------ transactions

    async def send(self, sender: str, recipients: list[str], data: bytes, *, smtputf8: bool = False,
                   body_8bit: bool = False, mail_params: str = "",
                   rcpt_params: dict[str, str] | None = None) -> dict[str, Reply]:
        """One mail transaction; the final Reply for every recipient.

        Raises TransientError/PermanentError when the whole transaction fails
        before any recipient could be judged (MAIL refused, size, SMTPUTF8),
        ConnectionLost when the session broke (the session is then dead).
        """
        if not self.is_alive:
            raise self._lost("lost connection")
        results: dict[str, Reply] = {}
        if any(c in sender for c in _BAD_ADDRESS_CHARS):
            raise PermanentError(Reply(501, "5.1.7", "bad sender address syntax"))
        wanted = []
        for rcpt in recipients:
            if any(c in rcpt for c in _BAD_ADDRESS_CHARS):
                results[rcpt] = Reply(501, "5.1.3", "bad recipient address syntax")
            else:
                wanted.append(rcpt)
        if not wanted:
            return results
        # A non-ASCII address cannot go on the wire without SMTPUTF8 (RFC 6531 3.4).
        smtputf8 = smtputf8 or not all(a.isascii() for a in [sender, *wanted])
        if smtputf8 and not self.has("SMTPUTF8"):
            raise PermanentError(Reply(550, "5.6.7", "SMTPUTF8 is required, "
                                       f"but was not offered by host {self.host}"))
        wire, size = to_wire(data)
        limit = self.size_limit
        if limit is not None and size > limit:
            raise PermanentError(Reply(552, "5.3.4", "Message size exceeds fixed limit of the next hop"))

        mail = self._mail_command(sender, size, body_8bit, smtputf8, mail_params)
        params = rcpt_params or {}
        rcpt_lines = [" ".join(filter(None, (f"RCPT TO:<{rcpt}>", params.get(rcpt, "")))) for rcpt in wanted]
        self.transactions += 1

        if self.has("PIPELINING"):
            accepted, data_reply = await self._envelope_pipelined(mail, rcpt_lines, wanted, results,
                                                                  smtputf8)
        else:
            if self._rset_due:
                self._rset_due = False
                self._check_rset(await self._command("RSET", "sending RSET"))
            accepted, data_reply = await self._envelope_lockstep(mail, rcpt_lines, wanted, results,
                                                                 smtputf8)
        if data_reply is None:           # no recipient accepted: the transaction is over
            return results
        if data_reply.code == 354:
            if not accepted:
                # A pipelining server said 354 although every RCPT failed: end the
                # empty message at once (RFC 2920 3.1) and ignore its verdict.
                self._stage = "sending end of data"
                await self._write(b".\r\n")
                await self._read_reply()
                return results
            data_reply = await self._send_content(wire)
        for rcpt in accepted:
            results[rcpt] = data_reply
        return results

    def _mail_command(self, sender: str, size: int, body_8bit: bool, smtputf8: bool, mail_params: str) -> str:
        mail = f"MAIL FROM:<{sender}>"
        if self.has("SIZE"):
            mail += f" SIZE={size}"
        if body_8bit and self.has("8BITMIME"):
            # Without 8BITMIME we send the 8-bit body as is, as Postfix does by default.
            mail += " BODY=8BITMIME"
        if smtputf8:
            mail += " SMTPUTF8"
        if mail_params:
            mail += " " + mail_params
        return mail

    async def _send_content(self, wire: bytes) -> Reply:
        """After the 354: the dot-stuffed message and its end, then the verdict."""
        self._stage = "sending message body"
        for start in range(0, len(wire), _CHUNK):
            await self._write(wire[start:start + _CHUNK])
        self._stage = "sending end of data -- message may be sent more than once"
        return await self._read_reply()

    def _check_rset(self, reply: Reply) -> None:
        """A cached session whose RSET fails is finished; the message goes on a new one."""
        if reply.code != 250:
            raise self._lost(f"RSET answered {reply.code}")

    def _check_mail(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            return
        if reply.permanent:
            raise PermanentError(reply)
        raise TransientError(reply)

    async def _envelope_pipelined(self, mail: str, rcpt_lines: list[str], wanted: list[str],
                                  results: dict[str, Reply], utf8: bool
                                  ) -> tuple[list[str], Reply | None]:
        # RFC 2920 3.1: MAIL, the RCPTs and DATA go in one write -- DATA is the last
        # command of the group, since what follows depends on its reply.
        rset, self._rset_due = self._rset_due, False
        self._stage = "sending RSET" if rset else "sending MAIL FROM"
        batch = "".join(line + "\r\n" for line in [*(["RSET"] if rset else []), mail, *rcpt_lines, "DATA"])
        await self._write(batch.encode("utf-8" if utf8 else "ascii"))
        if rset:
            self._check_rset(await self._read_reply())
            self._stage = "sending MAIL FROM"
        mail_reply = await self._read_reply()
        accepted = []
        self._stage = "sending RCPT TO"
        for rcpt in wanted:
            reply = await self._read_reply()
            if reply.code // 100 == 2:
                accepted.append(rcpt)
            else:
                results[rcpt] = reply
        self._stage = "sending DATA command"
        data_reply = await self._read_reply()
        if mail_reply.code // 100 != 2:
            if data_reply.code == 354:       # a broken server: end the empty message
                await self._write(b".\r\n")
                await self._read_reply()
            self._check_mail(mail_reply)
        if not accepted and data_reply.code != 354:
            return accepted, None
        return accepted, data_reply

    async def _envelope_lockstep(self, mail: str, rcpt_lines: list[str], wanted: list[str],
                                 results: dict[str, Reply], utf8: bool
                                 ) -> tuple[list[str], Reply | None]:
        self._check_mail(await self._command(mail, "sending MAIL FROM", utf8=utf8))
        accepted = []
        for rcpt, line in zip(wanted, rcpt_lines, strict=True):
            reply = await self._command(line, "sending RCPT TO", utf8=utf8)
            if reply.code // 100 == 2:
                accepted.append(rcpt)
            else:
                results[rcpt] = reply
        if not accepted:
            return accepted, None
        return accepted, await self._command("DATA", "sending DATA command")

    # ------------------------------------------------------------------ reuse and shutdown

    async def wait_unsolicited(self) -> None:
        """Return when the peer sends anything (or closes) while we are idle.

        Used by the connection cache's idle watcher. Whatever arrives is consumed:
        the session is unusable from then on anyway. Cancelling this is safe.
        """
        await self._reader.read(1)
        self._unsolicited = True

    def reuse(self) -> bool:
        """Take a cached session for a new transaction; False if it is not usable.

        The RSET (RFC 5321 4.1.1.5) is sent with the next transaction's MAIL,
        RCPT and DATA in one pipelined write (RFC 2920 3.1 allows RSET anywhere
        in a group), saving a round trip per message; if its reply is not 250
        the transaction fails as a lost connection and the router retries on a
        new one. Without PIPELINING it is sent alone first.
        """
        if self._unsolicited or self._reader.pending() or not self.is_alive:
            # The peer spoke while idle (typically "421 ... timeout") or hung up.
            self._dead = True
            return False
        self._rset_due = True
        return True

    async def rset(self) -> bool:
        """RSET now, waiting for the reply; False if the session is not usable."""
        if not self.reuse():
            return False
        self._rset_due = False
        try:
            reply = await self._command("RSET", "sending RSET")
        except TransientError:
            return False
        return reply.code == 250

    def abort(self) -> None:
        """Drop the connection at once, without QUIT (for cancellation and bugs)."""
        self._dead = True
        self._writer.transport.abort()

    async def quit(self) -> None:
        """Say QUIT, wait briefly for the 221 and close. Never raises."""
        try:
            if self.is_alive and not self._unsolicited and not self._reader.pending():
                self._stage = "sending QUIT"
                self._writer.write(b"QUIT\r\n")
                await self._read_lines(min(_QUIT_WAIT, self.timeouts.command))
        except Exception:   # noqa: BLE001 -- quitting must never fail the caller
            pass
        finally:
            await self._close()


async def connect(address: str, port: int, *, server_name: str, helo_name: str, tls: str,
                  timeouts: TimeoutsConfig, auth: tuple[str, str] | None = None) -> Session:
    """Open a session to ``address``:``port``: greeting, EHLO/HELO, STARTTLS, AUTH.

    Raises ConnectionLost for network trouble and 421s, TransientError for other
    4xx and for a 5xx greeting (try the next host), and PermanentError for 5xx to
    EHLO and HELO (after QUIT).
    """
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
    loop = asyncio.get_running_loop()
    reader = _Reader(limit=_LINE_LIMIT, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    where = f"connect to {server_name}[{address}]:{port}"
    try:
        async with asyncio.timeout(timeouts.connect):
            transport, _ = await loop.create_connection(lambda: protocol, address, port)
    except TimeoutError:
        raise ConnectFailed(Reply(451, "4.4.1", f"{where}: Connection timed out")) from None
    except OSError as exc:
        # asyncio puts "Connect call failed (...)" in strerror; Postfix says "Connection refused".
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConnectFailed(Reply(451, "4.4.1", f"{where}: {reason}")) from None
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    session = Session(reader, writer, address=address, port=port, server_name=server_name,
                      timeouts=timeouts)
    try:
        await session._handshake(helo_name, tls, auth)
    except BaseException:
        session._close_now()
        writer.transport.abort()
        raise
    return session
