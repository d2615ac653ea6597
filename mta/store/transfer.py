"""Moving a queue between backends (`mta queue export` / `mta queue import`, issue 16):
the records, the dump file and the copying, whatever the backends.

The dump is one self-describing file, independent of either backend: JSON lines
(UTF-8), first a header, then one record per queued message, then one per lab
mailbox copy, then an end record with the counts::

    {"format": "mta-queue-export", "version": 1, "created": 1764732000.5, "source": "sqlite",
     "mta": "1.0", "max_copy_id": 7}
    {"type": "message", "id": "0A1B2C3D4E5F", "sender": ..., "recipients": [...], "history": [...],
     "data": "<base64>"}
    {"type": "copy", "mailbox": "alice@lab.test", "id": 7, "queue_id": ..., "read": true, "tags": [...],
     "data": "<base64>"}
    {"type": "end", "messages": 1, "recipients": 2, "copies": 1}

A message record carries the whole message: envelope, every recipient (whatever its
state) with its attempts, next attempt, last error and RFC 3461 NOTIFY/ORCPT, the
history, and the bytes. A copy record carries one lab mailbox's copy with its id (part
of the POP3 UIDL, kept when the target can) and its inbox entry's read flag and tags;
the header's ``max_copy_id`` lets an import give a copy whose id is taken there a new
id above every id still to come in the file.
Recipients that were being delivered ('active') are written as due again: queued, or
deferred once tried (as recover_in_flight makes them after a crash). The end record
tells a file cut at a line boundary from a whole one.

Both directions stream: the export reads the store in batches and writes each record
as it comes; the import reads a line at a time and writes a batch per transaction.
Each backend's side (:class:`TransferStore`) reads out and writes in its own tables:
mta/store/sqlite/transfer.py and mta/store/postgresql/transfer.py.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, TypeVar

import mta
from mta.store.api import HistoryEntry

FORMAT = "mta-queue-export"
VERSION = 1

# What a recipient's state may be in a dump ('active' is written as due again).
STATES = ("queued", "deferred", "held", "delivered", "bounced")

# An import's batch (one transaction) ends at this many records or bytes of message data,
# whichever comes first: a batch of large messages stays a few megabytes in memory.
BATCH_RECORDS = 200
BATCH_BYTES = 8 * 1024 * 1024


class TransferError(Exception):
    """A dump that cannot be written or read, or a store that must not be exported now;
    str() is the one line the command prints."""


def due_again(state: str, attempts: int) -> str:
    """A recipient's state in a dump: one being delivered is due again (at least once)."""
    if state == "active":
        return "deferred" if attempts > 0 else "queued"
    return state


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    address: str
    state: str
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    notify: str | None = None
    orcpt: str | None = None
    updated: float = 0.0


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """A queued message with everything the store keeps of it; recipients in RCPT order."""

    id: str
    sender: str
    arrival: float
    recipients: tuple[RecipientRecord, ...]
    data: bytes
    client: str = ""
    listener: str = ""
    helo: str = ""
    auth_user: str | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    ret: str | None = None
    envid: str | None = None
    delay_warned: bool = False
    history: tuple[HistoryEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class CopyRecord:
    """One lab mailbox copy, with its inbox entry's read flag and tags."""

    mailbox: str
    id: int            # the source's message id (part of the UIDL)
    queue_id: str
    received: float
    sender: str
    subject: str
    data: bytes
    read: bool = False
    tags: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str, float]:
        """What makes a copy "already present" in a store: the same mailbox, message and arrival."""
        return self.mailbox, self.queue_id, self.received


# An export batch, as each backend reads it: this many rows, or fewer whose bytes reach BATCH_BYTES.
BATCH_MESSAGES = 500
Row = TypeVar("Row")
Keyed = TypeVar("Keyed", MessageRecord, CopyRecord)


def within_batch_bytes(rows: Iterable[Row], size_of: Callable[[Row], int]) -> list[Row]:
    """The first ``rows`` whose sizes add up to BATCH_BYTES (at least one row, however large)."""
    kept: list[Row] = []
    total = 0
    for row in rows:
        size = size_of(row)
        if kept and total + size > BATCH_BYTES:
            break
        kept.append(row)
        total += size
    return kept


async def in_pages(read_after: Callable[[Any], Awaitable[list[Keyed]]], first: Any) -> AsyncIterator[list[Keyed]]:
    """Batches from ``read_after(key)`` (the records after ``key``, in key order), each
    batch's last id the next key, until one comes back empty: keyset paging, so a
    batch is one short query however far into the queue it is."""
    after = first
    while batch := await read_after(after):
        yield batch
        after = batch[-1].id


@dataclass(frozen=True, slots=True)
class DumpHeader:
    """The first line: what the file is, and the highest mailbox copy id in it, so that an
    import can give a copy whose id is taken a new one above every id still to come."""

    source: str
    created: float
    max_copy_id: int


@dataclass(frozen=True, slots=True)
class Added:
    """What one batch of an import did."""

    added: int = 0
    recipients: int = 0
    skipped: int = 0
    renamed: tuple[tuple[str, str], ...] = ()   # (queue id in the file, queue id given here)


@dataclass(slots=True)
class Counts:
    """What an export wrote or an import did, for the summary line."""

    messages: int = 0
    recipients: int = 0
    copies: int = 0
    skipped_messages: int = 0
    skipped_copies: int = 0
    renamed: list[tuple[str, str]] = field(default_factory=list)

    def add(self, kind: str, result: Added) -> None:
        if kind == "message":
            self.messages += result.added
            self.recipients += result.recipients
            self.skipped_messages += result.skipped
            self.renamed.extend(result.renamed)
        else:
            self.copies += result.added
            self.skipped_copies += result.skipped

    def summary(self) -> str:
        text = (f"{self.messages} message{_s(self.messages)} ({self.recipients} recipient{_s(self.recipients)}),"
                f" {self.copies} mailbox cop{'y' if self.copies == 1 else 'ies'}")
        skipped = self.skipped_messages + self.skipped_copies
        return text if not skipped else f"{text}, skipped {skipped} already present"


def _s(n: int) -> str:
    return "" if n == 1 else "s"


# --------------------------------------------------------------------------- one backend's side


class TransferStore(Protocol):
    """One store as export reads it and import writes it (a backend's transfer.py)."""

    name: str   # "sqlite" | "postgresql", in the dump's header

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def max_copy_id(self) -> int:
        """The highest mailbox copy id (0 without copies), for the dump's header."""
        ...

    async def reserve_copy_ids(self, up_to: int) -> None:
        """Make the ids this store gives new copies from now on higher than ``up_to``."""
        ...

    async def check_quiet(self) -> None:
        """TransferError unless the store may be exported now: no daemon or node is
        accepting or delivering its mail (the copy would miss it or deliver it twice)."""
        ...

    def messages(self) -> AsyncIterator[list[MessageRecord]]:
        """Every queued message, in queue id order, a batch at a time."""
        ...

    def copies(self) -> AsyncIterator[list[CopyRecord]]:
        """Every lab mailbox copy, in id order, a batch at a time."""
        ...

    async def add_messages(self, records: Sequence[MessageRecord]) -> Added:
        """Store these messages in one transaction; one whose queue id is here already
        with the same arrival is skipped, one whose id another message has is given a new id.
        Wakes the queue managers once committed."""
        ...

    async def add_copies(self, records: Sequence[tuple[CopyRecord, int]]) -> Added:
        """Store these copies in one transaction, each with its inbox entry (read flag and
        tags as recorded); a copy is skipped when its store already holds ``n`` copies of
        its key (``n``: the copy is the n-th of that key in the file)."""
        ...


# --------------------------------------------------------------------------- writing


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def message_line(m: MessageRecord) -> str:
    doc = {
        "type": "message", "id": m.id, "sender": m.sender, "arrival": m.arrival, "client": m.client,
        "listener": m.listener, "helo": m.helo, "auth_user": m.auth_user, "smtputf8": m.smtputf8,
        "body_8bit": m.body_8bit, "ret": m.ret, "envid": m.envid, "delay_warned": m.delay_warned,
        "recipients": [{"address": r.address, "state": due_again(r.state, r.attempts), "attempts": r.attempts,
                        "next_attempt": r.next_attempt, "last_error": r.last_error, "notify": r.notify,
                        "orcpt": r.orcpt, "updated": r.updated} for r in m.recipients],
        "history": [{"time": h.time, "recipient": h.recipient, "event": h.event, "detail": h.detail}
                    for h in m.history],
        "data": _b64(m.data),
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def copy_line(c: CopyRecord) -> str:
    doc = {"type": "copy", "mailbox": c.mailbox, "id": c.id, "queue_id": c.queue_id, "received": c.received,
           "sender": c.sender, "subject": c.subject, "read": c.read, "tags": list(c.tags), "data": _b64(c.data)}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


class DumpWriter:
    """Writes a dump to ``path`` atomically: into a temporary file beside it, synced and
    renamed over ``path`` only when whole (:meth:`finish`); ``-`` is standard output."""

    def __init__(self, path: str, source: str, max_copy_id: int):
        self.path = path
        self._temp: str | None = None
        try:
            if path == "-":
                self._out: IO[bytes] = sys.stdout.buffer
            else:
                directory = os.path.dirname(os.path.abspath(path))
                fd, self._temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
                self._out = os.fdopen(fd, "wb")
        except OSError as exc:
            raise TransferError(f"{path}: {exc.strerror or exc}") from None
        self._line(json.dumps({"format": FORMAT, "version": VERSION, "created": time.time(), "source": source,
                               "mta": mta.__version__, "max_copy_id": max_copy_id}))

    def _line(self, text: str) -> None:
        try:
            self._out.write(text.encode("utf-8") + b"\n")
        except OSError as exc:
            raise TransferError(f"{self.path}: {exc.strerror or exc}") from None

    def message(self, m: MessageRecord) -> None:
        self._line(message_line(m))

    def copy(self, c: CopyRecord) -> None:
        self._line(copy_line(c))

    def finish(self, counts: Counts) -> None:
        """The end record; then the file is synced and takes ``path``'s place."""
        self._line(json.dumps({"type": "end", "messages": counts.messages, "recipients": counts.recipients,
                               "copies": counts.copies}))
        try:
            self._out.flush()
            if self._temp is not None:
                os.fsync(self._out.fileno())
                self._out.close()
                # mkstemp makes it 0600: a dump holds mail, as the queue does.
                os.replace(self._temp, self.path)
                self._temp = None
                _sync_directory(os.path.dirname(os.path.abspath(self.path)))
        except OSError as exc:
            raise TransferError(f"{self.path}: {exc.strerror or exc}") from None

    def abort(self) -> None:
        """Leave nothing behind (the old file at ``path``, if any, stays as it was)."""
        if self._temp is not None:
            with contextlib.suppress(OSError):
                self._out.close()
            with contextlib.suppress(OSError):
                os.unlink(self._temp)
            self._temp = None


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def export_store(source: TransferStore, writer: DumpWriter) -> Counts:
    """Every message, then every mailbox copy, of ``source`` into ``writer``."""
    counts = Counts()
    async for messages in source.messages():
        for m in messages:
            writer.message(m)
            counts.messages += 1
            counts.recipients += len(m.recipients)
    async for copies in source.copies():
        for c in copies:
            writer.copy(c)
            counts.copies += 1
    writer.finish(counts)
    return counts


# --------------------------------------------------------------------------- reading


Record = DumpHeader | MessageRecord | CopyRecord


class _Bad(Exception):
    """What is wrong with one line (the reader adds the file and line number)."""


def read_dump(stream: IO[bytes]) -> Iterator[tuple[int, Record]]:
    """The records of a dump with their line numbers, checked line by line;
    TransferError("line N: ...") at the first line that is not what it must be."""
    number = 0
    ended = False
    for number, raw in enumerate(stream, 1):   # noqa: B007 - the number is used after the loop
        try:
            if ended:
                raise _Bad("text after the end record")
            if not raw.endswith(b"\n"):
                raise _Bad("the line is cut off (the file is truncated)")
            doc = _json(raw)
            if number == 1:
                yield number, _header(doc)
                continue
            kind = doc.get("type")
            if kind == "message":
                yield number, _message(doc)
            elif kind == "copy":
                yield number, _copy(doc)
            elif kind == "end":
                ended = True
            else:
                raise _Bad(f"unknown record type {kind!r}")
        except _Bad as exc:
            raise TransferError(f"line {number}: {exc}") from None
    if number == 0:
        raise TransferError("line 1: the file is empty (not an mta queue export)")
    if not ended:
        raise TransferError(f"line {number + 1}: the file ends without its end record (it is truncated)")


def _json(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _Bad("not a JSON object (the file is damaged or truncated)") from None
    if not isinstance(doc, dict):
        raise _Bad("not a JSON object")
    return doc


def _header(doc: dict[str, Any]) -> DumpHeader:
    if doc.get("format") != FORMAT:
        raise _Bad(f"not an mta queue export (no \"format\": \"{FORMAT}\" header)")
    if doc.get("version") != VERSION:
        raise _Bad(f"format version {doc.get('version')!r}: this mta reads version {VERSION}")
    return DumpHeader(_field(doc, "source", str), float(_field(doc, "created", (int, float))),
                      _field(doc, "max_copy_id", int))


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if name not in doc:
        raise _Bad(f"{name!r} is missing")
    value = doc[name]
    if value is None and optional:
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
    if not ok:
        raise _Bad(f"{name!r} is {json.dumps(value)[:40]}, not {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return {str: "a string", bool: "true or false", int: "an integer", list: "a list"}.get(
        kind if isinstance(kind, type) else float, "a number")


def _data(doc: dict[str, Any]) -> bytes:
    try:
        return base64.b64decode(_field(doc, "data", str), validate=True)
    except (binascii.Error, ValueError):
        raise _Bad("'data' is not base64") from None


def _message(doc: dict[str, Any]) -> MessageRecord:
    recipients = []
    for r in _field(doc, "recipients", list):
        if not isinstance(r, dict):
            raise _Bad("a recipient is not a JSON object")
        state = _field(r, "state", str)
        attempts = _field(r, "attempts", int)
        state = due_again(state, attempts)
        if state not in STATES:
            raise _Bad(f"recipient state {state!r} is not one of {', '.join(STATES)}")
        recipients.append(RecipientRecord(
            address=_field(r, "address", str), state=state, attempts=attempts,
            next_attempt=float(_field(r, "next_attempt", (int, float))),
            last_error=_field(r, "last_error", str, optional=True), notify=_field(r, "notify", str, optional=True),
            orcpt=_field(r, "orcpt", str, optional=True), updated=float(_field(r, "updated", (int, float)))))
    if not recipients:
        raise _Bad("a message without recipients")
    history = []
    for h in _field(doc, "history", list):
        if not isinstance(h, dict):
            raise _Bad("a history entry is not a JSON object")
        history.append(HistoryEntry(float(_field(h, "time", (int, float))), _field(h, "recipient", str, optional=True),
                                    _field(h, "event", str), _field(h, "detail", str, optional=True)))
    queue_id = _field(doc, "id", str)
    if not queue_id or not all(c.isalnum() for c in queue_id):
        raise _Bad(f"queue id {queue_id!r} is not letters and digits")
    return MessageRecord(
        id=queue_id, sender=_field(doc, "sender", str), arrival=float(_field(doc, "arrival", (int, float))),
        recipients=tuple(recipients), data=_data(doc), client=_field(doc, "client", str),
        listener=_field(doc, "listener", str), helo=_field(doc, "helo", str),
        auth_user=_field(doc, "auth_user", str, optional=True), smtputf8=_field(doc, "smtputf8", bool),
        body_8bit=_field(doc, "body_8bit", bool), ret=_field(doc, "ret", str, optional=True),
        envid=_field(doc, "envid", str, optional=True), delay_warned=_field(doc, "delay_warned", bool),
        history=tuple(history))


def _copy(doc: dict[str, Any]) -> CopyRecord:
    tags = _field(doc, "tags", list)
    if not all(isinstance(t, str) for t in tags):
        raise _Bad("'tags' is not a list of strings")
    message_id = _field(doc, "id", int)
    if message_id < 1:
        raise _Bad(f"mailbox message id {message_id} is not positive")
    return CopyRecord(
        mailbox=_field(doc, "mailbox", str), id=message_id, queue_id=_field(doc, "queue_id", str),
        received=float(_field(doc, "received", (int, float))), sender=_field(doc, "sender", str),
        subject=_field(doc, "subject", str), data=_data(doc), read=_field(doc, "read", bool), tags=tuple(tags))


async def import_dump(records: Iterator[tuple[int, Record]], target: TransferStore, counts: Counts) -> None:
    """Write ``records`` into ``target`` a batch (one transaction) at a time, updating
    ``counts`` as each commits. A bad line (TransferError from the reader) ends it after
    the whole records before it are written: a message is stored whole or not at all, and
    a second run skips what the first stored."""
    batch: list[MessageRecord | CopyRecord] = []
    size = 0
    seen: dict[tuple[str, str, float], int] = {}   # copies per key so far in the file

    async def flush() -> None:
        nonlocal batch, size
        if not batch:
            return
        if isinstance(batch[0], MessageRecord):
            counts.add("message", await target.add_messages([r for r in batch if isinstance(r, MessageRecord)]))
        else:
            copies = []
            for r in batch:
                assert isinstance(r, CopyRecord)
                seen[r.key] = seen.get(r.key, 0) + 1
                copies.append((r, seen[r.key]))
            counts.add("copy", await target.add_copies(copies))
        batch, size = [], 0

    try:
        for _line, record in records:
            if isinstance(record, DumpHeader):
                await target.reserve_copy_ids(record.max_copy_id)
                continue
            if batch and type(batch[0]) is not type(record):
                await flush()
            batch.append(record)
            size += len(record.data)
            if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
                await flush()
    except TransferError:
        await flush()
        raise
    await flush()
