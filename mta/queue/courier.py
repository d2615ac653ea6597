"""Couriers: what the queue manager hands a message to, and what it gets back.

As chasquid's local and remote couriers: the queue manager asks its couriers,
in order, which one takes a recipient (:meth:`Courier.destination` returns a
destination key, or None for "not mine"), groups a message's recipients by
that key into jobs, and calls :meth:`Courier.deliver` once per job. It gets
one :class:`mta.model.Outcome` per recipient back; it alone decides what
follows (deliver, defer, bounce) and records it. SMTP delivery
(mta.delivery.router.Router) and local mailbox delivery
(mta.mailbox.local.LocalCourier) both satisfy :class:`Courier`; a local
outcome carries the mailbox copy, stored in the commit that records it.

This module imports neither mailbox/ nor delivery/: they depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mta.model import Outcome


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message for the recipients of one destination: one courier call (one SMTP transaction)."""

    message_id: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool = False
    body_8bit: bool = False
    # RFC 3461 parameters, passed on when the next hop offers DSN (§5.2).
    ret: str | None = None
    envid: str | None = None
    notify: tuple[str | None, ...] = ()   # per recipient, aligned with ``recipients``
    orcpt: tuple[str | None, ...] = ()
    arrival: float = 0.0                  # when the message entered the queue (mailboxes keep this order)


class Courier(Protocol):
    """What the queue manager needs of a way to deliver."""

    def destination(self, recipient: str) -> str | None:
        """The key that groups ``recipient`` with others delivered together (one job),
        or None when this courier does not take it."""
        ...

    async def deliver(self, delivery: Delivery) -> Sequence[Outcome]:
        """Deliver to every recipient of ``delivery``; one Outcome each. Problems are
        outcomes (a reply to defer or bounce with), never exceptions."""
        ...
