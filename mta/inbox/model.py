"""The inbox's records. Pure data: parsed once at local delivery (mta/inbox/summary.py),
stored by the store (mta.store.api.Inbox), shaped into Mailpit's JSON by mta/web."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox of a header field: Mailpit's ``{Name, Address}``."""

    name: str
    address: str


@dataclass(frozen=True, slots=True)
class InboxSummary:
    """What the list, the search and the events need of a message, parsed once from its bytes.

    ``search_text`` is what free words of a search match (lower-cased: the
    addresses, the subject and the text of the body, as Mailpit searches)."""

    message_id: str                       # the Message-ID field, without <>
    from_: Address | None
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    subject: str = ""
    date: float | None = None             # the Date field, as a POSIX time
    attachments: int = 0                  # Mailpit counts attachments, not inline parts
    snippet: str = ""                     # up to 250 characters of the text
    search_text: str = ""


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """One entry as stored: a message that reached at least one lab mailbox."""

    id: str                               # the API's ID: the queue id (a suffix only if reused)
    queue_id: str
    created: float                        # arrival in the queue (POSIX time)
    size: int                             # bytes of the message as the API's raw serves it
    read: bool
    summary: InboxSummary
    tags: tuple[str, ...] = ()
    mailboxes: tuple[str, ...] = ()       # the lab mailboxes still holding a copy, sorted


@dataclass(frozen=True, slots=True)
class SearchTerm:
    """One term of Mailpit's search language (parsed by mta/inbox/search.py).

    ``field`` None is a free word or "quoted phrase" (matched against
    ``search_text``); otherwise one of :data:`mta.inbox.search.FIELDS`, with
    ``value`` as written (dates and sizes are checked by the parser)."""

    field: str | None
    value: str
    negated: bool = False


@dataclass(frozen=True, slots=True)
class InboxPage:
    """One page of the list or a search, newest first, with Mailpit's counts."""

    entries: list[InboxEntry]
    total: int                 # entries in the inbox (or in the one mailbox asked for)
    unread: int                # unread among them
    matched: int               # entries the search matched (= total without a search)
    matched_unread: int
    tags: list[str] = field(default_factory=list)   # every tag in use, sorted


@dataclass(frozen=True, slots=True)
class InboxChange:
    """One change for the events socket: ``new`` or ``delete`` of an entry, in commit order."""

    seq: int
    kind: str                  # "new" | "delete" | "read" | "unread"
    id: str
