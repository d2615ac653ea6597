"""Queue rows as both backends read them for `mta queue show` (SQLite:
mta/store/sqlite/admin.py, PostgreSQL: mta/store/postgresql/admin.py): the same
columns in the same order, so one function turns them into the interface's records.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from mta.model import QueuedMessage, RcptState, Recipient
from mta.store.api import HistoryEntry, MessageDetail, QueueEntry

RCPT_STATES = {str(s): s for s in RcptState}
PENDING_SQL = "('queued', 'active', 'deferred', 'held')"   # the states `mta queue list` shows


async def entries_from_rows(batches: AsyncIterator[Sequence[Sequence[Any]]]
                            ) -> AsyncGenerator[list[QueueEntry], None]:
    """`mta queue list`'s messages from batches of rows (id, sender, arrival, size, address,
    state, attempts, next_attempt, last_error) ordered by message, then recipient: each
    message whole in one list, its queue named as classify_message() names it."""
    entry: QueueEntry | None = None
    current = None
    async for rows in batches:
        done: list[QueueEntry] = []
        for row in rows:
            if row[0] != current:
                if entry is not None:
                    done.append(entry)
                current = row[0]
                entry = QueueEntry("deferred", current, row[1], row[2], row[3], [])
                append = entry.recipients.append
            append(tuple(row[4:]))
            # classify_message(), one recipient at a time
            state = row[5]
            if state != "deferred" and entry.queue_name != "hold":  # type: ignore[union-attr]
                entry.queue_name = "hold" if state == "held" else "active"  # type: ignore[union-attr]
        if done:
            yield done
    if entry is not None:
        yield [entry]


def detail_from_rows(row: Sequence[Any], rcpt_rows: Sequence[Sequence[Any]],
                     history_rows: Sequence[Sequence[Any]]) -> MessageDetail:
    """``row``: the message's id, sender, arrival, size, client, listener, smtputf8,
    body_8bit, ret, envid, helo, auth_user and body; ``rcpt_rows``: address, state,
    attempts, next_attempt, last_error, notify, orcpt; ``history_rows``: time,
    recipient, event, detail."""
    (mid, sender, arrival, size, client, listener, smtputf8, body_8bit, ret, envid,
     helo, auth_user, data) = row
    recipients = tuple(
        Recipient(address=str(a), state=RCPT_STATES[str(s)], attempts=int(n), next_attempt=float(t),
                  last_error=e, notify=nt, orcpt=o)
        for a, s, n, t, e, nt, o in rcpt_rows)
    message = QueuedMessage(id=str(mid), sender=str(sender), arrival=float(arrival), size=int(size),
                            recipients=recipients, client=str(client), listener=str(listener),
                            smtputf8=bool(smtputf8), body_8bit=bool(body_8bit), ret=ret, envid=envid)
    history = tuple(HistoryEntry(float(t), r, str(ev), d) for t, r, ev, d in history_rows)
    return MessageDetail(message, str(helo), auth_user, bytes(data), history)
