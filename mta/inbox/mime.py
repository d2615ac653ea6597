"""A message's MIME structure as Mailpit shows it: the text body, the HTML body,
inline parts and attachments, each part named by its PartID.

Parsing is the standard library's (``email`` with ``policy.default``, RFC 2045-2049).
PartIDs number a multipart's children from 1 and nest with dots ("2.1"), as
IMAP section numbers do (RFC 3501 §6.4.5); a message that is not multipart
is part "1". Parts are classified as Mailpit's MIME library does: the first
text/plain and text/html parts that are not attachments are the bodies; a
part with ``Content-Disposition: inline`` or a Content-ID inside
multipart/related is inline; everything else is an attachment.
"""

from __future__ import annotations

import email.errors
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, Message
from email.parser import BytesParser


@dataclass(frozen=True, slots=True)
class Part:
    """An inline part or attachment: Mailpit's ``{PartID, FileName, ContentType, ContentID, Size}``."""

    part_id: str
    filename: str
    content_type: str
    content_id: str
    size: int                  # decoded bytes


@dataclass(slots=True)
class Structure:
    text: str = ""
    html: str = ""
    inline: list[Part] = field(default_factory=list)
    attachments: list[Part] = field(default_factory=list)


class _RememberedHeaders(HeaderRegistry):
    """policy.default's header registry, remembering what it parsed: the email package
    asks for a part's Content-Type some seven times while parsing and walking it, and
    each ask parsed the field again (two thirds of a small message's summary time).
    Header objects are immutable, so one can be handed out again."""

    LIMIT = 4096

    def __init__(self) -> None:
        super().__init__()
        self._parsed: dict[tuple[str, str], BaseHeader] = {}

    def __call__(self, name: str, value: str) -> BaseHeader:
        key = (name, value)
        header = self._parsed.get(key)
        if header is None:
            if len(self._parsed) >= self.LIMIT:
                self._parsed.clear()
            header = self._parsed[key] = super().__call__(name, value)
        return header


POLICY = policy.default.clone(header_factory=_RememberedHeaders())


def parse(data: bytes) -> EmailMessage:
    """The message as the email package sees it (never raises: defects are recorded on it)."""
    message = BytesParser(policy=POLICY).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def leaves(message: Message) -> Iterator[tuple[str, Message, bool]]:
    """(PartID, part, inside multipart/related) for every leaf part, in order."""

    def walk(part: Message, prefix: str, related: bool) -> Iterator[tuple[str, Message, bool]]:
        children = part.get_payload() if part.is_multipart() else None
        if not isinstance(children, list):
            yield (prefix or "1"), part, related
            return
        inner = related or part.get_content_subtype() == "related"
        for n, child in enumerate(children, 1):
            if isinstance(child, Message):
                yield from walk(child, f"{prefix}.{n}" if prefix else str(n), inner)

    yield from walk(message, "", False)


def find_part(message: Message, part_id: str) -> Message | None:
    for pid, part, _related in leaves(message):
        if pid == part_id:
            return part
    return None


def structure(message: Message) -> Structure:
    found = Structure()
    texts: list[str] = []
    htmls: list[str] = []
    for part_id, part, related in leaves(message):
        ctype = part.get_content_type()
        disposition = part.get_content_disposition()
        filename = _filename(part)
        if disposition != "attachment" and not filename and ctype in ("text/plain", "text/html"):
            (texts if ctype == "text/plain" else htmls).append(text_of(part))
            continue
        content_id = str(part.get("Content-ID", "") or "").strip().strip("<>")
        described = Part(part_id, filename, ctype, content_id, len(payload_of(part)))
        if disposition == "inline" or (related and content_id and disposition != "attachment"):
            found.inline.append(described)
        else:
            found.attachments.append(described)
    found.text = "\n\n".join(texts)
    found.html = htmls[0] if htmls else ""
    return found


def text_of(part: Message) -> str:
    """A text part decoded to str: its charset, else UTF-8 with replacement characters."""
    try:
        content = part.get_content() if isinstance(part, EmailMessage) else None
        if isinstance(content, str):
            return content
    except (LookupError, UnicodeError, ValueError, email.errors.MessageError, AssertionError):
        pass
    charset = part.get_content_charset() or "utf-8"
    raw = payload_of(part)
    try:
        return raw.decode(charset, "replace")
    except LookupError:
        return raw.decode("utf-8", "replace")


def payload_of(part: Message) -> bytes:
    """A leaf part's bytes with its Content-Transfer-Encoding undone."""
    if part.get_content_type() == "message/rfc822" or part.is_multipart():
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            return inner[0].as_bytes(policy=policy.SMTP)
    raw = part.get_payload(decode=True)
    return raw if isinstance(raw, bytes) else b""


def _filename(part: Message) -> str:
    try:
        name = part.get_filename()
    except (ValueError, LookupError, email.errors.MessageError):
        name = None
    return str(name or "")
