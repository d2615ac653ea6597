"""The storage interface: what the daemon, the queue manager, the CLI and POP3 call.

Only ``Protocol``s and plain records: no SQL, no connection and no engine
notion (WAL, fsync modes, row ids) crosses this line, so a second backend
(PostgreSQL, several nodes) implements these and nothing above changes.
Errors that cross it are :class:`mta.errors.StoreError` (``disk_full`` when
the disk is full) and :class:`mta.errors.QueueDamagedError`.

A store has three parts, opened and closed together:

* :class:`Queue`: enqueue (returns only once committed: the 250 follows),
  claim, record outcomes, give back, recover in flight, next due;
* :class:`QueueAdmin`: what ``mta queue …`` and the metrics read and change;
* :class:`Mailboxes`: the lab mailboxes POP3 and ``mta mailbox`` read. Copies
  are stored by :meth:`Queue.record_outcomes`, in the commit that marks their
  recipients delivered (neither lost nor stored twice).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncGenerator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mta.health import Health
from mta.inbox.model import InboxChange, InboxEntry, InboxPage, SearchTerm
from mta.model import MailboxCopy, NewMessage, QueuedMessage, RcptState

__all__ = [
    "QUEUE_NAMES", "AdminResult", "Claimed", "DueRecipient", "HistoryEntry", "Inbox", "MailboxCopy", "MailboxLock",
    "MailboxSummary", "Mailboxes", "MessageDetail", "MessageSummary", "Queue", "QueueAdmin", "QueueEntry", "QueueSummary",
    "RecipientUpdate", "Store", "StoredMessage", "classify_message", "mailbox_key", "new_queue_id", "uidl",
]

# --------------------------------------------------------------------------- the queue's records


@dataclass(frozen=True, slots=True)
class DueRecipient:
    """A recipient claimed for delivery, with what the delivery needs of its message."""

    message_id: str
    rcpt_no: int
    address: str
    attempts: int
    last_error: str | None
    sender: str
    arrival: float
    smtputf8: bool
    body_8bit: bool
    notify: str | None = None   # RFC 3461, per recipient
    orcpt: str | None = None
    ret: str | None = None      # RFC 3461, per message
    envid: str | None = None
    delay_warned: bool = False  # a delay DSN was sent already
    listener: str = ""          # "bounce" / "double-bounce" for reports we made ourselves


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one claim returns."""

    due: list[DueRecipient]
    bodies: dict[str, bytes]      # message id -> data, for the first claimed messages
    next_due: float | None        # when the earliest deferred recipient is due


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    time: float
    recipient: str | None
    event: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """The outcome of one delivery attempt, as written back to the recipient."""

    rcpt_no: int
    state: RcptState
    attempts: int
    next_attempt: float
    last_error: str | None


_SEQUENCE = itertools.count()


def new_queue_id() -> str:
    """A short unique id in Postfix's style: 12 hex digits, increasing with time.

    40 bits of microseconds (wrapping after ~12.7 days, far beyond any message's
    life in the queue) plus an 8-bit counter, so ids made in the same
    microsecond still differ; the store's unique key would catch the impossible rest.
    """
    micros = time.time_ns() // 1000
    return f"{micros & 0xFFFFFFFFFF:010X}{next(_SEQUENCE) & 0xFF:02X}"


# --------------------------------------------------------------------------- administration's records

# Which queue a message is in, in Postfix's names. A message is "hold" if any pending
# recipient is held, else "active" if any is queued or being delivered, else "deferred".
QUEUE_NAMES = ("active", "deferred", "hold")


def classify_message(states: Iterable[str]) -> str:
    """The queue name of a message from the states of its pending recipients."""
    found = set(states)
    if "held" in found:
        return "hold"
    if "queued" in found or "active" in found:
        return "active"
    return "deferred"


@dataclass(frozen=True, slots=True)
class QueueSummary:
    """Messages with pending recipients per queue, and the oldest one's arrival."""

    active: int = 0
    deferred: int = 0
    hold: int = 0
    oldest_arrival: float | None = None


@dataclass(slots=True)
class QueueEntry:
    """A message as `mta queue list` shows it, with its pending recipients only.

    Plain tuples for the recipients: listing 100,000 messages must not build
    100,000s of objects."""

    queue_name: str           # active | deferred | hold
    id: str
    sender: str
    arrival: float
    size: int
    # (address, state, attempts, next_attempt, last_error) per pending recipient, in RCPT order
    recipients: list[tuple[str, str, int, float, str | None]]


@dataclass(frozen=True, slots=True)
class MessageDetail:
    """Everything `mta queue show` prints about one message."""

    message: QueuedMessage                 # every recipient, in RCPT order, whatever its state
    helo: str
    auth_user: str | None
    data: bytes
    history: tuple[HistoryEntry, ...]


@dataclass(frozen=True, slots=True)
class AdminResult:
    """What an admin action found and did."""

    found: tuple[str, ...]     # the ids that named a message (unknown ones are left out)
    changed: dict[str, int]    # per found id: recipients changed (deleted, for delete)


# --------------------------------------------------------------------------- mailboxes' records


def uidl(queue_id: str, message_id: int) -> str:
    """RFC 1939 §7 UIDL: 1-70 characters in 0x21-0x7E, never reused for another
    message. The store never reuses a message id; the queue id keeps it unique even
    if the store is ever recreated and ids start again."""
    return f"{queue_id}.{message_id}"


def mailbox_key(address: str) -> str:
    """Mailboxes are looked up without regard to case (as Postfix's local(8) does)."""
    return address.lower()


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message in a mailbox, without its bytes."""

    id: int
    queue_id: str
    size: int
    received: float

    @property
    def uid(self) -> str:
        return uidl(self.queue_id, self.id)


@dataclass(frozen=True, slots=True)
class MailboxSummary:
    mailbox: str
    messages: int
    size: int
    oldest: float
    newest: float


@dataclass(frozen=True, slots=True)
class MessageSummary:
    id: int
    queue_id: str
    size: int
    received: float
    sender: str
    subject: str

    @property
    def uid(self) -> str:
        return uidl(self.queue_id, self.id)


# --------------------------------------------------------------------------- the protocols

NewMailListener = Callable[[Sequence[NewMessage]], None]


class Queue(Protocol):
    """The queue, as the inbound handler and the queue manager use it."""

    @property
    def health(self) -> Health:
        """Where the store reports its faults (a damaged file, a full disk)."""
        ...

    @property
    def damaged(self) -> str | None:
        """Why the store is known to be damaged (one line), or None. Asked at every MAIL."""
        ...

    def add_listener(self, callback: NewMailListener) -> None:
        """``callback`` is called after each commit of new messages (wakes the queue manager)."""
        ...

    def space_report(self) -> str:
        """Free space and reserve in one phrase, for health reasons and logs."""
        ...

    async def enqueue(self, message: NewMessage) -> None:
        """Store a message and its recipients; return only once durably committed.
        StoreError(disk_full=True) when it would eat into the reserve kept for the
        queue manager; QueueDamagedError while the store is known to be damaged."""
        ...

    async def recover_in_flight(self) -> int:
        """Recipients left claimed by a crash are due again; returns how many."""
        ...

    async def claim(self, now: float, limit: int, *, prefetch_bytes: int = 0) -> Claimed:
        """Mark up to ``limit`` due recipients as being delivered and return them, fresh
        mail first, with the bodies of the first messages (up to ``prefetch_bytes``) and
        the next due time, in one round trip."""
        ...

    async def record_outcomes(self, message_id: str, updates: Sequence[RecipientUpdate], now: float,
                              *, history: Sequence[HistoryEntry] = (), new_messages: Sequence[NewMessage] = (),
                              delay_warned: bool = False, mailbox_copies: Sequence[MailboxCopy] = ()) -> bool:
        """One attempt's results in one commit, with its bounces (``new_messages``) and
        local delivery's ``mailbox_copies``; the message goes when nothing is pending
        (returns True then)."""
        ...

    async def give_back(self, message_id: str, rcpt_nos: Sequence[int]) -> None:
        """Return claimed recipients untried."""
        ...

    async def next_due_time(self) -> float | None:
        """When the earliest deferred recipient is due."""
        ...

    async def message_data(self, message_id: str) -> bytes | None:
        """A queued message's bytes; None if it is gone."""
        ...


class QueueAdmin(Protocol):
    """What `mta queue …` and the metrics read and change, on the live queue."""

    def iter_queue(self, *, batch: int = 2000) -> AsyncGenerator[list[QueueEntry], None]:
        """Messages with pending recipients, oldest first, in one snapshot, in lists."""
        ...

    async def list_messages(self, ids: Iterable[str] | None = None) -> list[QueuedMessage]: ...
    async def message_detail(self, message_id: str) -> MessageDetail | None: ...
    async def queue_summary(self, now: float) -> QueueSummary: ...
    async def count_recipients(self) -> dict[str, int]: ...
    async def hold(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult: ...
    async def release(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult: ...
    async def flush(self, ids: Iterable[str] | None, now: float, *,
                    detail: str | None = None) -> AdminResult: ...
    async def requeue(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult: ...
    async def delete(self, ids: Iterable[str] | None) -> AdminResult: ...

    async def check(self) -> list[str]:
        """Look at every part of the store: [] when sound, else the problems found."""
        ...


class MailboxLock(Protocol):
    """RFC 1939 §8's maildrop lock, held by one POP3 session from login to its end."""

    async def release(self) -> None:
        """Give the lock up (idempotent); also given up when the holder's process dies."""
        ...


class Mailboxes(Protocol):
    """The lab mailboxes, as POP3 and `mta mailbox` see them."""

    async def lock(self, mailbox: str) -> MailboxLock | None:
        """Lock ``mailbox`` for one POP3 session against every other session on every
        process and node sharing this store; None when another session holds it."""
        ...

    async def messages(self, mailbox: str) -> list[StoredMessage]: ...
    async def read(self, mailbox: str, message_id: int) -> bytes | None: ...
    async def delete(self, mailbox: str, message_ids: Sequence[int]) -> int: ...
    async def purge(self, mailbox: str) -> int: ...
    async def prune_older_than(self, cutoff: float, *, skip: Collection[str] = ()) -> int: ...
    async def summaries(self) -> list[MailboxSummary]: ...
    async def listing(self, mailbox: str) -> list[MessageSummary]: ...


class Inbox(Protocol):
    """The lab inbox (issue 15): one entry per accepted message that reached at least
    one lab mailbox, listed while any mailbox still holds a copy of it.

    Entries are made in the commit that stores the copies (Queue.record_outcomes)
    and go with their last copy, whatever removes it (POP3 DELE, pruning,
    ``mta mailbox purge``, :meth:`delete`). Every entry made or removed is also
    written to a change log in the same commit, which :meth:`changes_since` reads:
    the events socket follows it, whichever process or node made the change."""

    async def page(self, terms: Sequence[SearchTerm] = (), *, start: int = 0, limit: int = 50,
                   mailbox: str | None = None) -> InboxPage:
        """Newest first: the entries matching every term (all without terms), from
        ``start``; ``mailbox`` narrows to the entries one lab mailbox holds."""
        ...

    async def entry(self, entry_id: str) -> InboxEntry | None:
        """One entry by its ID (the API resolves "latest" with :meth:`page`)."""
        ...

    async def entries(self, entry_ids: Sequence[str]) -> list[InboxEntry]:
        """The entries of these IDs that still exist, newest first."""
        ...

    async def raw(self, entry_id: str) -> bytes | None:
        """The bytes of one remaining copy (with local delivery's trace fields); None if gone."""
        ...

    async def set_read(self, entry_ids: Sequence[str] | None, read: bool,
                       terms: Sequence[SearchTerm] = ()) -> int:
        """Mark these entries (None: every entry matching ``terms``, or all) read or
        unread; returns how many changed."""
        ...

    async def set_tags(self, entry_ids: Sequence[str], tags: Sequence[str]) -> int:
        """Replace the tags of these entries; returns how many exist."""
        ...

    async def delete(self, entry_ids: Sequence[str] | None, terms: Sequence[SearchTerm] = ()) -> list[str]:
        """Remove these entries (None: every entry matching ``terms``, or all) and every
        mailbox copy of them, in one commit; returns the IDs removed."""
        ...

    async def changes_since(self, seq: int, *, limit: int = 500) -> list[InboxChange]:
        """Changes after ``seq``, oldest first (``seq`` 0 and none kept: [])."""
        ...

    async def last_change(self) -> int:
        """The seq of the newest change (0 if none): where a new events client starts."""
        ...


class Store(Protocol):
    """One backend's parts, opened and closed together (built by mta.store.factory)."""

    @property
    def queue(self) -> Queue: ...
    @property
    def admin(self) -> QueueAdmin: ...
    @property
    def mailboxes(self) -> Mailboxes: ...
    @property
    def inbox(self) -> Inbox: ...

    async def open(self) -> None:
        """Connect, migrate the schema; QueueDamagedError if the store cannot be read at all."""
        ...

    async def check_at_start(self) -> None:
        """A bounded look for damage at start; found damage is reported to health."""
        ...

    async def close(self) -> None: ...
