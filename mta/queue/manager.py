"""The queue manager: claims due recipients, hands them to couriers, records outcomes.

Like Postfix's qmgr it owns the retry schedule and the concurrency limits, and
it alone writes delivery results to the queue; its couriers (mta/queue/courier.py:
SMTP, local mailboxes) only return one outcome per recipient. It sees the store
through mta.store.api.Queue only. Fresh mail wakes it at once (the store calls
:meth:`QueueManager.wake` after each commit); deferred mail is picked up when its
next attempt time comes. Claimed work is grouped by destination (one SMTP
transaction per message and destination) and runs with at most
``concurrency`` deliveries in all and ``per_destination_concurrency`` per
destination; a destination's worker keeps taking its jobs, so a cached
connection is reused while that destination has work.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from mta.config import DeliveryConfig
from mta.errors import StoreError
from mta.model import LOCAL_RELAY, NewMessage, Outcome, RcptState, Reply
from mta.queue.backoff import expired, next_delay
from mta.queue.courier import Courier, Delivery
from mta.queue.reports import AttemptResult, Report, reports_for
from mta.store.api import Claimed, DueRecipient, HistoryEntry, Queue, RecipientUpdate

log = logging.getLogger("mta.qmgr")

POLL_INTERVAL = 1.0  # upper bound on how late flushes and due retries are noticed
CLAIM_LIMIT = 1000   # recipients held in memory at once; the rest wait in SQLite
# Message bodies read together with a claim (one database round trip instead of one
# per message); bigger batches are read when their job starts, so memory stays small.
PREFETCH_BYTES = 1 << 20
# A queue write that failed (disk full, I/O error, a file locked too long) is tried
# again after these waits, doubling: the condition is usually temporary.
STORE_RETRY_MIN, STORE_RETRY_MAX = 0.2, 5.0

T = TypeVar("T")


@dataclass(slots=True)
class Job:
    """One message to one destination: one courier call (one SMTP transaction)."""

    destination: str
    message_id: str
    courier: Courier | None = None   # the courier that took the destination (None: none did)
    recipients: list[DueRecipient] = field(default_factory=list)
    claimed: float = 0.0   # when the queue manager took it (delays= a ends, b starts)
    started: float = 0.0   # when a delivery slot took it up (delays= b ends)

    @property
    def fresh(self) -> bool:
        return all(r.attempts == 0 for r in self.recipients)


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What happened to one recipient, for logs and metrics."""

    message_id: str
    recipient: str
    state: RcptState
    reply: Reply
    relay: str
    delay: float
    attempts: int
    # Postfix's delays=a/b/c/d: before the queue manager, in it (waiting for a slot),
    # connection set-up, transmission.
    delays: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


class _SharedBodies:
    """One read of a message's bytes for all of its jobs in memory: a message to ten
    domains is ten jobs, and each queue read costs a thread hand-off."""

    def __init__(self, load: Callable[[str], Awaitable[bytes | None]]):
        self._load = load
        self._users: collections.Counter[str] = collections.Counter()
        self._reads: dict[str, asyncio.Future[bytes | None]] = {}

    def hold(self, message_id: str) -> None:
        self._users[message_id] += 1

    def preload(self, message_id: str, data: bytes) -> None:
        """Bytes read with the claim: the jobs of a held message need no read of their own."""
        if self._users[message_id] > 0 and message_id not in self._reads:
            read: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
            read.set_result(data)
            self._reads[message_id] = read

    async def get(self, message_id: str) -> bytes | None:
        read = self._reads.get(message_id)
        if read is None:
            read = self._reads[message_id] = asyncio.ensure_future(self._load(message_id))
        return await asyncio.shield(read)

    def release(self, message_id: str) -> None:
        self._users[message_id] -= 1
        if self._users[message_id] <= 0:
            del self._users[message_id]
            self._reads.pop(message_id, None)


class QueueManager:
    def __init__(self, store: Queue, couriers: Sequence[Courier], config: DeliveryConfig, *,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 on_result: Callable[[RecipientResult], None] | None = None,
                 make_report: Callable[[Job, bytes, Sequence[Report], float], NewMessage | None] | None = None):
        self.store = store
        # Asked in order which one takes a recipient: the local mailboxes, then SMTP (takes all).
        self.couriers = tuple(couriers)
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_result = on_result or (lambda result: None)
        self.make_report = make_report or (lambda job, data, reports, now: None)
        self._queues: dict[str, collections.deque[Job]] = {}
        self._running: collections.Counter[str] = collections.Counter()
        self._workers: set[asyncio.Task[None]] = set()
        self._claimed = 0
        # (message id, rcpt_no) of every recipient claimed and not yet finished. An
        # operator's hold then release during a delivery makes the recipient due
        # again while its attempt is still running; claimed a second time, it must
        # not be delivered twice at once (the running attempt records its result).
        self._in_flight: set[tuple[str, int]] = set()
        self._bodies = _SharedBodies(store.message_data)
        self._wake = asyncio.Event()
        self._stopping = False
        # Queue writes being retried after a disk-full failure: health queue_storage is
        # set while there is any (see _until_stored).
        self._disk_full_writes = 0

    # ------------------------------------------------------------------ control
    def wake(self, *_: object) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return self._claimed

    async def run(self) -> None:
        # A failed queue write must not end the queue manager (the daemon would stop):
        # on a full disk, delivering what is queued is exactly what frees space.
        recovered = await self._until_stored("recovering recipients left in flight",
                                             self.store.recover_in_flight, while_stopping=False)
        if recovered:
            log.info("%d recipient(s) left in flight by an earlier run are due again", recovered)
        while not self._stopping:
            self._wake.clear()
            room = CLAIM_LIMIT - self._claimed
            next_due: float | None = None
            if room > 0:
                claimed = await self._until_stored("claiming due recipients", partial(self._claim, room),
                                                   while_stopping=False)
                if claimed is None:
                    break   # stopping
                if claimed.due:
                    self._enqueue_jobs(claimed.due, claimed.bodies)
                    if len(claimed.due) == room:
                        continue  # there may be more due right now
                next_due = claimed.next_due
            else:
                next_due = await self.store.next_due_time()
            await self._sleep_until_due(next_due)

    def _claim(self, room: int) -> Awaitable[Claimed]:
        return self.store.claim(self.clock(), room, prefetch_bytes=PREFETCH_BYTES)

    async def _until_stored(self, what: str, write: Callable[[], Awaitable[T]], *,
                            while_stopping: bool) -> T | None:
        """``write()``, tried again after a StoreError until it succeeds; None once the
        scheduler is stopping, unless ``while_stopping`` (then until cancelled)."""
        delay = STORE_RETRY_MIN
        disk_full = False   # this write is one of self._disk_full_writes
        try:
            while True:
                try:
                    return await write()
                except StoreError as exc:
                    if exc.disk_full:
                        # The store split its batch and this write did not fit even alone:
                        # until it commits, the queue manager cannot record what it does.
                        # Refusing new mail below the reserve (452) is back-pressure, not this.
                        if not disk_full:
                            disk_full = True
                            self._disk_full_writes += 1
                        self.store.health.fail("queue_storage",
                                               f"queue writes fail, disk full: {self.store.space_report()}")
                    if self._stopping and not while_stopping:
                        return None
                    log.warning("queue write failed while %s, trying again in %.1fs: %s", what, delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, STORE_RETRY_MAX)
        finally:
            if disk_full:
                self._disk_full_writes -= 1
                if not self._disk_full_writes:
                    self.store.health.clear("queue_storage")

    async def _sleep_until_due(self, next_due: float | None) -> None:
        timeout = POLL_INTERVAL
        if next_due is not None:
            timeout = min(timeout, max(0.0, next_due - self.clock()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let deliveries in progress finish for up to ``grace`` s."""
        self._stopping = True
        self.wake()
        waiting = [job for queue in self._queues.values() for job in queue]
        for queue in self._queues.values():
            queue.clear()  # workers stop taking jobs; these go back to the queue untried
        for job in waiting:
            try:
                await self.store.give_back(job.message_id, [r.rcpt_no for r in job.recipients])
            except StoreError as exc:   # left 'active': recover_in_flight() at the next start
                log.warning("%s: could not return claimed recipients to the queue: %s", job.message_id, exc)
            self._finished(job)
        if self._workers:
            done, pending = await asyncio.wait(self._workers, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def _finished(self, job: Job) -> None:
        """The job's recipients are recorded or given back: no longer claimed here."""
        self._claimed -= len(job.recipients)
        self._in_flight.difference_update((job.message_id, r.rcpt_no) for r in job.recipients)
        self._bodies.release(job.message_id)

    # ------------------------------------------------------------------ dispatch
    def _enqueue_jobs(self, due: Sequence[DueRecipient], bodies: dict[str, bytes]) -> None:
        jobs: dict[tuple[str, str], Job] = {}
        claimed = self.clock()
        for rcpt in due:
            if (rcpt.message_id, rcpt.rcpt_no) in self._in_flight:
                log.debug("%s: recipient %d is already being delivered", rcpt.message_id, rcpt.rcpt_no)
                continue
            self._in_flight.add((rcpt.message_id, rcpt.rcpt_no))
            courier, destination = self._courier_for(rcpt.address)
            key = (rcpt.message_id, destination)
            if key not in jobs:
                jobs[key] = Job(destination, rcpt.message_id, courier, claimed=claimed)
            jobs[key].recipients.append(rcpt)
        for job in jobs.values():
            queue = self._queues.setdefault(job.destination, collections.deque())
            # Fresh mail goes ahead of retries to the same destination: a backlog
            # of deferred mail must not hold up new mail (Postfix qmgr does the same).
            if job.fresh:
                queue.appendleft(job)
            else:
                queue.append(job)
            self._claimed += len(job.recipients)
            self._bodies.hold(job.message_id)
        for message_id, data in bodies.items():
            self._bodies.preload(message_id, data)
        self._dispatch()

    def _courier_for(self, address: str) -> tuple[Courier | None, str]:
        for courier in self.couriers:
            destination = courier.destination(address)
            if destination is not None:
                return courier, destination
        return None, "none"

    def _dispatch(self) -> None:
        for destination, queue in list(self._queues.items()):
            while (queue and self._running[destination] < self.config.per_destination_concurrency
                   and len(self._workers) < self.config.concurrency and not self._stopping):
                self._running[destination] += 1
                task = asyncio.create_task(self._destination_worker(destination),
                                           name=f"delivery:{destination}")
                self._workers.add(task)
                task.add_done_callback(self._destination_worker_done)
            if not queue and not self._running[destination]:
                del self._queues[destination]
                del self._running[destination]

    def _destination_worker_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery worker failed: %r", task.exception(), exc_info=task.exception())
        if not self._stopping:
            self._dispatch()
            self.wake()

    async def _destination_worker(self, destination: str) -> None:
        try:
            queue = self._queues.get(destination)
            while queue and not self._stopping:
                job = queue.popleft()
                try:
                    await self._run_job(job)
                finally:
                    self._finished(job)
        finally:
            self._running[destination] -= 1

    # ------------------------------------------------------------------ one job
    async def _run_job(self, job: Job) -> None:
        job.started = self.clock()
        data = await self._bodies.get(job.message_id)
        if data is None:
            return  # deleted by an operator meanwhile
        if job.courier is None:   # no courier takes these recipients: a configuration fault, retried
            reply = Reply(451, "4.3.0", "no delivery method for this recipient")
            await self._record(job, [Outcome(r.address, reply, "none") for r in job.recipients], data)
            return
        try:
            outcomes = await job.courier.deliver(_delivery(job, data))
        except asyncio.CancelledError:
            # A failure leaves them 'active': recover_in_flight() makes them due at the next start.
            with contextlib.suppress(StoreError):
                await asyncio.shield(self.store.give_back(job.message_id, [r.rcpt_no for r in job.recipients]))
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in delivery defers; it never loses mail
            log.exception("%s: delivery to %s failed unexpectedly", job.message_id, job.destination)
            reply = Reply(451, "4.3.0", f"local error in delivery: {exc.__class__.__name__}")
            outcomes = [Outcome(r.address, reply, "none") for r in job.recipients]
        await self._record(job, outcomes, data)

    async def _record(self, job: Job, outcomes: Sequence[Outcome], data: bytes) -> None:
        now = self.clock()
        by_address: dict[str, Outcome] = {o.recipient: o for o in outcomes}
        updates: list[RecipientUpdate] = []
        results: list[RecipientResult] = []
        used: list[Outcome] = []
        for rcpt in job.recipients:
            outcome = by_address.get(rcpt.address) or Outcome(
                rcpt.address, Reply(451, "4.3.0", "no outcome from delivery"), "none")
            used.append(outcome)
            update = self._decide(rcpt, outcome.reply, now)
            updates.append(update)
            before = max(0.0, job.claimed - rcpt.arrival) if job.claimed else 0.0
            waiting = max(0.0, job.started - job.claimed) if job.started and job.claimed else 0.0
            results.append(RecipientResult(job.message_id, rcpt.address, update.state, outcome.reply,
                                           outcome.relay, now - rcpt.arrival, update.attempts,
                                           (before, waiting, outcome.setup, outcome.transmission)))
        history = [HistoryEntry(now, r.recipient, _STATUS[r.state], f"relay={r.relay} ({r.reply})")
                   for r in results]
        attempts = [AttemptResult(rcpt, res.state, res.reply, res.relay, outcome.dsn_passed)
                    for rcpt, res, outcome in zip(job.recipients, results, used, strict=True)]
        reports = reports_for(attempts, self.config.retry, now)
        report = self.make_report(job, data, reports, now) if reports else None
        # Local delivery's copies go in the commit that marks their recipients delivered. From
        # every outcome, not by address: rewritten recipients (postmaster) share one address.
        mailbox_copies = [o.mailbox_copy for o in outcomes if o.mailbox_copy is not None]
        # Until it is written, the outcome exists only here: keep trying (a full disk frees
        # up as deliveries remove mail). Giving up would leave the recipients 'active', to
        # be sent again after a restart -- a duplicate for every delivered one.
        finished = await self._until_stored(
            f"recording the delivery of {job.message_id}",
            lambda: self.store.record_outcomes(
                job.message_id, updates, now, history=history, new_messages=[report] if report else [],
                delay_warned=any(r.action == "delayed" for r in reports),
                mailbox_copies=mailbox_copies),
            while_stopping=True)
        for result in results:
            _log_result(result)
            self.on_result(result)
        if report is not None:
            kind = {"failed": "non-delivery", "delayed": "delay", "relayed": "delivery",
                    "delivered": "delivery"}[reports[0].action]
            log.info("%s: sender %s notification: %s", job.message_id, kind, report.id)
        if finished:
            log.info("%s: removed", job.message_id)

    def _decide(self, rcpt: DueRecipient, reply: Reply, now: float) -> RecipientUpdate:
        attempts = rcpt.attempts + 1
        if 200 <= reply.code < 300:
            return RecipientUpdate(rcpt.rcpt_no, RcptState.DELIVERED, attempts, now, None)
        if reply.permanent or expired(rcpt.arrival, now, self.config.retry):
            # RFC 5321 §4.5.4.1: give up after the retry period with the last error.
            return RecipientUpdate(rcpt.rcpt_no, RcptState.BOUNCED, attempts, now, str(reply))
        delay = next_delay(attempts, self.config.retry, self.rng)
        return RecipientUpdate(rcpt.rcpt_no, RcptState.DEFERRED, attempts, now + delay, str(reply))


_STATUS = {RcptState.DELIVERED: "sent", RcptState.DEFERRED: "deferred", RcptState.BOUNCED: "bounced"}


def _delivery(job: Job, data: bytes) -> Delivery:
    """What a courier is handed for ``job``: the envelope of its recipients and the bytes."""
    first = job.recipients[0]
    return Delivery(message_id=job.message_id, sender=first.sender,
                    recipients=tuple(r.address for r in job.recipients), data=data,
                    smtputf8=first.smtputf8, body_8bit=first.body_8bit, ret=first.ret, envid=first.envid,
                    notify=tuple(r.notify for r in job.recipients), orcpt=tuple(r.orcpt for r in job.recipients),
                    arrival=first.arrival)


def seconds(value: float) -> str:
    """A duration as Postfix logs delay=: at most two decimals, no trailing zeros, never
    scientific notation ("0.41", "1.2", "710", "0"), which log parsers read as a number."""
    text = f"{max(0.0, value):.2f}".rstrip("0").rstrip(".")
    return text or "0"


def _log_result(result: RecipientResult) -> None:
    """Postfix's per-recipient line, so operators grep what they already grep."""
    reply = result.reply
    text = f"{reply.code} {reply.enhanced} {reply.text}" if reply.code else reply.text
    if result.relay == LOCAL_RELAY:
        text = reply.text   # Postfix local(8): "status=sent (delivered to mailbox)"
    if result.state is RcptState.BOUNCED and reply.transient:
        text = f"{text} (delivery time expired)"
    # Postfix's field order, which log parsers match (pflogsumm: relay=, delay=, delays=, dsn=,
    # status=): the attempt count is in `mta queue show`, not here.
    log.info("%s: to=<%s>, relay=%s, delay=%s, delays=%s, dsn=%s, status=%s (%s)",
             result.message_id, result.recipient, result.relay, seconds(result.delay),
             "/".join(seconds(d) for d in result.delays), reply.enhanced,
             _STATUS.get(result.state, str(result.state)), text)
