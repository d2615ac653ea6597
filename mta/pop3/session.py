"""One POP3 session: RFC 1939's strict state machine over asyncio streams.

AUTHORIZATION (USER/PASS, AUTH PLAIN, STLS) → TRANSACTION (the maildrop as it
was at login, numbered 1..n oldest first, locked against other sessions) →
UPDATE (QUIT: the messages marked with DELE go, in one store commit). A
connection that ends any other way (dropped, timed out, server shutting down)
never reaches UPDATE and so deletes nothing (RFC 1939 §6).

Every command line gets exactly one reply, in order, so clients may pipeline
(RFC 2449 §6.6). A failure inside one session ends that session only.

Here: the connection's lifecycle, I/O and dispatch, and the AUTHORIZATION state
(USER/PASS, AUTH PLAIN, STLS); the TRANSACTION state's commands are
transaction.py, reading command lines lines.py, the reply texts replies.py.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import ssl
import time
from base64 import b64decode
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from mta.config import Config, ListenerConfig
from mta.errors import StoreError
from mta.mailbox.users import MailboxUsers
from mta.passwords import AuthThrottle, UsersFileUnavailable
from mta.pop3 import replies as R
from mta.pop3.commands import Refused, no_args, plural, printable
from mta.pop3.lines import LineReader, TooLong
from mta.pop3.transaction import Transaction
from mta.store.api import Mailboxes, MailboxLock, mailbox_key
from mta.tls import HANDSHAKE_ERRORS, handshake_error

if TYPE_CHECKING:
    from mta.metrics import Metrics

log = logging.getLogger("mta.pop3")

# RFC 2449 §4: a command line is at most 255 octets, CRLF included.
COMMAND_LINE_LIMIT = 255
# RFC 5034 §4 puts no such limit on AUTH continuation lines; RFC 4616 allows 255
# octets for each of authzid, authcid and password, which is ~1 kB in base64.
AUTH_RESPONSE_LIMIT = 2048
# Dovecot closes after a few bad logins; each failure is also slowed per IP.
MAX_AUTH_FAILURES = 3


class State(StrEnum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


# Which state each command belongs to (RFC 1939 §4-6, RFC 2449, RFC 2595, RFC 5034);
# CAPA and QUIT are valid in both.
AUTHORIZATION_COMMANDS = frozenset({"USER", "PASS", "AUTH", "APOP", "STLS"})
TRANSACTION_COMMANDS = frozenset({"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL"})
COMMANDS = AUTHORIZATION_COMMANDS | TRANSACTION_COMMANDS | {"CAPA", "QUIT"}


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What a session needs from its listener, fixed when the connection arrives."""

    config: Config
    listener: ListenerConfig
    store: Mailboxes
    users: MailboxUsers
    locks: set[str]                 # this process's mailbox keys in TRANSACTION (pruning skips them)
    throttle: AuthThrottle          # login failures per client IP, shared likewise
    tls_context: ssl.SSLContext | None
    metrics: Metrics | None = None  # its pop3_* counters


class _Disconnected(Exception):
    """The client went away in the middle of a command."""


class _Stopped(Exception):
    """The server is shutting down: answer the command in progress and close."""


class _SlowClient(Exception):
    """The client stopped reading our replies for longer than the idle timeout."""


class POP3Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: SessionContext):
        self.ctx = ctx
        self.config = ctx.config
        self.writer = writer
        self.lines = LineReader(reader)
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        self.ip = str(peer[0]) if peer else "unknown"
        self.local_ip = str(local[0]) if local else "unknown"
        self.tls_active = writer.get_extra_info("ssl_object") is not None   # implicit TLS (RFC 8314)
        self.state = State.AUTHORIZATION
        self.task: asyncio.Task[None] | None = None
        # USER names the mailbox for a PASS that must come right after it (RFC 1939 §7):
        # any other command in between forgets it.
        self.pending_user: str | None = None
        self.user_for_pass: str | None = None
        self.lock: MailboxLock | None = None   # the maildrop lock while we hold it
        self.lock_key: str | None = None       # its mailbox key, in ctx.locks meanwhile
        self.transaction: Transaction | None = None   # from login on
        self.auth_failures = 0
        self.closing = False
        self.stopping = False
        self._waiting = False   # blocked on the client or the throttle: safe to interrupt
        self.end_reason = "Connection closed"
        self.tls_failure: str | None = None   # why a TLS handshake failed, for the disconnect line
        self.started = time.monotonic()
        # The TRANSACTION commands but NOOP are the Transaction's (self.transaction.handlers).
        self._handlers: dict[str, Callable[[str], Awaitable[bytes]]] = {
            "USER": self._user, "PASS": self._pass, "AUTH": self._auth, "APOP": self._apop,
            "STLS": self._stls, "CAPA": self._capa, "QUIT": self._quit, "NOOP": self._noop,
        }

    @property
    def idle_timeout(self) -> float:
        # RFC 1939 §3 suggests 10 minutes; the operator's limits.idle_timeout
        # (Postfix's smtpd_timeout, 300 s by default) applies to every protocol here.
        return self.config.limits.idle_timeout

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Serve the connection until QUIT, EOF, timeout, error or shutdown."""
        self.task = asyncio.current_task()
        try:
            await self._send(R.greeting(self.config.hostname))
            while not self.closing:
                reply = await self._next_reply()
                if reply is None:
                    break
                await self._send(reply)
        except (_Disconnected, ConnectionError, ssl.SSLError) as exc:
            # A client that goes away with replies pending is an everyday event: the
            # disconnect line below says so, without a traceback (issue 12).
            self.end_reason = "Connection reset by peer" if isinstance(exc, ConnectionResetError) \
                else "Connection closed"
        except _SlowClient:
            self.end_reason = "Client stopped reading"
            self.writer.transport.abort()
        except asyncio.CancelledError:
            self.end_reason = "Aborted"
            raise
        except Exception:
            # One session's failure must not take the daemon down: log it, tell the
            # client if we still can, close this connection only.
            log.exception("pop3: session from %s failed", self.ip)
            self.end_reason = "Internal error"
            with contextlib.suppress(Exception):   # the transport may be gone already
                self.writer.write(R.INTERNAL_ERROR)
        finally:
            await self._release_lock()
            self._log_disconnect()
            await self._close()

    async def _next_reply(self) -> bytes | None:
        """Read one command and work out its reply; None when the client has gone."""
        try:
            line = await self._read(COMMAND_LINE_LIMIT)
            if line is None:
                return None
            return await self._command(line)
        except TimeoutError:
            # RFC 1939 §3 autologout. Nothing marked is deleted: this is not QUIT.
            self.closing, self.end_reason = True, "Inactivity"
            return R.IDLE_TIMEOUT
        except _Stopped:
            self.closing, self.end_reason = True, "Server shutting down"
            return R.SHUTTING_DOWN

    def stop(self) -> None:
        """Server shutdown: end the session after the command in progress, if any.

        A session waiting for the client is interrupted at once. Nothing marked for
        deletion is deleted, as no QUIT was given (RFC 1939 §6)."""
        if self.stopping:
            return
        self.stopping = True
        if self._waiting and self.task is not None and not self.task.done():
            self.task.cancel(msg="pop3 shutdown")

    def abort(self) -> None:
        """Shutdown grace is over: drop the connection whatever it was doing."""
        self.stopping = True
        self.writer.transport.abort()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def _close(self) -> None:
        self.writer.close()
        try:
            # A client that does not read can keep close() from completing: bound the wait.
            async with asyncio.timeout(min(self.idle_timeout, 5.0)):
                await self.writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):   # OSError covers ConnectionError
            self.writer.transport.abort()

    async def _release_lock(self) -> None:
        lock, self.lock = self.lock, None
        if self.lock_key is not None:
            self.ctx.locks.discard(self.lock_key)
            self.lock_key = None
        if lock is not None:
            try:
                await lock.release()
            except Exception as exc:   # PostgreSQL drops the lock with its connection anyway
                log.warning("pop3: releasing a maildrop lock: %s", exc)

    # ------------------------------------------------------------------ I/O
    async def _send(self, data: bytes) -> None:
        if self.writer.transport.is_closing():
            # The client is gone (a reset with pipelined commands still buffered): uvloop's
            # write() would raise "RuntimeError: ... the handler is closed".
            raise _Disconnected
        self.writer.write(data)
        try:
            async with asyncio.timeout(self.idle_timeout):
                await self.writer.drain()
        except TimeoutError:
            raise _SlowClient from None

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[None]:
        """Around awaits that depend on the client: shutdown interrupts them (_Stopped)."""
        if self.stopping:
            raise _Stopped
        self._waiting = True
        try:
            yield
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.stopping and task is not None and task.uncancel() == 0:
                raise _Stopped from None   # our own stop(): an orderly end
            raise
        finally:
            self._waiting = False

    async def _read(self, limit: int) -> bytes | TooLong | None:
        """The next line from the client; TimeoutError after the idle timeout."""
        with self._interruptible():
            async with asyncio.timeout(self.idle_timeout):
                return await self.lines.next(limit)

    # ------------------------------------------------------------------ dispatch
    async def _command(self, line: bytes | TooLong) -> bytes:
        self.user_for_pass, self.pending_user = self.pending_user, None
        if isinstance(line, TooLong):
            return R.LINE_TOO_LONG
        if b"\x00" in line:
            return R.NUL_IN_COMMAND
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return R.NOT_UTF8
        word, _, arg = text.partition(" ")
        # isascii first: str.upper() maps some non-ASCII letters onto ASCII ("ſ" → "S").
        keyword = word.upper() if word.isascii() else ""
        if keyword not in COMMANDS:
            return R.UNKNOWN_COMMAND
        if keyword in AUTHORIZATION_COMMANDS and self.state is not State.AUTHORIZATION:
            return R.err(f"{keyword} is not valid after login")
        if keyword in TRANSACTION_COMMANDS and self.state is not State.TRANSACTION:
            return R.err(f"{keyword} is not valid before login")
        handler = self._handlers.get(keyword)
        if handler is None:
            assert self.transaction is not None   # in TRANSACTION, checked above
            handler = self.transaction.handlers[keyword]
        try:
            return await handler(arg)
        except Refused as refused:
            return refused.reply

    # ------------------------------------------------------------------ AUTHORIZATION
    def _plaintext_allowed(self) -> bool:
        return self.tls_active or self.ctx.listener.allow_insecure_auth

    def _stls_available(self) -> bool:
        return self.ctx.tls_context is not None and not self.tls_active and self.state is State.AUTHORIZATION

    def _require_plaintext_allowed(self) -> None:
        # Dovecot's disable_plaintext_auth: no password in clear unless the operator said so.
        if not self._plaintext_allowed():
            raise Refused(R.PLAINTEXT_NEEDS_STLS if self._stls_available() else R.PLAINTEXT_NEEDS_TLS)

    async def _user(self, arg: str) -> bytes:
        self._require_plaintext_allowed()
        if not arg.strip():
            return R.MISSING_USER_NAME
        # Always accepted: -ERR for unknown names would tell a guesser which exist
        # (RFC 1939 §13). PASS decides.
        self.pending_user = arg
        return R.USER_ACCEPTED

    async def _pass(self, arg: str) -> bytes:
        self._require_plaintext_allowed()
        if self.user_for_pass is None:
            return R.PASS_WITHOUT_USER
        if not arg:
            return R.MISSING_PASSWORD
        # RFC 1939 §7: PASS has one argument, so spaces belong to the password.
        return await self._login(self.user_for_pass, arg, "USER")

    async def _apop(self, arg: str) -> bytes:
        return R.APOP_UNSUPPORTED

    async def _auth(self, arg: str) -> bytes:
        mechanism, _, initial = arg.strip().partition(" ")
        if not mechanism:
            return R.AUTH_SYNTAX
        if mechanism.upper() != "PLAIN":
            return R.AUTH_UNSUPPORTED
        self._require_plaintext_allowed()
        if not initial:
            initial = await self._auth_response()
        try:
            # "=" is the empty initial response (RFC 5034 §4); PLAIN has no use for it.
            decoded = b"" if initial == "=" else b64decode(initial, validate=True)
        except (binascii.Error, ValueError):
            return R.AUTH_BAD_BASE64
        parts = decoded.split(b"\x00")
        if len(parts) != 3:
            return R.AUTH_BAD_PLAIN
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            return R.AUTH_BAD_PLAIN
        if not authcid or (authzid and mailbox_key(authzid) != mailbox_key(authcid)):
            # RFC 4616 §2: acting as another user would need proxy rights nobody has here.
            return self._login_failed(authcid or authzid, "PLAIN")
        return await self._login(authcid, password, "PLAIN")

    async def _auth_response(self) -> str:
        """RFC 5034 §4: an empty challenge, then the client's response on a line of its own."""
        await self._send(R.AUTH_CONTINUE)
        line = await self._read(AUTH_RESPONSE_LIMIT)
        if line is None:
            raise _Disconnected
        if isinstance(line, TooLong):
            raise Refused(R.AUTH_RESPONSE_TOO_LONG)
        if line == b"*":
            raise Refused(R.AUTH_CANCELLED)
        try:
            return line.decode("ascii")
        except UnicodeDecodeError:
            raise Refused(R.AUTH_BAD_BASE64) from None

    async def _login(self, user: str, password: str, method: str) -> bytes:
        delay = self.ctx.throttle.delay(self.ip)
        if delay:
            with self._interruptible():
                await asyncio.sleep(delay)
        try:
            self.ctx.users.refresh()   # on the loop: it may report to Health
            # scrypt is deliberately slow: keep it off the event loop.
            ok = await asyncio.to_thread(self.ctx.users.check_password, user, password)
        except UsersFileUnavailable as exc:
            # RFC 3206 [SYS/TEMP]: the passwords cannot be checked now. Not a failed
            # login: the client must not take a right password for a wrong one.
            log.warning("pop3-login: Temporary authentication failure: user=<%s>, method=%s, %s (%s)",
                        printable(user), method, self._where(), exc)
            return R.TEMP_AUTH_FAILURE
        if not ok:
            return self._login_failed(user, method)
        self.ctx.throttle.succeeded(self.ip)
        key = mailbox_key(user)
        # RFC 1939 §8: one session per maildrop, on every node sharing the store
        # (Mailboxes.lock). Checked after the password, so [IN-USE] tells nothing to
        # someone who does not know it (RFC 2449 §8.1.1).
        try:
            held = await self.ctx.store.lock(user)
        except StoreError as exc:
            log.warning("pop3(%s): cannot lock the maildrop: %s", printable(user), exc)
            return R.MAILDROP_UNAVAILABLE
        if held is None:
            log.info("pop3-login: Login refused, mailbox in use: user=<%s>, method=%s, %s",
                     printable(user), method, self._where())
            self._count_login("in_use")
            return R.IN_USE
        self.lock, self.lock_key = held, key
        self.ctx.locks.add(key)
        try:
            messages = await self.ctx.store.messages(user)
        except Exception:  # a store failure fails this login, not the daemon
            log.exception("pop3(%s): cannot read the maildrop", printable(user))
            await self._release_lock()
            return R.MAILDROP_UNAVAILABLE
        self.transaction = Transaction(user, messages, self.ctx.store, self.ctx.listener.name, self.ctx.metrics)
        self.state = State.TRANSACTION
        count, octets = self.transaction.maildrop.totals()
        log.info("pop3-login: Login: user=<%s>, method=%s, %s", printable(user), method, self._where())
        self._count_login("ok")
        return R.ok(f"{printable(user)} has {plural(count, 'message')} ({octets} octets)")

    def _count_login(self, result: str) -> None:
        if self.ctx.metrics is not None:
            self.ctx.metrics.pop3_login(self.ctx.listener.name, result)

    def _login_failed(self, user: str, method: str) -> bytes:
        self.ctx.throttle.failed(self.ip)
        self._count_login("failed")
        self.auth_failures += 1
        # The name as given, never the password (Dovecot logs the same fields).
        log.warning("pop3-login: Authentication failed: user=<%s>, method=%s, %s",
                    printable(user), method, self._where())
        if self.auth_failures >= MAX_AUTH_FAILURES:
            self.closing, self.end_reason = True, "Too many authentication failures"
            return R.AUTH_FAILED_CLOSING
        return R.AUTH_FAILED

    async def _stls(self, arg: str) -> bytes:
        no_args("STLS", arg)
        if self.tls_active:
            return R.TLS_ALREADY_ACTIVE
        if self.ctx.tls_context is None:
            return R.TLS_NOT_AVAILABLE
        await self._send(R.BEGIN_TLS)
        # Nothing the client sent before the handshake may count as a command.
        self.lines.discard_buffered()
        await self._start_tls()
        return b""   # the +OK above was this command's reply

    async def _start_tls(self) -> None:
        """The STLS handshake. A client that abandons it gets no reply and one log
        line: the disconnect line, which says why, as Dovecot's does ("TLS handshaking: ...")."""
        assert self.ctx.tls_context is not None
        try:
            await self.writer.start_tls(self.ctx.tls_context, ssl_handshake_timeout=self.idle_timeout)
        except HANDSHAKE_ERRORS as exc:
            self.tls_failure = handshake_error(exc)
            raise _Disconnected from None
        self.tls_active = True

    # ------------------------------------------------------------------ any state
    async def _capa(self, arg: str) -> bytes:
        no_args("CAPA", arg)
        # RFC 2449 §5: what is available in AUTHORIZATION is announced in both states;
        # STLS only where it can be used (RFC 2595 §4: AUTHORIZATION, TLS not yet active).
        caps = ["TOP", "UIDL"]
        if self._plaintext_allowed():
            caps += ["USER", "SASL PLAIN"]
        caps += ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._stls_available():
            caps.append("STLS")
        caps.append("IMPLEMENTATION mta")
        return R.multiline("Capability list follows", caps)

    async def _quit(self, arg: str) -> bytes:
        no_args("QUIT", arg)
        self.closing = True
        if self.state is State.AUTHORIZATION:
            self.end_reason = "Logged out"
            return R.signing_off(self.config.hostname)
        assert self.transaction is not None
        # RFC 1939 §6: UPDATE removes the marked messages (one commit), then the lock goes.
        self.state = State.UPDATE
        deleted = await self.transaction.update()
        if deleted is None:
            self.end_reason = "Logout failed"
            return R.DELETE_FAILED
        self.end_reason = "Logged out"
        return R.signing_off(self.config.hostname, deleted)

    # ------------------------------------------------------------------ TRANSACTION
    # The other commands of this state are the Transaction's.
    async def _noop(self, arg: str) -> bytes:
        no_args("NOOP", arg)
        return R.NOOP

    # ------------------------------------------------------------------ logging
    def _where(self) -> str:
        return f"rip={self.ip}, lip={self.local_ip}" + (", TLS" if self.tls_active else "")

    def _log_disconnect(self) -> None:
        secs = int(time.monotonic() - self.started)
        t = self.transaction
        if t is None:
            attempts = (f"auth failed, {plural(self.auth_failures, 'attempt')}" if self.auth_failures
                        else "no auth attempts")
            tls = f", TLS handshaking: {self.tls_failure}" if self.tls_failure else ""
            log.info("pop3-login: Disconnected (%s in %d secs): %s%s", attempts, secs, self._where(), tls)
            return
        # Dovecot's pop3_logout_format spelled out: top=count/octets, retrieved=count/octets,
        # deleted=count/messages at login, size=octets at login.
        log.info("pop3(%s): Disconnected: %s %s, top=%d/%d, retrieved=%d/%d, deleted=%d/%d, size=%d",
                 printable(t.user), self.end_reason, self._where(), *t.topped, *t.retrieved,
                 t.deleted, len(t.maildrop.messages), sum(m.size for m in t.maildrop.messages))
