"""Local delivery: a copy of the message for each local recipient's mailbox.

Postfix's local(8) for lab domains, as a courier (mta.queue.courier): the
queue manager asks it first whether it takes a recipient, and hands it the
jobs of LOCAL_DESTINATION. Nothing here does I/O: it decides each
recipient's outcome and puts the copy on the outcome; the queue manager
stores the copies in the same commit that marks the recipients delivered,
so a crash can neither lose a delivered message nor store it twice.
"""

from __future__ import annotations

import asyncio
import email.errors
import email.header
import re
import time
from dataclasses import replace

from mta.inbox.summary import summarize
from mta.mailbox.users import MailboxUsers
from mta.message import header_section
from mta.model import LOCAL_RELAY, MailboxCopy, Outcome, Reply, normalize_line_ends
from mta.passwords import UsersFileUnavailable
from mta.queue.courier import Delivery

LOCAL_DESTINATION = "local:mailbox"   # the queue manager's grouping key for local mail

DELIVERED = Reply(250, "2.0.0", "delivered to mailbox")
# RFC 3463 5.1.1: the mailbox does not exist (gone from the users file since the RCPT).
UNKNOWN_USER = Reply(550, "5.1.1", "unknown user: no such mailbox")
THREAD_ABOVE = 256 * 1024   # bytes of message from which summarising runs in a thread

_SUBJECT = re.compile(rb"^subject:[ \t]*(.*(?:\r\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


class LocalCourier:
    """mta.queue.courier.Courier for the lab mailboxes (local_domains, mydestination, postmaster)."""

    def __init__(self, users: MailboxUsers, max_messages: int = 10_000):
        self.users = users                 # replaced on reload
        self.max_messages = max_messages   # mailboxes.max_messages: each mailbox keeps its newest

    def destination(self, recipient: str) -> str | None:
        return LOCAL_DESTINATION if self.users.is_local(recipient) else None

    async def deliver(self, delivery: Delivery) -> list[Outcome]:
        started = time.monotonic()
        body = normalize_line_ends(delivery.data)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        subject = subject_of(body)
        # Parsed once per message for the lab inbox (not per copy). About 1 ms for a
        # small message; a large one (~30 ms per MB) is parsed off the event loop.
        summary = summarize(body) if len(body) < THREAD_ABOVE else await asyncio.to_thread(summarize, body)
        outcomes: list[Outcome] = []
        for i, address in enumerate(delivery.recipients):
            try:
                known = self.users.exists(address)
            except UsersFileUnavailable as exc:
                # The users file cannot be read: whether the mailbox exists is unknown,
                # so the mail waits for the file (Postfix defers on a table lookup
                # error); a bounce here lost mail for every lab mailbox.
                outcomes.append(Outcome(address, Reply(451, "4.3.0", f"temporary lookup failure: {exc}"),
                                        LOCAL_RELAY))
                continue
            if not known:
                outcomes.append(Outcome(address, UNKNOWN_USER, LOCAL_RELAY))
                continue
            orcpt = delivery.orcpt[i] if i < len(delivery.orcpt) else None
            copy = MailboxCopy(address, delivery.message_id, delivery.sender, subject,
                               delivery_headers(delivery.sender, address, orcpt) + body, delivery.arrival,
                               self.max_messages, summary)
            outcomes.append(Outcome(address, DELIVERED, LOCAL_RELAY, mailbox_copy=copy))
        took = time.monotonic() - started   # delays= d: the time it took to make the copies
        return [replace(o, transmission=took) for o in outcomes]


def delivery_headers(sender: str, recipient: str, orcpt: str | None) -> bytes:
    """The trace fields final delivery adds at the top, in Postfix local(8)'s order.

    RFC 5321 §4.4: the final delivery MTA inserts Return-Path with the reverse-path
    (<> for a bounce). Delivered-To and X-Original-To are Postfix's: the
    recipient as delivered, and as first given (RFC 3461 ORCPT when there is one).
    """
    original = recipient
    if orcpt and orcpt.lower().startswith("rfc822;"):
        original = orcpt[7:]
    lines = [f"Return-Path: <{sender}>", f"X-Original-To: {original}", f"Delivered-To: {recipient}"]
    return "".join(_header_safe(line) + "\r\n" for line in lines).encode("utf-8", "surrogateescape")


def _header_safe(line: str) -> str:
    # Addresses were checked at RCPT, but a header line must never carry a line break.
    return re.sub(r"[\r\n\x00]", "", line)


def subject_of(data: bytes) -> str:
    """The Subject of the header section, RFC 2047 words decoded, for `mta mailbox list`."""
    m = _SUBJECT.search(header_section(data))
    if not m:
        return ""
    raw = re.sub(rb"\r\n[ \t]", b" ", m.group(1)).decode("utf-8", "replace")
    try:
        text = str(email.header.make_header(email.header.decode_header(raw)))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        text = raw
    return text.replace("\x00", "\ufffd").strip()[:200]   # a decoded =00 (see inbox/summary.py)
