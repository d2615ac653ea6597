"""Domain types shared by inbound, queue and delivery. Pure: no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from mta.inbox.model import InboxSummary


class RcptState(StrEnum):
    QUEUED = "queued"        # due for a first attempt
    ACTIVE = "active"        # handed to a delivery worker (made due again after a crash)
    DEFERRED = "deferred"    # waiting for its next attempt time
    DELIVERED = "delivered"
    BOUNCED = "bounced"      # failed for good
    HELD = "held"            # operator hold: never delivered or expired



_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code, enhanced status code (RFC 3463) and text."""

    code: int
    enhanced: str
    text: str

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ").strip()

    @classmethod
    def parse(cls, line: str) -> Reply:
        """Parse '550 5.1.1 No such user' (enhanced code optional) into a Reply."""
        code_text, _, rest = line.strip().partition(" ")
        code = int(code_text[:3]) if code_text[:3].isdigit() else 0
        first, _, text = rest.partition(" ")
        if _ENHANCED.match(first):
            return cls(code, first, text)
        return cls(code, default_enhanced(code), rest)


def default_enhanced(code: int) -> str:
    """A generic enhanced code for a reply that came without one (RFC 3463 §3.1)."""
    return f"{code // 100}.0.0" if code >= 200 else "4.0.0"


LOCAL_RELAY = "local"   # relay= of a delivery to a lab mailbox, as Postfix's local(8) logs it


@dataclass(frozen=True, slots=True)
class MailboxCopy:
    """One recipient's copy, headers added, made by local delivery for the store to keep."""

    mailbox: str
    queue_id: str
    sender: str
    subject: str
    data: bytes
    arrival: float | None = None   # the message's arrival in the queue (else now): mailboxes are in this order
    max_messages: int = 10_000     # the mailbox keeps its newest this many (mailboxes.max_messages)
    # The lab inbox's summary of the message (mta/inbox/summary.py), parsed once per
    # message by local delivery; None: the store parses the copy itself.
    summary: InboxSummary | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt did for one recipient (SMTP next hop or local mailbox)."""

    recipient: str
    reply: Reply
    relay: str   # "mx1.example.test[127.0.0.2]:2525", "local", or "none" when no session got that far
    dsn_passed: bool = False   # the next hop took our RFC 3461 parameters (it reports success itself)
    # Postfix's delays= c and d: seconds of connection set-up (DNS, connect, greeting, EHLO,
    # TLS, AUTH; 0 for a cached session) and of the transaction itself.
    setup: float = 0.0
    transmission: float = 0.0
    # Local delivery's copy for the recipient's mailbox: stored in the commit that records
    # this outcome, so a crash can neither lose a delivered message nor store it twice.
    mailbox_copy: MailboxCopy | None = None

    @property
    def delivered(self) -> bool:
        return 200 <= self.reply.code < 300


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    state: RcptState = RcptState.QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    notify: str | None = None   # RFC 3461 NOTIFY, stored as given
    orcpt: str | None = None    # RFC 3461 ORCPT


@dataclass(frozen=True, slots=True)
class NewMessage:
    """What inbound hands to the store: committed before the 250."""

    id: str
    sender: str
    recipients: tuple[Recipient, ...]
    data: bytes
    arrival: float
    client: str = ""
    listener: str = ""
    helo: str = ""
    auth_user: str | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    ret: str | None = None      # RFC 3461 RET (FULL or HDRS)
    envid: str | None = None    # RFC 3461 ENVID


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message row as read back from the store (data loaded on demand)."""

    id: str
    sender: str
    arrival: float
    size: int
    recipients: tuple[Recipient, ...] = field(default_factory=tuple)
    client: str = ""
    listener: str = ""
    smtputf8: bool = False
    body_8bit: bool = False
    ret: str | None = None
    envid: str | None = None


def domain_of(address: str) -> str:
    """The domain part of a mailbox, lower-cased ('' when there is none)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def notify_wants(notify: str | None, event: str) -> bool:
    """Whether a recipient's RFC 3461 NOTIFY asks for a DSN on ``event``
    (SUCCESS, FAILURE or DELAY). Without NOTIFY the default is FAILURE and
    DELAY (§4.1: DELAY at the MTA's discretion)."""
    if notify is None:
        return event in ("FAILURE", "DELAY")
    return event in notify.split(",")


_LINE_END = re.compile(rb"\r\n|\r|\n")


def normalize_line_ends(data: bytes) -> bytes:
    """Turn every bare LF and bare CR into CRLF (RFC 5321 §2.3.8).

    Stored and relayed mail then has one line-end convention, so no server
    reads a different end of DATA than we did (SMTP smuggling). The counts
    make the common, already-clean case a C-speed fast path.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data
    return _LINE_END.sub(b"\r\n", data)
