"""aiosmtpd handler hooks: policy at MAIL/RCPT, commit-then-250 at DATA, AUTH.

One handler per listener. Decisions come from :mod:`mta.inbound.policy`; the
only I/O is the queue commit (and the scrypt check of AUTH, done in a thread).
"""

from __future__ import annotations

import asyncio
import binascii
import dataclasses
import logging
import time
from base64 import b64decode
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import MISSING, AuthResult

from mta.config import Config, ListenerConfig
from mta.errors import StoreError
from mta.inbound import policy
from mta.inbound.chaos import Chaos
from mta.inbound.envelope import InboundEnvelope, InboundSession
from mta.inbound.peername import PeerNames
from mta.inbound.policy import REPLIES
from mta.inbound.session import InboundSMTP
from mta.mailbox.users import MailboxUsers
from mta.model import NewMessage, Recipient, Reply, normalize_line_ends
from mta.passwords import AuthThrottle, UsersFile, UsersFileUnavailable
from mta.store.api import Queue, new_queue_id

log = logging.getLogger("mta.smtpd")
# The line that takes a message into the queue, under the name of Postfix's daemon for
# that step (cleanup): log parsers count sizes from it, and smtpd lines for clients.
queue_log = logging.getLogger("mta.cleanup")


class InboundHandler:
    """The hooks aiosmtpd calls for one listener, and what InboundSMTP asks of its
    handler (mta.inbound.session.SessionHandler)."""

    def __dir__(self) -> list[str]:
        # aiosmtpd scans dir(handler) for handle_* and auth_* on every connection
        # (see InboundSMTP.__dir__): only those names matter to it.
        return [n for n in type(self).__dict__ if n.startswith(("handle_", "auth_"))]

    def __init__(self, config: Config, listener: ListenerConfig, store: Queue,
                 users: UsersFile | None = None, throttle: AuthThrottle | None = None,
                 on_received: Callable[[str], None] | None = None,
                 on_rejected: Callable[[str, int], None] | None = None,
                 mailbox_users: MailboxUsers | None = None, peer_names: PeerNames | None = None,
                 chaos: Chaos | None = None, on_chaos: Callable[[str, str], None] | None = None):
        self.config = config
        # Fault injection (mta/inbound/chaos.py): one Chaos for the whole daemon.
        self.chaos = chaos or Chaos()
        self.on_chaos = on_chaos or (lambda listener, trigger: None)   # mta_chaos_triggered_total
        self.peer_names = peer_names or PeerNames()
        self.mailbox_users = mailbox_users
        self.listener = listener
        self.store = store
        self.users = users
        self.throttle = throttle or AuthThrottle()
        self.on_received = on_received or (lambda listener: None)
        self.on_rejected = on_rejected or (lambda listener, code: None)

    # ------------------------------------------------------------------ helpers
    def _client_ip(self, session: InboundSession) -> str:
        peer = session.peer
        return str(peer[0]) if isinstance(peer, tuple) else str(peer)

    async def _client(self, session: InboundSession) -> str:
        """``name[ip]`` as Postfix logs a client: the verified reverse-DNS name, or unknown."""
        ip = self._client_ip(session)
        return f"{await self.peer_names.name(ip)}[{ip}]"

    async def log_reject(self, session: InboundSession, envelope: InboundEnvelope, stage: str, reply: object,
                          sender: str | None = None, recipient: str | None = None,
                          level: int = logging.INFO) -> None:
        """Postfix's reject line, which log parsers (pflogsumm) count:
        ``NOQUEUE: reject: RCPT from name[ip]: 554 5.7.1 <x@remote>: Relay access denied;
        from=<a@b> to=<x@remote> proto=ESMTP helo=<client>``."""
        sender = envelope.mail_from if sender is None else sender
        to = f" to=<{recipient}>" if recipient is not None else ""
        log.log(level, "NOQUEUE: reject: %s from %s: %s; from=<%s>%s proto=%s helo=<%s>", stage,
                await self._client(session), reply, "" if sender in (None, "<>") else sender, to,
                "ESMTP" if session.extended_smtp else "SMTP", session.host_name or "")

    def trusted(self, session: InboundSession) -> bool:
        return bool(session.authenticated) or self.config.in_mynetworks(self._client_ip(session))

    def connected(self, ip: str) -> None:
        self.peer_names.prefetch(ip)

    def offers_dsn(self, session: InboundSession) -> bool:
        """DSN in the EHLO reply (dsn.offer_to_untrusted): to trusted clients always, and on a
        listener with AUTH too, where the client may still authenticate before MAIL."""
        return self.config.dsn.offer_to_untrusted or self.trusted(session) or self.users is not None

    def honours_dsn(self, session: InboundSession) -> bool:
        """RFC 3461 parameters on MAIL/RCPT: refused (555, as an unknown parameter)
        for an untrusted client when dsn.offer_to_untrusted is false."""
        return self.config.dsn.offer_to_untrusted or self.trusted(session)

    def _refuse(self, reply: Any) -> str:
        return str(reply)

    def _chaos(self, trigger: str) -> Reply | None:
        """The refusal of a chaos trigger that fires now (counted), else None."""
        reply = self.chaos.fire(trigger)
        if reply is not None:
            self.on_chaos(self.listener.name, trigger.lower())
        return reply

    def note_reply(self, code: int) -> None:
        """Every 4xx/5xx the session sends, ours or aiosmtpd's, counts as a rejection."""
        self.on_rejected(self.listener.name, code)

    # ------------------------------------------------------------------ hooks
    async def handle_MAIL(self, server: InboundSMTP, session: InboundSession, envelope: InboundEnvelope,
                          address: str, mail_options: list[str]) -> str:
        if (damaged := self.store.damaged) is not None:
            # The queue file is known to be damaged: this transaction cannot end in a 250, so
            # say so before the client sends the message. Postfix's smtpd likewise asks for a
            # queue file at MAIL FROM and answers 451 4.3.0 when it cannot have one.
            await self.log_reject(session, envelope, "MAIL", REPLIES["store_failed"], address,
                                   level=logging.WARNING)
            log.warning("queue %s", damaged)
            return self._refuse(REPLIES["store_failed"])
        if (chaos := self._chaos("Sender")) is not None:
            await self.log_reject(session, envelope, "MAIL", chaos, address)
            return str(chaos)
        # aiosmtpd hands the null reverse-path over as "<>" and keeps it so
        # (an empty mail_from would read as "no MAIL yet"); it is "" in the queue.
        refusal = policy.check_sender("" if address == "<>" else address, smtputf8=envelope.smtp_utf8)
        if refusal is not None:
            await self.log_reject(session, envelope, "MAIL", refusal, address)
            return self._refuse(refusal)
        if address != "<>" and "@" not in address:
            address = f"{address}@{self.config.hostname}"  # Postfix's append_at_myorigin (see check_sender)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.mail_dsn = server.pending_dsn
        return str(REPLIES["sender_ok"])

    async def handle_RCPT(self, server: InboundSMTP, session: InboundSession, envelope: InboundEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if (chaos := self._chaos("Recipient")) is not None:
            await self.log_reject(session, envelope, "RCPT", chaos, recipient=address)
            return str(chaos)
        if len(envelope.rcpt_tos) >= self.config.limits.max_recipients:
            return self._refuse(REPLIES["too_many_rcpts"])
        users = self.mailbox_users
        postmaster = self.config.postmaster_for(address)
        if postmaster is not None:
            # RFC 5321 §4.5.1: <Postmaster> and postmaster@ each of our domains are always
            # accepted, from anyone; the mail goes to the configured postmaster address,
            # and X-Original-To (ORCPT) keeps the address the client gave.
            dsn = server.pending_dsn
            if dsn.orcpt is None:
                dsn = dataclasses.replace(dsn, orcpt=f"rfc822;{address}")
            envelope.add_recipient(postmaster, rcpt_options, dsn)
            return str(REPLIES["rcpt_ok"])
        # Anyone may send to a local domain, as to a relay domain (Postfix: mydestination).
        refusal = policy.check_recipient(address, trusted=self.trusted(session),
                                         relay_domains=self.config.relay_domains + self.config.local_domains
                                         + self.config.mydestination,
                                         smtputf8=envelope.smtp_utf8)
        try:
            unknown_local = refusal is None and users is not None and users.is_local(address) \
                and not users.exists(address)
        except UsersFileUnavailable as exc:
            # Postfix's answer when local_recipient_maps cannot be read: the client keeps
            # the message and tries again; a 550 would bounce it for good.
            reply = f"451 4.3.0 <{address}>: Temporary lookup failure"
            log.warning("%s: %s", address, exc)
            await self.log_reject(session, envelope, "RCPT", reply, recipient=address, level=logging.WARNING)
            return reply
        if unknown_local:
            unknown = REPLIES["unknown_user"]
            reply = f"{unknown.code} {unknown.enhanced} <{address}>: {unknown.text}"
            await self.log_reject(session, envelope, "RCPT", reply, recipient=address)
            return reply
        if refusal is not None:
            refused: Reply | str = refusal
            if refusal == REPLIES["relay_denied"]:   # Postfix names the address: "<x@remote>: Relay access denied"
                refused = f"{refusal.code} {refusal.enhanced} <{address}>: {refusal.text}"
            await self.log_reject(session, envelope, "RCPT", refused, recipient=address)
            return self._refuse(refused)
        envelope.add_recipient(address, rcpt_options, server.pending_dsn)
        return str(REPLIES["rcpt_ok"])

    async def handle_DATA(self, server: InboundSMTP, session: InboundSession, envelope: InboundEnvelope) -> str:
        now = time.time()
        data = normalize_line_ends(envelope.original_content or b"")
        refusal = REPLIES["nul_in_data"] if b"\x00" in data else None
        facts = policy.inspect_headers(data)
        if refusal is None and facts.received_count > self.config.limits.max_hops:
            refusal = REPLIES["too_many_hops"]
        if refusal is not None:
            # Postfix logs a refusal at the end of DATA as END-OF-MESSAGE.
            await self.log_reject(session, envelope, "END-OF-MESSAGE", refusal,
                                   recipient=envelope.rcpt_tos[0] if envelope.rcpt_tos else None)
            return self._refuse(refusal)
        queue_id = new_queue_id()
        if self.listener.mode == "submission":
            # An MSA completes what the author's program left out (RFC 6409 §8.2, §8.3).
            missing = []
            if not facts.has_message_id:
                missing.append(policy.message_id_header(queue_id, self.config.hostname, now))
            if not facts.has_date:
                missing.append(policy.date_header(now))
            data = policy.add_headers(data, facts, missing)
        client_ip = self._client_ip(session)
        client_name = await self.peer_names.name(client_ip)
        protocol = policy.protocol_name(bool(session.extended_smtp), session.ssl is not None,
                                        bool(session.authenticated), bool(envelope.smtp_utf8))
        received = policy.received_header(
            helo=session.host_name or "", client_ip=client_ip, client_name=client_name,
            hostname=self.config.hostname,
            listener=self.listener.name, protocol=protocol, queue_id=queue_id,
            recipients=list(envelope.rcpt_tos), now=now)
        data = received + data
        auth_user = session.auth_data if isinstance(session.auth_data, str) else None
        mail_dsn = envelope.mail_dsn
        message = NewMessage(
            id=queue_id, sender="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            recipients=tuple(Recipient(address=r, notify=d.notify, orcpt=d.orcpt)
                             for r, d in zip(envelope.rcpt_tos, envelope.rcpt_dsn, strict=True)),
            ret=mail_dsn.ret, envid=mail_dsn.envid,
            data=data, arrival=now, client=client_ip, listener=self.listener.name,
            helo=session.host_name or "", auth_user=auth_user, smtputf8=bool(envelope.smtp_utf8),
            body_8bit="BODY=8BITMIME" in envelope.mail_options,
        )
        try:
            await self.store.enqueue(message)
        except StoreError as exc:
            reply = REPLIES["disk_full"] if exc.disk_full else REPLIES["store_failed"]
            log.error("%s: reject: queue write failed for message from %s[%s]: %s", queue_id,
                      client_name, client_ip, exc)
            return self._refuse(reply)
        sasl = ""
        if auth_user:
            sasl = f", sasl_method={session.sasl_method or 'PLAIN'}, sasl_username={auth_user}"
        log.info("%s: client=%s[%s]%s, listener=%s", queue_id, client_name, client_ip, sasl, self.listener.name)
        queue_log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", queue_id, message.sender, len(data),
                       len(message.recipients))
        self.on_received(self.listener.name)
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer "500 Error: (...)": a local fault is temporary
        # for the client, which keeps the message and retries (RFC 5321 §4.2.1).
        log.exception("SMTP session error: %s", error)
        return str(REPLIES["local_error"])

    # ------------------------------------------------------------------ AUTH (RFC 4954)
    async def handle_AUTH(self, server: InboundSMTP, session: InboundSession, envelope: InboundEnvelope,
                          args: list[str]) -> Any:
        """aiosmtpd asks this once the mechanism is known to be offered, before the
        exchange: where Mailpit's Authentication trigger answers. MISSING lets the
        mechanism's auth_* method run."""
        chaos = self._chaos("Authentication")
        if chaos is None:
            return MISSING
        # Not the "SASL ... authentication failed" warning: no credentials were checked, and
        # fail2ban's postfix-sasl filter would ban a lab's client for faults it asked for.
        log.info("NOQUEUE: reject: AUTH from %s: %s; sasl_method=%s proto=ESMTP helo=<%s>",
                 await self._client(session), chaos, args[0], session.host_name or "")
        return str(chaos)

    async def auth_PLAIN(self, server: InboundSMTP, args: list[str]) -> AuthResult:
        if len(args) > 1:
            blob: Any = _b64(args[1])
        else:
            blob = await server.challenge_auth("")
        if blob is MISSING:
            return AuthResult(success=False, handled=True)
        if blob is None:
            await server.push("501 5.5.2 Cannot decode base64")
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Cannot decode AUTH PLAIN response")
            return AuthResult(success=False, handled=True)
        return await self._check(server, parts[1], parts[2], "PLAIN")

    async def auth_LOGIN(self, server: InboundSMTP, args: list[str]) -> AuthResult:
        if len(args) > 1:
            user: Any = _b64(args[1])
            if user is None:
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        else:
            user = await server.challenge_auth("Username:")
            if user is MISSING:
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check(server, user, password, "LOGIN")

    async def _check(self, server: InboundSMTP, user_b: bytes, password_b: bytes, method: str) -> AuthResult:
        session = server.session
        assert session is not None
        ip = self._client_ip(session)
        delay = self.throttle.delay(ip)
        if delay:
            await asyncio.sleep(delay)
        user = user_b.decode("utf-8", "replace")
        password = password_b.decode("utf-8", "surrogateescape")
        ok = False
        # No NUL in a password either (RFC 4616 §2): HMAC pads short keys with zero
        # bytes, so scrypt would take "secret\0" for "secret".
        if self.users is not None and not any(c in user for c in "\r\n\x00") and "\x00" not in password:
            try:
                self.users.refresh()   # on the loop: it may report to Health
                # scrypt is deliberately slow: keep it off the event loop.
                ok = await asyncio.to_thread(self.users.check, user, password)
            except UsersFileUnavailable as exc:
                # RFC 4954 §6: 454 4.7.0 when the server cannot check the credentials
                # now; 535 would tell a right password that it is wrong.
                log.warning("%s: SASL %s authentication unavailable: %s, sasl_username=%s",
                            await self._client(session), method, exc, _printable(user))
                return AuthResult(success=False, handled=False, message="454 4.7.0 Temporary authentication failure")
        if ok:
            self.throttle.succeeded(ip)
            session.sasl_method = method   # for the message's client= line (Postfix's sasl_method=)
            log.info("client=%s, sasl_method=%s, sasl_username=%s", await self._client(session), method, user)
            return AuthResult(success=True, auth_data=user)
        self.throttle.failed(ip)
        # Never log the password, and the user name only as given (RFC 4954 §9).
        log.warning("%s: SASL %s authentication failed: authentication failure, sasl_username=%s",
                    await self._client(session), method, _printable(user))
        return AuthResult(success=False, handled=False, message="535 5.7.8 Error: authentication failed")


def _printable(text: str) -> str:
    """A client's text for a log line: as given, or repr()'d when it holds control characters."""
    return text if text.isprintable() else repr(text)


def _b64(text: str) -> bytes | None:
    if text == "=":
        return b""
    try:
        return b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        return None
