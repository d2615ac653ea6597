"""The JSON shapes of Mailpit's v1 API, built from the inbox's records.

Field names and casing are Mailpit's (its ``storage.MessageSummary``,
``storage.Message``, ``storage.Attachment`` and ``apiv1.MessagesSummary``),
so that Mailpit's clients read ours unchanged. Two additions, which clients
ignore: ``Mailboxes`` on a summary and a message (the lab mailboxes still
holding a copy), since mta keeps one mailbox per address where Mailpit has one.

Times are written as Go's encoding/json writes a time.Time (RFC 3339 with the
fraction's trailing zeros dropped); ours are UTC and to the millisecond, as
Mailpit stores them.
"""

from __future__ import annotations

import hashlib
import re
import time
from email.message import Message
from typing import Any

from mta.inbox import mime
from mta.inbox.model import Address, InboxEntry, InboxPage
from mta.inbox.summary import header_text, html_to_text

Json = dict[str, Any]

_ANGLE_LINK = re.compile(r"<([^<>]*)>")


def timestamp(t: float) -> str:
    """``2026-12-02T22:42:35.12Z``: RFC 3339 in UTC, milliseconds with trailing zeros
    dropped (Go's time.RFC3339Nano, which Mailpit's JSON uses)."""
    millis = int(round(t * 1000))
    seconds, ms = divmod(millis, 1000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    fraction = f"{ms:03d}".rstrip("0")
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"


def address(a: Address) -> Json:
    return {"Name": a.name, "Address": a.address}


def addresses(items: tuple[Address, ...] | list[Address]) -> list[Json]:
    return [address(a) for a in items]


def bcc_of(entry: InboxEntry) -> list[Json]:
    """The Bcc field, plus each local recipient named in no To, Cc or Bcc field:
    Mailpit adds the envelope recipients missing from the header to Bcc (its smtpd's
    "missing addresses"), and the lab mailboxes are ours."""
    s = entry.summary
    named = {a.address.lower() for a in (*s.to, *s.cc, *s.bcc)}
    extra = [Address("", box) for box in entry.mailboxes if box.lower() not in named]
    return addresses((*s.bcc, *extra))


def summary(entry: InboxEntry) -> Json:
    """A message in a list: Mailpit's MessageSummary."""
    s = entry.summary
    return {
        "ID": entry.id,
        "MessageID": s.message_id,
        "Read": entry.read,
        "From": address(s.from_) if s.from_ else None,
        "To": addresses(s.to),
        "Cc": addresses(s.cc),
        "Bcc": bcc_of(entry),
        "ReplyTo": addresses(s.reply_to),
        "Subject": s.subject,
        "Created": timestamp(entry.created),
        "Tags": list(entry.tags),
        "Size": entry.size,
        "Attachments": s.attachments,
        "Snippet": s.snippet,
        "Mailboxes": list(entry.mailboxes),
    }


def messages_page(page: InboxPage, start: int) -> Json:
    """Mailpit's MessagesSummary: the list envelope of GET /api/v1/messages and /search."""
    return {
        "total": page.total,
        "unread": page.unread,
        "count": len(page.entries),          # legacy, still sent by Mailpit
        "messages_count": page.matched,
        "messages_unread": page.matched_unread,
        "start": start,
        "tags": list(page.tags),
        "messages": [summary(entry) for entry in page.entries],
    }


def attachment(part: mime.Part, payload: bytes) -> Json:
    """Mailpit's Attachment: a file name falls back to the Content-ID, as Mailpit's does."""
    return {
        "PartID": part.part_id,
        "FileName": part.filename or part.content_id,
        "ContentType": part.content_type,
        "ContentID": part.content_id,
        "Size": part.size,
        "Checksums": {
            "MD5": hashlib.md5(payload, usedforsecurity=False).hexdigest(),
            "SHA1": hashlib.sha1(payload, usedforsecurity=False).hexdigest(),
            "SHA256": hashlib.sha256(payload).hexdigest(),
        },
    }


def list_unsubscribe(message: Message) -> Json:
    """Mailpit's ListUnsubscribe: the field (RFC 2369), its <links>, RFC 8058's -Post field."""
    header = header_text(message, "List-Unsubscribe")
    links = _ANGLE_LINK.findall(header)
    errors = "" if not header or links else "No valid unsubscribe links found"
    return {"Header": header, "Links": links, "Errors": errors,
            "HeaderPost": header_text(message, "List-Unsubscribe-Post")}


def message(entry: InboxEntry, raw: bytes) -> Json:
    """One message in full: Mailpit's Message (GET /api/v1/message/{ID})."""
    parsed = mime.parse(raw)
    found = mime.structure(parsed)
    s = entry.summary
    return {
        "ID": entry.id,
        "MessageID": s.message_id,
        "Read": True,     # opening marks it read; older Mailpits sent it and some clients need it
        "From": address(s.from_) if s.from_ else None,
        "To": addresses(s.to),
        "Cc": addresses(s.cc),
        "Bcc": bcc_of(entry),
        "ReplyTo": addresses(s.reply_to),
        "ReturnPath": header_text(parsed, "Return-Path").strip().strip("<>"),
        "Subject": s.subject,
        "ListUnsubscribe": list_unsubscribe(parsed),
        "Date": timestamp(s.date if s.date is not None else entry.created),
        "Tags": list(entry.tags),
        "Text": body_text(found),
        "HTML": _lines(found.html),
        "Size": entry.size,
        "Inline": [attachment(p, _payload(parsed, p)) for p in found.inline],
        "Attachments": [attachment(p, _payload(parsed, p)) for p in found.attachments],
        "Mailboxes": list(entry.mailboxes),
    }


def body_text(found: mime.Structure) -> str:
    """Mailpit's Text: the text part, else the text of the HTML part (as its MIME
    library makes one), line ends as "\n"."""
    text = found.text if found.text.strip() or not found.html else html_to_text(found.html).strip()
    return _lines(text)


def _lines(text: str) -> str:
    """Line ends as "\n", however the part wrote them (SMTP's CRLF, or a bare LF)."""
    return text.replace("\r\n", "\n")


def _payload(parsed: Message, part: mime.Part) -> bytes:
    found = mime.find_part(parsed, part.part_id)
    return mime.payload_of(found) if found is not None else b""


def headers(raw: bytes) -> dict[str, list[str]]:
    """The header section as Mailpit's GET .../headers gives it (Go's mail.Header):
    canonical names ("Message-Id"), folded lines joined, values as written (not
    decoded), every occurrence in order; names sorted, as Go's JSON sorts map keys."""
    end = len(raw)
    for separator in (b"\r\n\r\n", b"\n\n"):
        at = raw.find(separator)
        if at != -1:
            end = min(end, at)
    text = raw[:end].decode("utf-8", "replace").replace("\r\n", "\n")
    found: dict[str, list[str]] = {}
    name: str | None = None
    for line in text.split("\n"):
        if line[:1] in (" ", "\t") and name is not None:
            found[name][-1] = f"{found[name][-1]} {line.strip()}".strip()
            continue
        key, sep, value = line.partition(":")
        key = key.rstrip()
        if not sep or not key or any(c.isspace() for c in key):   # not a field (RFC 5322 §2.2)
            name = None
            continue
        name = canonical_name(key)
        found.setdefault(name, []).append(value.strip())
    return dict(sorted(found.items()))


def canonical_name(name: str) -> str:
    """Go's textproto.CanonicalMIMEHeaderKey: "content-TYPE" -> "Content-Type"."""
    return "-".join(word[:1].upper() + word[1:].lower() for word in name.split("-"))
