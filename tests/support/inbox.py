"""Lab mail for the inbox tests (test_inbox_store.py, test_postgresql_inbox.py): messages
with the header fields the list and the search read, and local delivery's copies of
them stored through the queue as the delivery process stores them."""

from __future__ import annotations

import time
from email.message import EmailMessage
from typing import Any

from mta.inbox.summary import summarize
from mta.mailbox.local import delivery_headers
from mta.model import MailboxCopy, NewMessage, RcptState, Recipient
from mta.store.api import RecipientUpdate

SENDER = "app@example.test"


def message(subject: str = "hello", *, from_: str = "App <app@example.test>", to: str = "alice@lab.test",
            cc: str | None = None, bcc: str | None = None, reply_to: str | None = None,
            message_id: str = "<m1@example.test>", body: str = "the body text\n", attachment: bool = False,
            date: str = "Tue, 02 Jan 2024 10:00:00 +0000") -> bytes:
    """A message as an application sends it (CRLF line ends)."""
    m = EmailMessage()
    m["From"] = from_
    m["To"] = to
    for name, value in (("Cc", cc), ("Bcc", bcc), ("Reply-To", reply_to)):
        if value:
            m[name] = value
    m["Subject"] = subject
    m["Message-ID"] = message_id
    m["Date"] = date
    m.set_content(body)
    if attachment:
        m.add_attachment(b"%PDF-1.4 report", maintype="application", subtype="pdf", filename="report.pdf")
    return m.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def copy(mailbox: str, queue_id: str, data: bytes, arrival: float, *, with_summary: bool = True,
         max_messages: int = 10_000) -> MailboxCopy:
    """As local delivery makes it (mta/mailbox/local.py): trace lines on top, summary parsed once."""
    return MailboxCopy(mailbox, queue_id, SENDER, "", delivery_headers(SENDER, mailbox, None) + data, arrival,
                       max_messages, summarize(data) if with_summary else None)


async def deliver(store: Any, queue_id: str, data: bytes, mailboxes: list[str], *,
                  arrival: float | None = None, with_summary: bool = True, max_messages: int = 10_000) -> float:
    """Enqueue a message for ``mailboxes`` and record them all delivered in one attempt."""
    arrival = time.time() if arrival is None else arrival
    await store.queue.enqueue(NewMessage(id=queue_id, sender=SENDER, recipients=tuple(Recipient(m) for m in mailboxes),
                                         data=data, arrival=arrival))
    await claim_all(store)
    updates = [RecipientUpdate(i, RcptState.DELIVERED, 1, 0.0, None) for i in range(len(mailboxes))]
    copies = [copy(m, queue_id, data, arrival, with_summary=with_summary, max_messages=max_messages)
              for m in mailboxes]
    assert await store.queue.record_outcomes(queue_id, updates, time.time(), mailbox_copies=copies)
    return arrival


async def claim_all(store: Any) -> None:
    """Claim every recipient due within the hour, as the queue manager does before it
    records their outcomes (on PostgreSQL an outcome needs the claim's lease)."""
    await store.queue.claim(time.time() + 3600, 1000)
