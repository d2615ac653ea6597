"""Local delivery: a copy of the message for each local recipient's mailbox.

Postfix's local(8) for lab domains. Nothing here does I/O: it decides each
recipient's outcome and builds the copies; the queue manager stores them in
the same commit that marks the recipients delivered, so a crash can neither
lose a delivered message nor store it twice.
"""

from __future__ import annotations

import email.errors
import email.header
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mta.mailbox.store import MailboxCopy
from mta.mailbox.users import MailboxUsers
from mta.message import header_section
from mta.model import LOCAL_RELAY, Outcome, Reply, normalize_line_ends
from mta.passwords import UsersFileUnavailable

LOCAL_DESTINATION = "local:mailbox"   # the queue manager's grouping key for local mail

DELIVERED = Reply(250, "2.0.0", "delivered to mailbox")
# RFC 3463 5.1.1: the mailbox does not exist (gone from the users file since the RCPT).
UNKNOWN_USER = Reply(550, "5.1.1", "unknown user: no such mailbox")

_SUBJECT = re.compile(rb"^subject:[ \t]*(.*(?:\r\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class LocalRecipient:
    address: str
    orcpt: str | None = None


class LocalDelivery:
    def __init__(self, users: MailboxUsers):
        self.users = users

    def handles(self, address: str) -> bool:
        return self.users.is_local(address)

    def deliver(self, queue_id: str, sender: str, recipients: Sequence[LocalRecipient], data: bytes,
                arrival: float) -> tuple[list[MailboxCopy], list[Outcome]]:
        body = normalize_line_ends(data)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        subject = subject_of(body)
        copies: list[MailboxCopy] = []
        outcomes: list[Outcome] = []
        for rcpt in recipients:
            try:
                known = self.users.exists(rcpt.address)
            except UsersFileUnavailable as exc:
                # The users file cannot be read: whether the mailbox exists is unknown,
                # so the mail waits for the file (Postfix defers on a table lookup
                # error); a bounce here lost mail for every lab mailbox.
                outcomes.append(Outcome(rcpt.address, Reply(451, "4.3.0", f"temporary lookup failure: {exc}"),
                                        LOCAL_RELAY))
                continue
            if not known:
                outcomes.append(Outcome(rcpt.address, UNKNOWN_USER, LOCAL_RELAY))
                continue
            copies.append(MailboxCopy(rcpt.address, queue_id, sender, subject,
                                      delivery_headers(sender, rcpt.address, rcpt.orcpt) + body, arrival))
            outcomes.append(Outcome(rcpt.address, DELIVERED, LOCAL_RELAY))
        return copies, outcomes


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
    return text.strip()[:200]
