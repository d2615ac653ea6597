"""Messages built directly for tests that talk to the queue store without SMTP."""

from __future__ import annotations

from collections.abc import Sequence

from mta.model import NewMessage, Recipient
from mta.store.api import new_queue_id


def message(n: int = 0, rcpts: Sequence[str] = ("b@example.org",)) -> NewMessage:
    """Message number ``n``: a fresh queue id, "Subject: n", arrival 1_700_000_000 + n."""
    return NewMessage(id=new_queue_id(), sender="a@lab.test",
                      recipients=tuple(Recipient(address=r) for r in rcpts),
                      data=b"Subject: %d\r\n\r\nbody\r\n" % n, arrival=1_700_000_000.0 + n,
                      client="127.0.0.1", listener="mta")
