"""The delivery side of the daemon: queue manager, its couriers and the connection cache.

Postfix's qmgr with its smtp clients and local(8) (here the couriers: local
mailboxes first, then the SMTP router), composed in one object so
that the daemon can run it on its own event loop in the same process (tests,
one core) or in a process of its own (``mta/daemon/delivery_process.py``) while the listeners
keep the first core busy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from mta import bounce
from mta.config import Config
from mta.delivery.mx import MXResolver
from mta.delivery.pool import ConnectionPool
from mta.delivery.router import Router
from mta.mailbox.local import LocalCourier
from mta.mailbox.users import MailboxUsers
from mta.model import NewMessage, Recipient
from mta.queue.manager import Job, QueueManager, RecipientResult
from mta.queue.reports import BOUNCE_LISTENER, DOUBLE_BOUNCE_LISTENER, Report
from mta.store.api import Queue, new_queue_id

log = logging.getLogger("mta.delivery")


class DeliveryMetrics(Protocol):
    """What the delivery side reports (mta.metrics.Metrics, or a forwarder to it)."""

    def recipient_result(self, result: RecipientResult) -> None: ...
    def bounce_generated(self) -> None: ...
    def attach_pool(self, pool: ConnectionPool | None) -> None: ...


class DeliverySide:
    def __init__(self, config: Config, store: Queue, metrics: DeliveryMetrics,
                 own_sockets: frozenset[tuple[str, int]]):
        self.config = config
        self.store = store
        self.metrics = metrics
        delivery = config.delivery
        self.pool = ConnectionPool(
            max_messages=delivery.connection_cache.max_messages,
            idle_timeout=delivery.connection_cache.idle_timeout,
            per_destination=delivery.per_destination_concurrency,
            max_idle_total=delivery.concurrency,
        )
        self.router = Router(delivery, config.hostname, MXResolver(delivery.dns), self.pool,
                             own_sockets=own_sockets)
        metrics.attach_pool(self.pool)
        # Mail for local_domains goes into mailboxes; the users are replaced on reload.
        self.local = LocalCourier(MailboxUsers(config, health=store.health), config.mailboxes.max_messages)
        self.scheduler = QueueManager(store, [self.local, self.router], delivery,
                                   make_report=self.make_report, on_result=metrics.recipient_result)
        store.add_listener(self.scheduler.wake)   # our own bounces wake us too
        self.task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.scheduler.run(), name="scheduler")
        return self.task

    def wake(self) -> None:
        self.scheduler.wake()

    @property
    def healthy(self) -> bool:
        return self.task is None or not self.task.done()

    def reconfigure(self, config: Config, users: MailboxUsers) -> None:
        """SIGHUP: routes, smarthost, TLS, timeouts, retry, concurrency, bounce and
        mailbox settings apply to the next delivery; the resolver's and the
        connection cache's settings need a restart (their objects are built once)."""
        old, new = self.config.delivery, config.delivery
        if new.dns != old.dns or new.connection_cache != old.connection_cache:
            log.warning("reload: changes to delivery.dns and delivery.connection_cache take effect "
                        "after a restart")
            new = replace(new, dns=old.dns, connection_cache=old.connection_cache)
        self.config = replace(config, delivery=new)
        self.router.config = new
        self.scheduler.config = new
        self.local.users = users
        self.local.max_messages = config.mailboxes.max_messages

    async def stop(self, grace: float) -> None:
        """Let running deliveries finish within ``grace``; then QUIT every cached
        session (RFC 5321 §4.1.1.10)."""
        try:
            await self.scheduler.stop(grace)
        finally:
            if self.task is not None:
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
            await self.router.close()

    def make_report(self, job: Job, data: bytes, reports: Sequence[Report], now: float) -> NewMessage | None:
        """The DSN for ``reports``, as a new message from <> (RFC 3464, RFC 5321 §4.5.5)."""
        first = job.recipients[0]
        recipient = first.sender
        listener = BOUNCE_LISTENER
        if not first.sender:
            # Never bounce a bounce. A failed report may go once to the
            # double-bounce address, and a failed double bounce nowhere.
            failed = [r for r in reports if r.action == "failed"]
            target = self.config.bounce.double_bounce_to
            if not failed or not target or first.listener == DOUBLE_BOUNCE_LISTENER:
                for r in failed:
                    log.warning("%s: undeliverable notification to <%s> discarded: %s", job.message_id,
                                r.rcpt.address, r.reply)
                return None
            reports, recipient, listener = failed, target, DOUBLE_BOUNCE_LISTENER
        queue_id = new_queue_id()
        self.metrics.bounce_generated()
        hostname = self.config.hostname
        dsn = bounce.build_dsn(
            hostname=hostname, original_queue_id=job.message_id, sender=recipient,
            original=data, arrival=first.arrival, now=now, message_id=f"{queue_id}@{hostname}",
            ret_full=first.ret == "FULL", envid=first.envid,
            recipients=[bounce.ReportedRecipient(
                address=r.rcpt.address, reply=r.reply, remote_mta=bounce.remote_mta_of(r.relay),
                last_attempt=now, action=r.action, orcpt=r.rcpt.orcpt, will_retry_until=r.will_retry_until)
                for r in reports])
        return NewMessage(id=queue_id, sender="", recipients=(Recipient(address=recipient),), data=dsn,
                          arrival=now, client="127.0.0.1", listener=listener, helo=hostname,
                          body_8bit=not dsn.isascii())

