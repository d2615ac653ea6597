"""The lab inbox's rows as both backends store them (SQLite: mta/store/sqlite/entries.py,
PostgreSQL: mta/store/postgresql/entries.py): the same columns, the same encodings.

An entry row keeps what the list shows (addresses as JSON ``[[name, address], ...]``)
and, lower-cased and cleaned as Mailpit cleans search text, what the field searches
match (``find_*``). Plain functions, no driver: the backends differ in their SQL only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from mta.inbox.model import Address, InboxEntry, InboxSummary
from mta.inbox.search import clean_text

# Columns of an entry as the list needs them, in the order row_to_entry reads them.
ENTRY_COLUMNS = ("e.no, e.id, e.queue_id, e.created, e.size, e.read, e.message_id, e.from_name, e.from_address,"
                 " e.to_list, e.cc_list, e.bcc_list, e.reply_to_list, e.subject, e.date, e.attachments, e.snippet")


def addresses_json(addresses: Sequence[Address]) -> str:
    """A header field's addresses as the ``*_list`` columns hold them."""
    if not addresses:   # most Cc, Bcc and Reply-To
        return "[]"
    return json.dumps([[a.name, a.address] for a in addresses], ensure_ascii=False, separators=(",", ":"))


def find_text(addresses: Sequence[Address]) -> str:
    """A header field's addresses as the ``find_*`` columns hold them (what field searches match)."""
    # " ; " between addresses: a cleaned needle has no ';', so it never spans two of them.
    return " ; ".join(clean_text(f"{a.name} {a.address}") for a in addresses)


def summary_columns(s: InboxSummary) -> tuple[Any, ...]:
    """message_id, from_name, from_address, to_list, cc_list, bcc_list, reply_to_list, subject,
    date, attachments, snippet, find_from, find_to, find_cc, find_bcc, find_reply_to,
    find_subject, find_message_id: an entry's columns from its summary, in that order."""
    from_ = s.from_
    return (s.message_id, from_.name if from_ else None, from_.address if from_ else None,
            addresses_json(s.to), addresses_json(s.cc), addresses_json(s.bcc), addresses_json(s.reply_to),
            s.subject, s.date, s.attachments, s.snippet, find_text(() if from_ is None else (from_,)),
            find_text(s.to), find_text(s.cc), find_text(s.bcc), find_text(s.reply_to), s.subject.lower(),
            clean_text(s.message_id))


def _addresses(text: str) -> tuple[Address, ...]:
    return tuple(Address(str(name), str(address)) for name, address in json.loads(text))


def row_to_entry(row: Sequence[Any], tags: Iterable[str], mailboxes: Iterable[str]) -> InboxEntry:
    """An InboxEntry from a row of ENTRY_COLUMNS."""
    (_no, entry_id, queue_id, created, size, read, message_id, from_name, from_address, to, cc, bcc, reply_to,
     subject, date, attachments, snippet) = row
    summary = InboxSummary(
        message_id=str(message_id),
        from_=None if from_address is None else Address(str(from_name or ""), str(from_address)),
        to=_addresses(to), cc=_addresses(cc), bcc=_addresses(bcc), reply_to=_addresses(reply_to),
        subject=str(subject), date=None if date is None else float(date), attachments=int(attachments),
        snippet=str(snippet))
    return InboxEntry(id=str(entry_id), queue_id=str(queue_id), created=float(created), size=int(size),
                      read=bool(read), summary=summary, tags=tuple(sorted(tags)),
                      mailboxes=tuple(sorted(mailboxes)))


def like_pattern(text: str) -> str:
    """``%text%`` for ``LIKE ... ESCAPE '\\'``: the text's own % and _ match only themselves."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
