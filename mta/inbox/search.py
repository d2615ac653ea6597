"""Mailpit's search language, parsed into :class:`mta.inbox.model.SearchTerm`s.

A query is words separated by spaces; double quotes group words into one
("a phrase", ``subject:"two words"``). A word is a free word (matched against
the message's search text: addresses, subject, body text) or ``field:value``;
a leading ``-`` or ``!`` negates it. Every term must match (AND). Matching is a
case-insensitive substring match, as Mailpit's. The fields are Mailpit's
(``internal/storage/search.go``): ``to: from: cc: bcc: reply-to: addressed:
subject: message-id: tag:``, ``is:read is:unread is:tagged``,
``has:attachment``, ``before: after:`` (the arrival time), ``larger: smaller:``
(the size), plus our extension ``mailbox:alice@lab.test`` (one lab mailbox).

Where Mailpit silently ignores a bad date it is an error here: a test suite
that searched ``before:yesterday`` should be told, not get every message.
"""

from __future__ import annotations

import datetime
import email.utils
import re
from collections.abc import Sequence
from dataclasses import replace

from mta.inbox.model import SearchTerm

__all__ = ["ADDRESS_FIELDS", "FIELDS", "SearchError", "clean_text", "needle", "parse_date", "parse_query",
           "parse_size", "with_timezone"]


class SearchError(ValueError):
    """A query that cannot be searched; str() is a one-line reason for the client."""


# Fields whose value is matched as a substring of their text.
ADDRESS_FIELDS = ("to", "from", "cc", "bcc", "reply-to", "addressed")
TEXT_FIELDS = (*ADDRESS_FIELDS, "subject", "message-id")
# Every field a SearchTerm may carry ("is" and "has" hold a flag: read, unread, tagged, attachment).
FIELDS = (*TEXT_FIELDS, "tag", "is", "has", "before", "after", "larger", "smaller", "mailbox")

_FLAGS = {"is": ("read", "unread", "tagged"), "has": ("attachment", "attachments")}
_PREFIXED = tuple(f for f in FIELDS if f not in _FLAGS)
_WORDY = re.compile(r"\w")   # Mailpit skips terms without a letter or digit ("-", "!!", '""')
# Characters Mailpit's cleanString turns into spaces, in stored text and in free words alike.
_CLEAN = str.maketrans({c: " " for c in '\r\n\t<>",;()\ufeff'})
_SPACE = re.compile(r"\s+")


def parse_query(text: str) -> list[SearchTerm]:
    """The terms of a query, in order; [] for an empty one. SearchError for a bad
    date or size (the reason names the term)."""
    terms = []
    for word in split_words(text):
        term = _term(word)
        if term is not None:
            terms.append(term)
    return terms


def split_words(text: str) -> list[str]:
    """Split on spaces outside double quotes; the quotes stay in the words (as Mailpit's
    ArgsParser does), so ``subject:"a b"`` is one word. An unclosed quote runs to the end."""
    words, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
            current.append(char)
        elif char.isspace() and not quoted:
            if current:
                words.append("".join(current))
            current = []
        else:
            current.append(char)
    if current:
        words.append("".join(current))
    return words


def _term(word: str) -> SearchTerm | None:
    negated = False
    if len(word) > 1 and word[0] in "-!":
        negated, word = True, word[1:]
    if not _WORDY.search(word):
        return None
    lower = word.lower()
    for name, flags in _FLAGS.items():
        if lower.startswith(name + ":"):
            flag = _unquote(lower[len(name) + 1:])
            if flag in flags:
                return SearchTerm(name, flag.rstrip("s") if name == "has" else flag, negated)
            if name == "has" and flag in ("inline", "inlines"):
                raise SearchError(f"{word}: inline parts are not searchable here; has:attachment is")
            break   # as Mailpit: any other is:/has: word is a free word
    for name in _PREFIXED:
        if lower.startswith(name + ":"):
            value = _unquote(word[len(name) + 1:]).strip()
            if not _WORDY.search(value):
                return None   # "subject:" alone: Mailpit ignores it
            _check(name, value, word)
            return SearchTerm(name, value, negated)
    value = _unquote(word).strip()
    return SearchTerm(None, value, negated) if clean_text(value) else None


def _unquote(value: str) -> str:
    return value.replace('"', "")


def _check(name: str, value: str, word: str) -> None:
    if name in ("before", "after"):
        try:
            parse_date(value)
        except ValueError:
            raise SearchError(f"{word}: not a date (use YYYY-MM-DD, YYYY-MM-DD HH:MM, an RFC 5322 date"
                              " or a POSIX time)") from None
    elif name in ("larger", "smaller"):
        try:
            parse_size(value)
        except ValueError:
            raise SearchError(f"{word}: not a size (use bytes, or k/kb/m/mb as in 10k, 1.5mb)") from None


# --------------------------------------------------------------------------- values

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s?([a-z]{1,2})?$")
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024 * 1024, "mb": 1024 * 1024}


def parse_size(value: str) -> int:
    """Bytes from a size as Mailpit reads it: 500, 10k, 2M, 1.5mb (K and M are 1024,
    as in Mailpit's sizeToBytes). ValueError if it is none."""
    m = _SIZE.match(value.strip().lower())
    if m is None or m.group(2) not in _UNITS.keys() | {None}:
        raise ValueError(f"not a size: {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


# Formats tried after ISO 8601 (datetime.fromisoformat: 2024-01-31, 2024-01-31 10:00,
# 2024-01-31T10:00:00Z, +02:00 offsets). Mailpit's dateparse reads many more; these are
# the ones people type. A date without a zone is local time, as Mailpit's ParseLocal.
_FORMATS = ("%Y/%m/%d", "%Y/%m/%d %H:%M", "%Y/%m/%d %H:%M:%S", "%m/%d/%Y", "%m/%d/%Y %H:%M",
            "%d %b %Y", "%d %B %Y", "%b %d %Y", "%B %d %Y", "%b %d, %Y", "%B %d, %Y",
            "%d %b %Y %H:%M", "%d %b %Y %H:%M:%S")


def parse_date(value: str, tz: datetime.tzinfo | None = None) -> float:
    """A POSIX time from a date as written in ``before:``/``after:``: ISO 8601, the
    formats above, an RFC 5322 date, or a POSIX time in seconds (10 digits, or with a
    fraction) or milliseconds (13 digits). A date without a zone is read in ``tz``
    (None: the local time zone). ValueError if it is none of those."""
    text = _SPACE.sub(" ", value.strip())
    if re.fullmatch(r"\d{13}", text):
        return int(text) / 1000
    if re.fullmatch(r"\d{9,10}|\d+\.\d+", text):
        return float(text)
    parsed: datetime.datetime | None = None
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        for fmt in _FORMATS:
            try:
                parsed = datetime.datetime.strptime(text, fmt)
                break
            except ValueError:
                continue
    if parsed is None:
        try:
            parsed = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            parsed = None
    if parsed is None:
        raise ValueError(f"not a date: {value!r}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz) if tz is not None else parsed.astimezone()
    return parsed.timestamp()


def with_timezone(terms: Sequence[SearchTerm], tz: datetime.tzinfo) -> list[SearchTerm]:
    """``terms`` with the dates of before:/after: read in ``tz`` (Mailpit's ``tz``
    parameter) and written as POSIX times, which the store reads as such."""
    return [replace(t, value=repr(parse_date(t.value, tz))) if t.field in ("before", "after") else t
            for t in terms]


# --------------------------------------------------------------------------- matching

def clean_text(text: str) -> str:
    """Text as free words match it, on both sides (Mailpit's cleanString): lower case,
    ``<>",;()`` and line breaks as spaces, runs of spaces as one."""
    # translate and split/join: a few µs for a body's text, where two regex passes took 15
    # (every local delivery stores one, mta/store/sqlite/entries.py).
    return " ".join(text.translate(_CLEAN).split()).lower()


def needle(term: SearchTerm) -> str:
    """What a text term looks for, lower-cased: a substring of the field's stored
    (lower-cased) text. Free words and addresses are cleaned as Mailpit cleans them;
    subjects only lower-cased (Mailpit matches them as written)."""
    if term.field in (None, *ADDRESS_FIELDS, "message-id"):
        return clean_text(term.value)
    return term.value.lower()
