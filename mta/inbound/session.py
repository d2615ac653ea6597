"""aiosmtpd's SMTP protocol with the corrections an MTA needs.

aiosmtpd 1.4.6 answers many errors without an enhanced status code
(``500 Error: bad syntax``, ``552 Error: Too much mail data``), closes idle
clients silently, keeps its command size limits in a class-level dict shared by
every session, and cannot tell an implicit-TLS socket from a plain one. This
subclass fixes those in one place: every reply leaves through :meth:`push`,
which adds the RFC 3463 code a reply lacks (:mod:`mta.inbound.replies`; RFC 2034
§3 exempts the greeting, the EHLO/HELO replies and AUTH challenges).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import re
from email._header_value_parser import get_addr_spec, get_angle_addr  # what aiosmtpd uses
from email.errors import HeaderParseError
from typing import Any, AnyStr, Literal, Protocol, cast

from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException, syntax

from mta.config import ListenerConfig
from mta.inbound.envelope import NO_DSN, InboundEnvelope, InboundSession
from mta.inbound.limiter import ConnectionLimiter
from mta.inbound.policy import ATEXT, REPLIES, DSNParams, split_dsn_params
from mta.inbound.replies import enhance_reply
from mta.model import Reply
from mta.tls import handshake_error

log = logging.getLogger("mta.smtpd")

_CR_NUL = re.compile(r"[\r\x00]")
# The everyday address, <dot-atom@host.name> (RFC 5321 §4.1.2) and the parameters
# after it: read without the stdlib's RFC 5322 parser, which costs ~50 µs per
# MAIL and RCPT. Anything else (quoted local parts, literals, comments, junk)
# goes to the full parser; tests/test_session_fastpath.py checks both agree.
_PLAIN_ANGLE_ADDR = re.compile(rf"[ \t]*<({ATEXT}(?:\.{ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)",
                               re.DOTALL)

# Error replies that do not count towards limits.hard_error_limit: a 421 ends the
# session anyway, and "too many recipients" is the client's cue to send the rest in
# another transaction (Postfix counts it only beyond smtpd_recipient_overshoot_limit).
_NOT_COUNTED = (b"421", f"{REPLIES['too_many_rcpts'].code} {REPLIES['too_many_rcpts'].enhanced}".encode())

# Replies that are written at once, never held for the rest of a pipelined group.
_FLUSH_NOW = frozenset((b"220", b"221", b"421"))
_MAX_HELD_REPLIES = 65536   # bytes of replies held back at most for a client that pipelines a lot

# RFC 5321 §4.5.3.1.4: 512 octets for a command line, plus what extensions add
# to MAIL (RFC 1870 SIZE: 26, RFC 6531 SMTPUTF8: 10, RFC 6152 BODY: 14, RFC 3461: 100+).
COMMAND_LIMIT = 512
MAIL_EXTRA = 26 + 10 + 14 + 100 + 10 + 500
RCPT_EXTRA = 500 + 20
# RFC 5321 §4.5.3.1.6 caps text lines at 1000 octets, but a relay in a lab must
# take what sloppy programs send (a bare-LF message is one long "line" until we
# normalise it). Longer lines are refused with 500 5.5.2.
DATA_LINE_LIMIT = 65536
# After the idle timeout's 421, how long a client has to read it before the
# connection is aborted (at most the idle timeout itself).
CLOSE_GRACE = 5.0


class SessionHandler(Protocol):
    """What InboundSMTP asks of its handler (mta.inbound.handler.InboundHandler)
    besides the handle_* and auth_* hooks aiosmtpd calls."""

    listener: ListenerConfig

    def connected(self, ip: str) -> None:
        """A client was admitted (the handler starts its reverse-DNS look-up)."""

    def note_reply(self, code: int) -> None:
        """Every 4xx/5xx reply the session sends."""

    def trusted(self, session: InboundSession) -> bool:
        """The client may relay anywhere (mynetworks or authenticated)."""

    def offers_dsn(self, session: InboundSession) -> bool:
        """DSN belongs in the EHLO reply."""

    def honours_dsn(self, session: InboundSession) -> bool:
        """RFC 3461 parameters are taken on MAIL and RCPT (else refused as unknown)."""

    async def log_reject(self, session: InboundSession, envelope: InboundEnvelope, stage: str, reply: object,
                         sender: str | None = None, recipient: str | None = None,
                         level: int = logging.INFO) -> None:
        """Postfix's NOQUEUE reject line."""


class InboundSMTP(SMTP):
    """One inbound SMTP session (aiosmtpd protocol object)."""

    line_length_limit = DATA_LINE_LIMIT
    event_handler: SessionHandler
    session: InboundSession | None
    envelope: InboundEnvelope | None
    _dir_cache: list[str] | None = None

    def __dir__(self) -> list[str]:
        # aiosmtpd.SMTP.__init__ scans dir(self) (twice, once through
        # inspect.getmembers) for its smtp_* and auth_* methods on every new
        # connection: ~250 us, most of a short session's set-up. Listing only
        # those names gives it the same maps at a fraction of the cost.
        cls = type(self)
        if cls._dir_cache is None:
            cls._dir_cache = sorted(n for n in object.__dir__(self) if n.startswith(("smtp_", "auth_")))
        return cls._dir_cache

    def __init__(self, handler: SessionHandler, *, limiter: ConnectionLimiter, implicit_tls: bool = False,
                 hard_error_limit: int = 20, junk_command_limit: int = 100, **kwargs: Any):
        super().__init__(handler, **kwargs)
        # Postfix's smtpd_hard_error_limit and smtpd_junk_command_limit: a client that
        # keeps getting errors is told 421 and dropped; NOOP, RSET and VRFY beyond the
        # junk limit count as errors; each accepted message resets both counts.
        self._hard_error_limit = hard_error_limit
        self._junk_command_limit = junk_command_limit
        self._errors = 0
        self._junk_commands = 0
        # An instance dict: aiosmtpd's class-level one grows with every EHLO of every session.
        self.command_size_limits = collections.defaultdict(lambda: COMMAND_LIMIT)
        self.command_size_limits["MAIL"] = COMMAND_LIMIT + MAIL_EXTRA
        self.command_size_limits["RCPT"] = COMMAND_LIMIT + RCPT_EXTRA
        self._limiter = limiter
        self._implicit_tls = implicit_tls
        self._admitted_ip: str | None = None
        self.refused = False
        self._in_data = False
        # The RFC 3461 parameters of the MAIL or RCPT being handled, for the handler's hook.
        self.pending_dsn: DSNParams = NO_DSN
        self._replies: list[bytes] = []   # replies not yet written (see _send_reply)
        self._replies_size = 0

    def _create_session(self) -> InboundSession:
        return InboundSession(self.loop)

    def _create_envelope(self) -> InboundEnvelope:
        return InboundEnvelope()

    # ------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if peer else "unknown"
            if self._limiter.admit(ip):
                self._admitted_ip = ip
                self.event_handler.connected(ip)
            else:
                self.refused = True
        super().connection_made(transport)
        if first and self._implicit_tls and transport.get_extra_info("ssl_object") is not None:
            # aiosmtpd only knows TLS begun by STARTTLS; on a port-465 style
            # socket the session is encrypted from the start (RFC 8314 §3.3).
            self._tls_protocol = transport  # type: ignore[assignment]
            assert self.session is not None
            self.session.ssl = {"implicit": True}

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted_ip is not None:
            self._limiter.release(self._admitted_ip)
            self._admitted_ip = None
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self.refused:
            log.warning("connection from %s refused: too many connections", self.session.peer if self.session else "?")
            await self.push(str(REPLIES["too_many_connections"]))
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client that gives up its STARTTLS handshake (scanners do, all day): one
            # line naming it, not an ERROR with a traceback (issue 12). aiosmtpd closes
            # the connection itself after this and sends nothing.
            ip = self.session.peer[0] if self.session and isinstance(self.session.peer, tuple) else "unknown"
            host = (self.session.host_name if self.session else None) or "unknown"
            log.info("SSL_accept error from %s[%s]: %s (STARTTLS, listener %s)", host, ip,
                     handshake_error(error.__cause__), self.event_handler.listener.name)
            return ""
        return await super().handle_exception(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd calls this for every command: it cancelled its timer and made a
        new one each time. Here the deadline moves and one timer follows it,
        re-armed only when it fires early (the same timeout, far fewer timers)."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._idle_timer)

    def _idle_timer(self) -> None:
        if self.loop.time() < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_timer)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2.7: tell the client why before closing.
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):   # the socket may already be gone
                self._writer.write(self._take_replies() + str(REPLIES["idle_timeout"]).encode() + b"\r\n")
        super()._timeout_cb()   # type: ignore[no-untyped-call]
        # close() waits until the write buffer is flushed. A client that has stopped
        # reading ("slow read") never lets that happen, so connection_lost never came
        # and it kept its connection slot forever: drop it if still open a bit later.
        self.loop.call_later(min(self._timeout_duration, CLOSE_GRACE), self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.transport is not None:
            log.info("%s did not read the timeout reply; connection aborted",
                     self.session.peer if self.session else "?")
            cast(asyncio.Transport, self.transport).abort()

    def idle_between_transactions(self) -> bool:
        """No MAIL in progress and no reply being written (safe to close at shutdown)."""
        return not self._in_data and (self.envelope is None or not self.envelope.mail_from)

    def close_with(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):   # the socket may already be gone
                self._writer.write(self._take_replies() + reply)
            self.transport.close()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA read in large pieces instead of aiosmtpd's line-by-line loop.

        aiosmtpd awaits one ``readuntil(CRLF)`` per line, which costs more CPU
        than everything else about a 100 kB message. Here the reader searches
        for ".\r\n" (one C-level scan of its buffer per hit) and a hit ends
        the data only when it starts a line: only <CRLF>.<CRLF> ends DATA
        (RFC 5321 §4.1.1.4), never a bare LF or CR variant (SMTP smuggling).
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._in_data = True
        try:
            content = await read_data(self._reader, self.data_size_limit)
        finally:
            self._in_data = False
        if content is None:
            self._set_post_data_state()   # type: ignore[no-untyped-call]
            await self.push("552 5.3.4 Message too big")
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()   # type: ignore[no-untyped-call]
        if status.startswith("250"):
            # Postfix: the hard limit is on errors "without delivering mail", and the
            # junk count "is reset after mail is delivered": an accepted message
            # forgives both.
            self._errors = self._junk_commands = 0
        await self.push(status)

    # ------------------------------------------------------------ replies
    async def push(self, status: AnyStr) -> None:
        raw = status.encode("utf-8", "surrogateescape") if isinstance(status, str) else status
        reply = enhance_reply(raw)
        error = reply[:1] in (b"4", b"5") and reply[3:4] != b"-" and reply[:3].isdigit()
        if error:
            self.event_handler.note_reply(int(reply[:3]))
        await self._send_reply([reply])
        if reply.startswith(b"421 ") and self.transport is not None:
            # RFC 5321 §3.8: 421 means the server closes the channel. Every 421 of ours and
            # aiosmtpd's closed already; this one is for a chaos trigger given code 421.
            self.transport.close()
        elif error and not reply.startswith(_NOT_COUNTED):
            self._count_error()

    async def _send_reply(self, lines: list[bytes]) -> None:
        """Queue a reply; write what is queued in one write unless the client has
        more commands waiting in our buffer (RFC 2920 §3.1: the replies to a pipelined
        group may be sent together). Postfix writes that way: a multi-line EHLO reply
        or a group of replies is one TCP segment, one TLS record. A client that reads
        one segment per reply (nmap's smtp-open-relay) fell out of step when EHLO went
        out as 7 writes; fewer writes also cost less CPU."""
        for line in lines:
            self._replies.append(line + b"\r\n")
            self._replies_size += len(line) + 2
        code = lines[-1][:3]
        # A 3xx waits for the client's answer, 220 (STARTTLS) and 221/421 precede a
        # transport change or a close: those always go out at once.
        if (code[:1] != b"3" and code not in _FLUSH_NOW and self._replies_size < _MAX_HELD_REPLIES
                and not self._in_data and b"\n" in self._reader._buffer):   # type: ignore[attr-defined]
            return
        await self._flush_replies()

    async def _flush_replies(self) -> None:
        if not self._replies or self.transport is None:
            return
        data = b"".join(self._replies)
        self._replies.clear()
        self._replies_size = 0
        self._writer.write(data)
        if self.session is not None:
            log.debug("%r << %r", self.session.peer, data)
        await self._writer.drain()

    def _take_replies(self) -> bytes:
        """Replies still queued, for a write that closes the connection right after."""
        data = b"".join(self._replies)
        self._replies.clear()
        self._replies_size = 0
        return data

    def _count_error(self) -> None:
        """One more error (Postfix's error_count); at limits.hard_error_limit, 421 and close."""
        self._errors += 1
        if self._errors < self._hard_error_limit or self.transport is None or self.transport.is_closing():
            return
        log.warning("%s: too many errors (limits.hard_error_limit = %d); disconnecting",
                    self.session.peer if self.session else "?", self._hard_error_limit)
        r = REPLIES["too_many_errors"]
        self.close_with(f"{r.code} {r.enhanced} {self.hostname} {r.text}\r\n".encode())

    def _junk(self) -> None:
        self._junk_commands += 1
        if self._junk_commands > self._junk_command_limit:
            self._count_error()

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        await super().smtp_NOOP(arg)
        self._junk()

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        await super().smtp_RSET(arg)
        self._junk()

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        await super().smtp_VRFY(arg)
        self._junk()

    async def push_raw(self, lines: list[str]) -> None:
        """Send lines untouched (greeting-like replies exempt from enhanced codes), in one write."""
        await self._send_reply([line.encode("utf-8", "surrogateescape") for line in lines])

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str | None) -> None:
        # SASL mechanism names are upper case (RFC 4422 3.1) but clients may send
        # "auth plain": Postfix (Cyrus SASL) matches them without regard to case.
        if arg:   # None when the command has no argument
            mechanism, sep, rest = arg.partition(" ")
            arg = mechanism.upper() + sep + rest
        await super().smtp_AUTH(arg)

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """aiosmtpd's AUTH challenge, but an overlong response is refused cleanly.

        aiosmtpd reads the response with readline(), which raises ValueError for a
        line over the reader's limit (64 KiB): the client got "451 local error" and
        the rest of its line was then read as commands. Here the line is skipped to
        its end and refused with 500 5.5.6 (RFC 4954 §6). The response is never logged.
        """
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(raw) if encode_to_b64 else raw))
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            line = exc.partial  # EOF: aiosmtpd cancels the session anyway
        except asyncio.LimitOverrunError as exc:
            await self._reader.readexactly(exc.consumed)
            while True:  # as aiosmtpd does for an overlong command line
                try:
                    await self._reader.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await self._reader.readexactly(more.consumed)
            await self.push("500 5.5.6 Authentication Exchange line is too long")
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser without the typing.Protocol class it defines
        on every call (a measurable cost per MAIL and RCPT); same results."""
        if not arg:
            return "", ""
        plain = _PLAIN_ANGLE_ADDR.fullmatch(arg)
        if plain is not None:
            addr, rest = plain.group(1), plain.group(2)
            after = rest.lstrip(" \t")
            if (rest and rest == after) or after.startswith("("):
                return self._getaddr_parsed(arg)   # "<a@b>x" or a comment: the parser's rules
            rest = after
            if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
                return None, None
            return addr, rest
        return self._getaddr_parsed(arg)

    def _getaddr_parsed(self, arg: str) -> tuple[str | None, str | None]:
        try:
            if arg.lstrip().startswith("<"):
                angle, rest = get_angle_addr(arg)
                addr = angle.addr_spec
            else:
                spec, rest = get_addr_spec(arg)
                addr = spec.addr_spec
        except (HeaderParseError, AttributeError, IndexError, ValueError):
            # Not only HeaderParseError: the stdlib parser raises AttributeError for
            # "<user@[" (found by tests/fuzz/fuzz_inbound.py), which aiosmtpd's own
            # _getaddr lets through as a "451 local error". Any failure is a malformed address.
            return None, None
        if arg.lstrip().startswith("<") and not arg[: len(arg) - len(rest)].rstrip().endswith(">"):
            # "<a" or "<a@b.test" without its ">": the stdlib parser only notes a defect.
            return None, None
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    # ------------------------------------------------------------ RFC 3461 DSN parameters
    # aiosmtpd refuses any MAIL/RCPT parameter it does not know (555), so the
    # DSN ones are taken out here and kept on the envelope for the handler.
    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg and _CR_NUL.search(arg):
            # aiosmtpd's parser takes a CR as folding white space (<a@b.test\r> reads as
            # a@b.test); RFC 5321 §2.3.8 allows CR only in CRLF, and NUL never.
            await self.push(str(REPLIES["bad_sender"]))
            return
        rebuilt = await self._take_dsn_params(arg, "FROM:", ("RET", "ENVID"))
        if rebuilt is not False:
            await super().smtp_MAIL(rebuilt)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if arg and _CR_NUL.search(arg):  # as in smtp_MAIL
            await self.push(str(REPLIES["bad_rcpt"]))
            return
        rebuilt = await self._take_dsn_params(arg, "TO:", ("NOTIFY", "ORCPT"))
        if rebuilt is False or await self._refuse_unparsable_rcpt(rebuilt):
            return
        await super().smtp_RCPT(rebuilt)

    async def _refuse_unparsable_rcpt(self, arg: str | None) -> bool:
        """554 5.7.1 (not aiosmtpd's 553 5.1.3) for an address aiosmtpd cannot parse
        (<user@remote@ourhost>), when the client may not relay: an untrusted client
        gets the relay refusal for anything but a plain local@relay_domain."""
        if not arg or self.session is None or self.envelope is None or not self.envelope.mail_from:
            return False
        after = self._strip_command_keyword("TO:", arg)
        if after is None or self._getaddr(after)[0] is not None or self.event_handler.trusted(self.session):
            return False
        # Postfix names the address as the client gave it: "554 5.7.1 <x>: Relay access denied".
        given = after.strip().split(" ", 1)[0].strip("<>")
        denied = REPLIES["relay_denied"]
        reply = f"{denied.code} {denied.enhanced} <{given}>: {denied.text}"
        await self.event_handler.log_reject(self.session, self.envelope, "RCPT", reply, recipient=given)
        await self.push(reply)
        return True

    async def _take_dsn_params(self, arg: str | None, keyword: str,
                               allowed: tuple[str, ...]) -> str | None | Literal[False]:
        """The command argument without its DSN parameters (False: refused here)."""
        self.pending_dsn = NO_DSN
        if not arg or self.session is None or not self.session.extended_smtp:
            return arg
        if not self.event_handler.honours_dsn(self.session):
            return arg   # left for aiosmtpd, which refuses unknown parameters with 555
        after = self._strip_command_keyword(keyword, arg)
        if after is None:
            return arg
        address, rest = self._getaddr(after)
        if address is None or not rest:
            return arg
        address_text = after[: len(after) - len(rest)].rstrip()
        taken = split_dsn_params(rest.split(), allowed)
        if isinstance(taken, Reply):
            await self.push(str(taken))
            return False
        self.pending_dsn, others = taken
        return f"{keyword}{address_text}" + "".join(" " + p for p in others)

    # ------------------------------------------------------------ HELO / EHLO
    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not hostname or _CR_NUL.search(hostname):
            # RFC 5321 §2.3.8: NUL never, CR only in CRLF (the name goes into the queue's
            # rows, Received: lines and logs; PostgreSQL's text refuses a NUL outright).
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        self._set_rset_state()   # type: ignore[no-untyped-call]
        assert self.session is not None
        self.session.extended_smtp = False
        self.session.host_name = hostname
        await self.push_raw([f"250 {self.hostname}"])

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname or _CR_NUL.search(hostname):
            # RFC 5321 §2.3.8: NUL never, CR only in CRLF (the name goes into the queue's
            # rows, Received: lines and logs; PostgreSQL's text refuses a NUL outright).
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()   # type: ignore[no-untyped-call]
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [self.hostname, "PIPELINING"]
        if self.data_size_limit:
            lines.append(f"SIZE {self.data_size_limit}")
        lines += ["8BITMIME", "SMTPUTF8"]
        if self.event_handler.offers_dsn(self.session):
            lines.append("DSN")
        lines.append("ENHANCEDSTATUSCODES")
        if self.tls_context and not self._tls_protocol:
            lines.append("STARTTLS")
        if self._auth_methods and (not self._auth_require_tls or self._tls_protocol):
            lines.append("AUTH " + " ".join(sorted(self._auth_methods)))
        await self.push_raw([f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"])


async def read_data(reader: asyncio.StreamReader, limit: int | None) -> bytes | None:
    """The message after DATA, dot-stuffing undone; None when it exceeds ``limit``.

    Reads to the end even when the message is too big (RFC 5321 §4.2.5: the
    reply comes after the data) but keeps nothing beyond the limit in memory.
    """
    chunks: list[bytes] = []
    size = 0
    tail = b"\r\n"  # the data starts at the beginning of a line
    while True:
        try:
            piece = await reader.readuntil(b".\r\n")
        except asyncio.LimitOverrunError as exc:
            # No ".\r\n" within the reader's limit: take what is safely before any
            # partial match and look again.
            piece = await reader.readexactly(max(exc.consumed, 1))
            end = False
        else:
            before = (tail + piece[:-3])[-2:]
            end = before == b"\r\n"
            if end:
                piece = piece[:-3]
        if piece:
            size += len(piece)
            if limit is None or size <= limit:
                chunks.append(piece)
            elif chunks:
                chunks.clear()  # too big: stop holding it
            tail = (tail + piece)[-2:]
        if end:
            break
    if limit is not None and size > limit:
        return None
    data = b"".join(chunks)
    # Transparency (RFC 5321 §4.5.2): a line that starts with "." lost one.
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")
