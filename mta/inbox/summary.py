"""Parse a message once, at local delivery, into what the inbox lists and searches."""

from __future__ import annotations

import email.errors
import email.utils
import html
import re
from email.message import Message

from mta.inbox.mime import parse, structure
from mta.inbox.model import Address, InboxSummary

SNIPPET_CHARS = 250           # Mailpit's snippet: up to 250 characters of the text
SEARCH_TEXT_CHARS = 65_536    # free words match within the first 64 KiB of text

_SPACE = re.compile(r"\s+")
_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)


def summarize(data: bytes) -> InboxSummary:
    """The summary of a message's bytes; never raises (a malformed field reads as empty).

    Its strings hold no NUL: the message itself cannot (inbound refuses it, RFC 5322
    §2.3), but a decoded encoded word (=?utf-8?q?=00?=) or a base64 text part can, and
    neither a JSON client nor PostgreSQL's text takes one; each reads as U+FFFD."""
    message = parse(data)
    found = structure(message)
    text = no_nul(found.text) if found.text.strip() else html_to_text(no_nul(found.html))
    snippet = _SPACE.sub(" ", text).strip()[:SNIPPET_CHARS]
    from_ = addresses(message, "From")
    to, cc, bcc = addresses(message, "To"), addresses(message, "Cc"), addresses(message, "Bcc")
    reply_to = addresses(message, "Reply-To")
    subject = header_text(message, "Subject")
    people = " ".join(f"{a.name} {a.address}" for a in (*from_, *to, *cc, *bcc, *reply_to))
    search_text = f"{people} {subject} {_SPACE.sub(' ', text)}".lower()[:SEARCH_TEXT_CHARS]
    return InboxSummary(
        message_id=header_text(message, "Message-ID").strip().strip("<>"),
        from_=from_[0] if from_ else None, to=tuple(to), cc=tuple(cc), bcc=tuple(bcc), reply_to=tuple(reply_to),
        subject=subject, date=date_of(message), attachments=len(found.attachments), snippet=snippet,
        search_text=search_text)


def header_text(message: Message, name: str) -> str:
    """A field's value with RFC 2047 encoded words decoded; "" if absent or unreadable."""
    try:
        value = message.get(name)
    except (ValueError, LookupError, IndexError, email.errors.MessageError):
        return ""
    return no_nul(_SPACE.sub(" ", str(value or "")).strip())


def no_nul(text: str) -> str:
    return text.replace("\x00", "\ufffd")


def addresses(message: Message, name: str) -> list[Address]:
    """Every mailbox of every ``name`` field (groups flattened)."""
    values = []
    for value in message.get_all(name) or ():
        try:
            values.append(str(value))
        except (ValueError, LookupError, IndexError, email.errors.MessageError):
            continue
    return [Address(no_nul(display), no_nul(spec))
            for display, spec in email.utils.getaddresses(values) if spec or display]


def date_of(message: Message) -> float | None:
    try:
        value = message.get("Date")
        parsed = email.utils.parsedate_to_datetime(str(value)) if value else None
    except (TypeError, ValueError, IndexError, LookupError, email.errors.MessageError):
        return None
    return parsed.timestamp() if parsed else None


def html_to_text(markup: str) -> str:
    """Text of an HTML body for the snippet and search: tags, scripts and styles dropped."""
    return html.unescape(_TAG.sub(" ", markup)) if markup else ""
