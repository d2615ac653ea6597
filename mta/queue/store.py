"""The durable queue: the only module that speaks SQL.

One SQLite file in WAL mode with synchronous=FULL, so a commit survives a
power cut. A message row holds the envelope and the bytes; one recipient row
per RCPT carries its own state, attempts, next attempt time and last error
(chasquid keeps per-recipient state the same way), so only pending recipients
are ever retried.

Inbound sessions call :meth:`QueueStore.enqueue`, which returns only after the
transaction holding the message and its recipients has committed: the 250 is
sent after that. Concurrent sessions share commits (group commit): while one
batch is being written, new messages wait in ``_pending`` and the next commit
takes them all, so one fsync serves many messages under load.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from mta.errors import QueueDamagedError, StoreError
from mta.health import Health
from mta.mailbox.store import MIGRATION as MAILBOX_MIGRATION, MailboxCopy, insert_copies
from mta.model import NewMessage, QueuedMessage, RcptState, Recipient
from mta.queue.damage import damage_reason, is_corruption, quick_check

log = logging.getLogger("mta.queue")

T = TypeVar("T")

# Each entry migrates the schema from version i to i + 1 (PRAGMA user_version).
# Never edit a released entry: append a new one, so every old queue file upgrades.
MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the first release.
    """
    CREATE TABLE messages (
        id        TEXT PRIMARY KEY,
        sender    TEXT NOT NULL,
        arrival   REAL NOT NULL,
        size      INTEGER NOT NULL,
        client    TEXT NOT NULL DEFAULT '',
        listener  TEXT NOT NULL DEFAULT '',
        helo      TEXT NOT NULL DEFAULT '',
        auth_user TEXT,
        smtputf8  INTEGER NOT NULL DEFAULT 0,
        body_8bit INTEGER NOT NULL DEFAULT 0,
        ret       TEXT,
        envid     TEXT,
        data      BLOB NOT NULL              -- moved to `bodies` in version 4
    );
    CREATE INDEX messages_arrival ON messages(arrival);
    CREATE TABLE recipients (
        message_id   TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        rcpt_no      INTEGER NOT NULL,
        address      TEXT NOT NULL,
        state        TEXT NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL DEFAULT 0,
        last_error   TEXT,
        notify       TEXT,
        orcpt        TEXT,
        updated      REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (message_id, rcpt_no)
    ) WITHOUT ROWID;
    -- The queue manager's question is "which pending recipients are due?":
    -- this index answers it without scanning delivered or deferred rows.
    CREATE INDEX recipients_due ON recipients(state, next_attempt);
    """,
    # 1 -> 2: per-message history for `mta queue show` (delivery attempts, holds, bounces).
    """
    CREATE TABLE history (
        message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        time       REAL NOT NULL,
        recipient  TEXT,
        event      TEXT NOT NULL,            -- queued, sent, deferred, bounced, held, released, ...
        detail     TEXT
    );
    CREATE INDEX history_message ON history(message_id, time);
    """,
    # 2 -> 3: one delay warning per message at most (RFC 3464 Action: delayed).
    """
    ALTER TABLE messages ADD COLUMN delay_warned INTEGER NOT NULL DEFAULT 0;
    """,
    # 3 -> 4: message bodies in a table of their own. Envelope rows stay small,
    # so listing, claiming and counting never read a message's bytes.
    """
    CREATE TABLE bodies (
        message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        data       BLOB NOT NULL
    );
    INSERT INTO bodies (message_id, data) SELECT id, data FROM messages;
    ALTER TABLE messages DROP COLUMN data;
    """,
    # 4 -> 5: mailboxes for local_domains (mta/mailbox/store.py).
    MAILBOX_MIGRATION,
)
SCHEMA_VERSION = len(MIGRATIONS)


def _is_disk_full(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("disk is full" in text or "database or disk" in text)


@dataclass(slots=True)
class _PendingWrite:
    op: Callable[[sqlite3.Connection], Any]
    done: asyncio.Future[Any]
    urgent: bool = True   # False: may wait up to commit_delay for company in its commit
    durable: bool = True  # False: committed without an fsync of its own (see _write)


@dataclass(frozen=True, slots=True)
class DueRecipient:
    """A recipient claimed for delivery, with what the delivery needs of its message."""

    message_id: str
    rcpt_no: int
    address: str
    attempts: int
    last_error: str | None
    sender: str
    arrival: float
    smtputf8: bool
    body_8bit: bool
    notify: str | None = None   # RFC 3461, per recipient
    orcpt: str | None = None
    ret: str | None = None      # RFC 3461, per message
    envid: str | None = None
    delay_warned: bool = False  # a delay DSN was sent already
    listener: str = ""          # "bounce" / "double-bounce" for reports we made ourselves


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one claim returns."""

    due: list[DueRecipient]
    bodies: dict[str, bytes]      # message id -> data, for the first claimed messages
    next_due: float | None        # when the earliest deferred recipient is due


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    time: float
    recipient: str | None
    event: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """The outcome of one delivery attempt, as written back to the recipient's row."""

    rcpt_no: int
    state: RcptState
    attempts: int
    next_attempt: float
    last_error: str | None


# Administration (`mta queue …`, metrics): which queue a message is in, in Postfix's
# names. A message is "hold" if any pending recipient is held, else "active" if any
# is queued or being delivered, else "deferred". classify_message() and
# _CLASSIFY_SQL are the same rule, so `queue list` and queue_summary() agree.
QUEUE_NAMES = ("active", "deferred", "hold")
_PENDING_SQL = "('queued', 'active', 'deferred', 'held')"
_CLASSIFY_SQL = ("CASE WHEN max(r.state = 'held') THEN 'hold'"
                 " WHEN max(r.state IN ('queued', 'active')) THEN 'active' ELSE 'deferred' END")
ADMIN_CHUNK = 500  # messages per admin write transaction: the daemon never waits long
_RCPT_STATES = {str(s): s for s in RcptState}


def classify_message(states: Iterable[str]) -> str:
    """The queue name of a message from the states of its pending recipients."""
    found = set(states)
    if "held" in found:
        return "hold"
    if "queued" in found or "active" in found:
        return "active"
    return "deferred"


@dataclass(frozen=True, slots=True)
class QueueSummary:
    """Messages with pending recipients per queue, and the oldest one's arrival."""

    active: int = 0
    deferred: int = 0
    hold: int = 0
    oldest_arrival: float | None = None


@dataclass(slots=True)
class QueueEntry:
    """A message as `mta queue list` shows it, with its pending recipients only.

    Plain tuples for the recipients, as SQLite returns them: listing 100,000
    messages must not build 100,000s of objects."""

    queue_name: str           # active | deferred | hold
    id: str
    sender: str
    arrival: float
    size: int
    # (address, state, attempts, next_attempt, last_error) per pending recipient, in RCPT order
    recipients: list[tuple[str, str, int, float, str | None]]


@dataclass(frozen=True, slots=True)
class MessageDetail:
    """Everything `mta queue show` prints about one message."""

    message: QueuedMessage                 # every recipient, in RCPT order, whatever its state
    helo: str
    auth_user: str | None
    data: bytes
    history: tuple[HistoryEntry, ...]


@dataclass(frozen=True, slots=True)
class AdminResult:
    """What an admin action found and did."""

    found: tuple[str, ...]     # the ids that named a message (unknown ones are left out)
    changed: dict[str, int]    # per found id: recipients changed (deleted, for delete)


# Debian builds SQLite with SQLITE_SECURE_DELETE: every page freed by a deletion is
# zero-filled, so removing a delivered message rewrote its body's overflow pages too
# (on the captured full queue, shared/repro, 185 kB of WAL per removal instead of 157 kB).
# FAST still clears deleted content inside pages that are written anyway, at no extra
# I/O; what a full disk needs is that recording an outcome costs little room.
SECURE_DELETE = "FAST"

# Deferral history stays small: a deferral with the same reason as the recipient's last
# history row is not written again (the recipient row keeps the attempt count, the time
# and the last error), and none is written once the message has this many history rows.
# History rows lie in time order, so a message's rows are scattered over as many pages:
# removing a message deferred 28 times rewrote 28 pages (the captured full queue). Fewer
# rows rather than a new layout: a schema migration needs room a full disk has not got.
HISTORY_ROWS_PER_MESSAGE = 32

# The WAL is trimmed back to this size whenever it is reset after a checkpoint, so one
# large transaction does not keep its high-water mark allocated on disk for ever.
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024


class QueueStore:
    """Async access to the queue database. Build one per process in app.py."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0, reserve: int = 0,
                 health: Health | None = None):
        self.path = Path(path)
        # Faults the store finds (a damaged file, writes that keep failing) are reported here.
        self.health = health if health is not None else Health()
        self._directory = str(self.path.parent)   # statvfs'd after every commit: no Path work each time
        self.busy_timeout = busy_timeout
        # Disk space kept free for the queue manager's own writes (outcomes, deletions,
        # bounces, WAL checkpoints): new mail that would eat into it is refused with a
        # disk-full StoreError (452 4.3.1). Postfix keeps 1.5 x message_size_limit.
        self.reserve = reserve
        self._enqueuing = 0        # bytes of messages waiting for their commit (see _check_room)
        self._low_water = reserve  # below this much free space the WAL is emptied after each commit
        self._free_space_seen = 0     # last statvfs answer worth reusing (see _free_space)
        self._free_space_until = 0.0  # ... until this time.monotonic()
        self._db: aiosqlite.Connection | None = None
        self._pending: list[_PendingWrite] = []
        self._writer: asyncio.Task[None] | None = None
        # Write transactions span several awaits on one connection; this lock
        # keeps another coroutine's statements out of a transaction in progress.
        self._write_lock = asyncio.Lock()
        self._listeners: list[Callable[[Sequence[NewMessage]], None]] = []
        self.commits = 0  # write batches committed (group commit makes this < writes)
        # Seconds a batch of only non-urgent writes (delivery outcomes) waits for other
        # writes to share its commit; 0 commits at once. Set by the delivery process.
        self.commit_delay = 0.0
        self._urgent = asyncio.Event()
        self._synchronous = "FULL"  # the connection's PRAGMA synchronous, as last set
        # True: non-durable writes are committed on the event loop's own thread (see
        # _run_inline). Set by the delivery process before open().
        self.inline_writes = False
        self._inline: sqlite3.Connection | None = None
        self._inline_commits = 0   # since the last checkpoint asked for (see _run_inline)
        self._checkpointer: asyncio.Task[None] | None = None
        self._splitting = False       # disk-full batches are being split (logged once)

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # The queue holds other people's mail: owner-only from the first byte.
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        self._db = await aiosqlite.connect(str(self.path), isolation_level=None)
        try:
            await self._set_up()
        except BaseException as exc:
            # Close before raising: aiosqlite's thread is not a daemon thread, and left
            # running it kept the process alive after the traceback (`mta serve` and
            # `mta queue list` hung on a damaged file).
            db, self._db = self._db, None
            await db.close()
            if is_corruption(exc):
                raise QueueDamagedError(damage_reason(self.path, exc)) from None
            raise

    async def _set_up(self) -> None:
        assert self._db is not None
        await self._db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        await self._db.execute("PRAGMA journal_mode = WAL")
        # FULL: the WAL is fsynced at every commit, so "250" really means durable.
        await self._db.execute("PRAGMA synchronous = FULL")
        await self._db.execute("PRAGMA foreign_keys = ON")
        await self._db.execute(f"PRAGMA secure_delete = {SECURE_DELETE}")
        async with self._db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}") as cur:
            await cur.fetchall()   # it answers with a row; an open statement would block COMMIT
        await self._migrate()
        # Un-checkpointed WAL frames may need that much room in the database file when
        # they are checkpointed: at least twice the auto-checkpoint size must stay free
        # beyond the reserve, or the WAL is checkpointed and truncated after every commit.
        async with self._db.execute("PRAGMA page_size") as cur:
            page_size = int((await cur.fetchone() or (4096,))[0])
        async with self._db.execute("PRAGMA wal_autocheckpoint") as cur:
            pages = int((await cur.fetchone() or (1000,))[0])
        self._low_water = self.reserve + 2 * page_size * max(pages, 1000)
        if self.inline_writes:
            self._inline = _open_inline(self.path)

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.shield(self._writer)
        if self._checkpointer is not None:
            await asyncio.shield(self._checkpointer)
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def check_at_start(self) -> None:
        """``PRAGMA quick_check``, bounded in time (mta/queue/damage.py); damage found is
        reported as at run time: queue_database fails and new mail is refused."""
        try:
            problem = await self._in_thread(quick_check)
        except sqlite3.Error as exc:   # not damage (that is the answer): e.g. an I/O error
            log.warning("queue check: PRAGMA quick_check of %s failed: %s", self.path, exc)
            return
        if problem is not None:
            self._report_damage(problem)

    @property
    def damaged(self) -> str | None:
        """Why the queue file is known to be damaged (one line), or None."""
        if not self.health.failing("queue_database"):   # every MAIL asks: the cheap test first
            return None
        return self.health.faults().get("queue_database")

    def _report_damage(self, what: object) -> None:
        """The first corruption seen is the reason kept: /healthz and the log say it once."""
        if not self.health.failing("queue_database"):
            self.health.fail("queue_database", damage_reason(self.path, what))

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("queue is not open")
        return self._db

    async def _migrate(self) -> None:
        async with self._write_lock:
            async with self.db.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {version} is newer than this mta ({SCHEMA_VERSION})")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                await self._in_thread(_run_transaction, [partial(_migrate_to, target)], self.busy_timeout)
                log.info("queue schema migrated to version %d", target)

    def add_listener(self, callback: Callable[[Sequence[NewMessage]], None]) -> None:
        """Called after each commit of new messages (wakes the queue manager)."""
        self._listeners.append(callback)

    # ----------------------------------------------------------------- group commit

    async def _write(self, op: Callable[[sqlite3.Connection], T], *, urgent: bool = True,
                     durable: bool = True) -> T:
        """Run ``op`` inside a write transaction; return once it has committed.

        Writes that arrive while a batch is being committed wait and go into
        the next batch together: one fsync for all of them (group commit).

        ``durable=False`` is for the queue manager's own bookkeeping (claims,
        delivery outcomes): its commit skips the fsync (synchronous=NORMAL).
        A power cut can then undo it, and the mail is tried again: delivery is
        at least once, as with Postfix, which does not fsync the removal of a
        delivered queue file either. Nothing accepted can be lost that way:
        the WAL is one file written in order, so the next durable commit --
        any new mail -- syncs the frames before it too. A batch with any
        durable write is committed with synchronous=FULL.
        """
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append(_PendingWrite(op, done, urgent, durable))
        if urgent:
            self._urgent.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        return await done

    async def _write_pending(self) -> None:
        while self._pending:
            if self.commit_delay and not any(item.urgent for item in self._pending):
                # Only outcomes so far: give the next claim (or other outcomes) a moment
                # to join this commit. On a serial stream that makes one commit per
                # message in the delivery process instead of two.
                self._urgent.clear()
                try:
                    await asyncio.wait_for(self._urgent.wait(), self.commit_delay)
                except TimeoutError:
                    pass
            batch, self._pending = self._pending, []
            try:
                results = await self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, never a crash
                if len(batch) > 1:
                    # One bad write must not fail the others: redo them one by one. On a
                    # full disk that is what lets the queue drain: a batch of five removals
                    # may not fit where each one does, and each frees room for the next
                    # (retried whole, such a batch failed for ever).
                    if _is_disk_full(exc):
                        # One line when it starts; while space stays short it happens at every batch.
                        log.log(logging.DEBUG if self._splitting else logging.WARNING,
                                "queue write failed (%d writes): %s; trying them one by one", len(batch), exc)
                        self._splitting = True
                        await self._checkpoint()
                    for item in batch:
                        await self._run_alone(item)
                    continue
                self._fail(batch, exc)
                if _is_disk_full(exc):
                    # The failed transaction may have grown the WAL; give that room back.
                    await self._checkpoint()
                continue
            self._splitting = False
            for item, result in zip(batch, results):
                if not item.done.done():
                    item.done.set_result(result)
            if self._free_space() < self._low_water:
                # Short of space: checkpoint now and truncate the WAL, so the WAL never
                # holds more than one batch. Otherwise a WAL of many megabytes could no
                # longer be checkpointed once the disk is full (the database file must
                # grow to take its pages), and without a checkpoint no later write --
                # not even a deletion that would free room -- could ever commit again.
                await self._checkpoint()

    async def _run_batch(self, batch: Sequence[_PendingWrite]) -> list[Any]:
        synchronous = "FULL" if any(item.durable for item in batch) else "NORMAL"
        if self._inline is not None and synchronous == "NORMAL":
            # The main process holds the lock for its commit's fsync, often a good part
            # of a millisecond: wait for it here in short sleeps that leave the loop
            # free, and only then fall back to waiting in the database thread.
            for wait in (*_INLINE_WAITS, None):
                async with self._write_lock:
                    results = self._run_inline([item.op for item in batch])
                if results is not None:
                    self.commits += 1
                    return results
                if wait is not None:
                    await asyncio.sleep(wait)
        change = synchronous if synchronous != self._synchronous else None
        async with self._write_lock:
            self._synchronous = "unknown"  # until the batch is through: a failure may come before the PRAGMA
            results = await self._in_thread(_run_transaction, [item.op for item in batch], self.busy_timeout,
                                            change)
            self._synchronous = synchronous
        self.commits += 1
        return results

    def _run_inline(self, ops: Sequence[Callable[[sqlite3.Connection], Any]]) -> list[Any] | None:
        """Commit ``ops`` right here on the event loop's thread; None if another
        process holds the write lock (the caller then waits for it in the thread).

        Only for non-durable writes: with synchronous=NORMAL a commit is a few
        page writes to the WAL, ~45 us, where the hop to aiosqlite's thread and
        back costs ~250 us of CPU on a small VM (two cross-thread wake-ups and
        the GIL changing hands). This connection never checkpoints by itself
        (that would fsync here): every INLINE_CHECKPOINT_EVERY commits, a
        passive checkpoint runs in the database thread instead.
        """
        assert self._inline is not None
        try:
            results = _run_transaction(self._inline, ops, wait=False)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
                return None   # at BEGIN, or e.g. a WAL that could not be restarted yet
            if is_corruption(exc):
                self._report_damage(exc)
            raise
        self._inline_commits += 1
        if self._inline_commits >= INLINE_CHECKPOINT_EVERY and (
                self._checkpointer is None or self._checkpointer.done()):
            self._inline_commits = 0
            self._checkpointer = asyncio.create_task(self._checkpoint("PASSIVE"))
        return results

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(sqlite3_connection, *args)`` on aiosqlite's database thread.

        aiosqlite hands every statement to its thread and back; on a small VM
        that hand-off costs ~200 µs of CPU, more than the SQL itself. Running a
        whole transaction as one function makes it one hand-off per batch
        (benchmarks/README.md has the figures). ``_execute`` and ``_conn`` are
        aiosqlite internals, stable since 0.17; the pin in pyproject.toml and
        every queue test guard them.
        """
        db = self.db
        try:
            return await db._execute(fn, db._conn, *args)
        except sqlite3.DatabaseError as exc:
            # Every read and (threaded) write passes here, in both processes: a damaged
            # page found by a claim, an outcome, a POP3 read or the metrics is reported.
            if is_corruption(exc):
                self._report_damage(exc)
            raise

    async def _run_alone(self, item: _PendingWrite) -> None:
        try:
            [result] = await self._run_batch([item])
        except Exception as exc:  # noqa: BLE001
            self._fail([item], exc)
            if _is_disk_full(exc):
                await self._checkpoint()
        else:
            if not item.done.done():
                item.done.set_result(result)
            if self._free_space() < self._low_water:
                await self._checkpoint()   # as after a batch (_write_pending): room for the next one

    def _free_space(self) -> int:
        """Bytes available to us on the queue's file system.

        While more than FREE_SPACE_SLACK beyond the low-water mark is free, the
        answer is reused for FREE_SPACE_TTL: no queue write can use that much
        up so fast, and it saves a statvfs per message and per commit. Closer
        to full, every call asks the file system again."""
        now = time.monotonic()
        if now < self._free_space_until:
            return self._free_space_seen
        try:
            st = os.statvfs(self._directory)
        except OSError:
            return 1 << 62  # cannot tell: do not refuse mail for that
        free = st.f_bavail * st.f_frsize
        if free > self._low_water + FREE_SPACE_SLACK:
            self._free_space_seen, self._free_space_until = free, now + FREE_SPACE_TTL
        return free

    async def _checkpoint(self, mode: str = "TRUNCATE") -> None:
        """Copy the WAL into the database and (TRUNCATE) empty it; best effort, never raises."""
        async with self._write_lock:
            try:
                # Read the result row and close the statement: left open, it makes
                # the next COMMIT fail ("SQL statements in progress").
                async with self.db.execute(f"PRAGMA wal_checkpoint({mode})") as cur:
                    await cur.fetchall()
            except sqlite3.Error as exc:
                # "locked": a read of ours is in progress; the next commit tries again.
                log.log(logging.DEBUG if "locked" in str(exc) else logging.WARNING,
                        "queue checkpoint failed: %s", exc)

    async def _check_room(self, size: int) -> None:
        """Refuse a message of ``size`` bytes (StoreError, disk full) when storing it would
        leave less than the reserve. It takes about twice its size until checkpointed (the
        WAL and the database file); messages still waiting for their commit count too.
        Pages freed inside the database by delivered mail are reused before the file
        grows, so they count as free: acceptance resumes as soon as mail leaves the queue."""
        need = self.reserve + 2 * (size + self._enqueuing)
        free = self._free_space()
        if free >= need:
            return
        async with self.db.execute("PRAGMA freelist_count") as cur:
            free_pages = int((await cur.fetchone() or (0,))[0])
        async with self.db.execute("PRAGMA page_size") as cur:
            page_size = int((await cur.fetchone() or (4096,))[0])
        if free + free_pages * page_size < need:
            raise StoreError(f"not enough free space in the queue file system ({free} bytes free, "
                             f"{free_pages} free pages in the queue; {need} bytes needed)", disk_full=True)

    def _fail(self, batch: Sequence[_PendingWrite], exc: BaseException) -> None:
        log.error("queue write failed (%d write(s)): %s", len(batch), exc)
        error = StoreError(str(exc), disk_full=_is_disk_full(exc))
        for item in batch:
            if not item.done.done():
                item.done.set_exception(error)

    def space_report(self) -> str:
        """Free space and reserve in one phrase, for health reasons and logs."""
        return f"{self._free_space()} bytes free in {self._directory} (reserve {self.reserve})"

    # ----------------------------------------------------------------- inbound

    async def enqueue(self, message: NewMessage) -> None:
        """Store a message and its recipients; return once committed.

        Refused (StoreError, disk full) when it would eat into the reserve, and at once
        (QueueDamagedError) while the queue file is known to be damaged: no more mail is
        written into a file that SQLite may not be able to read back."""
        if (damaged := self.damaged) is not None:
            raise QueueDamagedError(damaged)
        size = len(message.data)
        await self._check_room(size)
        self._enqueuing += size
        try:
            await self._write(lambda conn: _insert_message(conn, message))
        finally:
            self._enqueuing -= size
        for callback in self._listeners:
            callback([message])

    # ----------------------------------------------------------------- queue manager

    async def recover_in_flight(self) -> int:
        """Recipients left 'active' by a crash are due again (delivery is at least once)."""

        def recover(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE recipients SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END"
                " WHERE state = 'active'")
            return cur.rowcount

        return await self._write(recover)

    async def claim(self, now: float, limit: int, *, prefetch_bytes: int = 0) -> Claimed:
        """Mark up to ``limit`` due recipients active and return them: fresh mail
        first, then deferred mail whose time has come. Both are range scans of
        the (state, next_attempt) index, so a large deferred backlog that is not
        yet due costs nothing here.

        The same database round trip also reads the bodies of the first claimed
        messages (up to ``prefetch_bytes`` in all) and when the next deferred
        recipient is due: on a serial stream of mail that is one hand-off to the
        database thread per claim instead of three."""

        def claim(conn: sqlite3.Connection) -> Claimed:
            due: list[DueRecipient] = []
            sizes: dict[str, int] = {}
            for state in (RcptState.QUEUED, RcptState.DEFERRED):
                if len(due) >= limit:
                    break
                rows = conn.execute(
                    "SELECT r.message_id, r.rcpt_no, r.address, r.attempts, r.last_error, m.sender,"
                    " m.arrival, m.smtputf8, m.body_8bit, r.notify, r.orcpt, m.ret, m.envid, m.delay_warned,"
                    " m.listener, m.size FROM recipients r"
                    " JOIN messages m ON m.id = r.message_id"
                    " WHERE r.state = ? AND r.next_attempt <= ? ORDER BY r.next_attempt LIMIT ?",
                    (str(state), now, limit - len(due)),
                ).fetchall()
                for a, b, c, d, e, f, g, h, i, j, k, l_, m, n, o, size in rows:
                    due.append(DueRecipient(str(a), int(b), str(c), int(d), e, str(f), float(g), bool(h),
                                            bool(i), j, k, l_, m, bool(n), str(o)))
                    sizes.setdefault(str(a), int(size))
            conn.executemany(
                "UPDATE recipients SET state = 'active', updated = ? WHERE message_id = ? AND rcpt_no = ?",
                [(now, d.message_id, d.rcpt_no) for d in due])
            bodies: dict[str, bytes] = {}
            budget = prefetch_bytes
            for message_id, size in sizes.items():
                if size > budget:
                    break
                row = conn.execute("SELECT data FROM bodies WHERE message_id = ?", (message_id,)).fetchone()
                if row is not None:
                    bodies[message_id] = bytes(row[0])
                budget -= size
            return Claimed(due, bodies, _next_due(conn))

        return await self._write(claim, durable=False)

    async def record_outcomes(self, message_id: str, updates: Sequence[RecipientUpdate], now: float,
                              *, history: Sequence[HistoryEntry] = (),
                              new_messages: Sequence[NewMessage] = (), delay_warned: bool = False,
                              mailbox_copies: Sequence[MailboxCopy] = (), max_mailbox_messages: int = 10_000) -> bool:
        """Write a delivery attempt's per-recipient results in one commit.

        ``new_messages`` (bounces) are enqueued in the same commit, so a crash
        can neither lose a bounce nor send it twice. When no recipient of the
        message is left pending, the message is removed in that commit too (as
        Postfix removes a queue file); returns True then. A recipient an
        operator put on hold while it was being tried stays held if deferred.
        ``mailbox_copies`` (local delivery) are stored in the same commit that
        marks their recipients delivered.
        """

        def record(conn: sqlite3.Connection) -> bool:
            if mailbox_copies:
                insert_copies(conn, mailbox_copies, now, max_mailbox_messages)
            conn.executemany(
                "UPDATE recipients SET state = CASE WHEN state = 'held' AND ? = 'deferred' THEN 'held' ELSE ? END,"
                " attempts = ?, next_attempt = ?, last_error = ?, updated = ? WHERE message_id = ? AND rcpt_no = ?",
                [(str(u.state), str(u.state), u.attempts, u.next_attempt, u.last_error, now, message_id, u.rcpt_no)
                 for u in updates])
            for message in new_messages:
                _insert_message(conn, message)
            if delay_warned:
                conn.execute("UPDATE messages SET delay_warned = 1 WHERE id = ?", (message_id,))
            pending = conn.execute(
                "SELECT 1 FROM recipients WHERE message_id = ? AND state NOT IN ('delivered', 'bounced') LIMIT 1",
                (message_id,),
            ).fetchone()
            if pending is None:
                conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))
                return True
            rows = _history_worth_writing(conn, message_id, history, short_of_space)
            if rows:
                conn.executemany(
                    "INSERT INTO history (message_id, time, recipient, event, detail) VALUES (?,?,?,?,?)",
                    [(message_id, h.time, h.recipient, h.event, h.detail) for h in rows])
            return False

        # Below the reserve (new mail is refused) the queue manager's own writes must fit
        # in it: deferral history is left out, the recipient row says the same.
        short_of_space = self._free_space() < self.reserve
        finished = await self._write(record, urgent=False, durable=False)
        if new_messages:
            for callback in self._listeners:
                callback(list(new_messages))
        return finished

    async def give_back(self, message_id: str, rcpt_nos: Sequence[int]) -> None:
        """Return claimed recipients untouched (the daemon stopped before trying them)."""

        def give(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE recipients SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END"
                " WHERE message_id = ? AND rcpt_no = ? AND state = 'active'",
                [(message_id, n) for n in rcpt_nos])

        await self._write(give, durable=False)

    async def next_due_time(self) -> float | None:
        """When the earliest deferred recipient is due (one index lookup)."""
        return await self._in_thread(_next_due)

    # ----------------------------------------------------------------- reading

    async def list_messages(self, ids: Iterable[str] | None = None) -> list[QueuedMessage]:
        """Every message with its recipients, oldest first (no message data loaded)."""
        where, args = "", ()
        if ids is not None:
            id_list = tuple(ids)
            where = f"WHERE m.id IN ({','.join('?' * len(id_list))})"
            args = id_list
        query = (
            "SELECT m.id, m.sender, m.arrival, m.size, m.client, m.listener, m.smtputf8, m.body_8bit,"
            " m.ret, m.envid, r.address, r.state, r.attempts, r.next_attempt, r.last_error, r.notify,"
            f" r.orcpt FROM messages m JOIN recipients r ON r.message_id = m.id {where}"
            " ORDER BY m.arrival, m.id, r.rcpt_no"
        )
        async with self.db.execute(query, args) as cur:
            rows = await cur.fetchall()
        return _group_messages(rows)

    async def message_data(self, message_id: str) -> bytes | None:
        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT data FROM bodies WHERE message_id = ?", (message_id,)).fetchone()
            return bytes(row[0]) if row else None

        return await self._in_thread(read)

    async def count_recipients(self) -> dict[str, int]:
        async with self.db.execute("SELECT state, count(*) FROM recipients GROUP BY state") as cur:
            return {str(state): int(n) for state, n in await cur.fetchall()}

    async def integrity_check(self) -> str:
        async with self.db.execute("PRAGMA integrity_check") as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else "no answer"

    async def integrity_problems(self, limit: int = 100) -> list[str]:
        """``PRAGMA integrity_check``, every page: [] when the file is sound, else up to
        ``limit`` problems. SQLite reports some damage by failing instead (raised)."""
        rows = await self._in_thread(lambda conn: conn.execute(f"PRAGMA integrity_check({int(limit)})").fetchall())
        problems = [str(row[0]) for row in rows]
        return [] if problems == ["ok"] else problems

    # ----------------------------------------------------------------- administration
    # `mta queue …` runs these in its own process on the daemon's live file. Each write
    # is a short BEGIN IMMEDIATE transaction over at most ADMIN_CHUNK messages; the
    # daemon sees the result at its next poll of the queue (within a second).

    async def queue_summary(self, now: float) -> QueueSummary:
        """Messages per queue (classified as `mta queue list` does) in one aggregate query.

        The classification depends on recipient states only, not on the time: ``now``
        is accepted so callers need not change if due-but-deferred mail ever counts apart.
        """
        # The counts come from the recipients index alone; the oldest pending message is
        # the first one in arrival order with a pending recipient (a short index scan).
        query = (f"SELECT cls, count(*), (SELECT m.arrival FROM messages m WHERE EXISTS (SELECT 1 FROM"
                 f" recipients r WHERE r.message_id = m.id AND r.state IN {_PENDING_SQL}) ORDER BY m.arrival"
                 f" LIMIT 1) FROM (SELECT {_CLASSIFY_SQL} AS cls FROM recipients r"
                 f" WHERE r.state IN {_PENDING_SQL} GROUP BY r.message_id) GROUP BY cls")
        counts = dict.fromkeys(QUEUE_NAMES, 0)
        oldest: float | None = None
        # In the database thread through _in_thread, so that a damaged page found here is reported.
        for cls, n, arrival in await self._in_thread(lambda conn: conn.execute(query).fetchall()):
            counts[str(cls)] = int(n)
            oldest = float(arrival) if arrival is not None else None
        return QueueSummary(counts["active"], counts["deferred"], counts["hold"], oldest)

    async def iter_queue(self, *, batch: int = 2000) -> AsyncIterator[list[QueueEntry]]:
        """Messages with pending recipients, oldest first, each with those recipients only
        (what mailq shows), in lists of about ``batch`` rows.

        One SELECT, streamed: one snapshot, so a message is listed whole or not at all
        however long the listing takes, and no query per message. The next rows are
        fetched (in aiosqlite's thread) while the caller formats the current ones."""
        # CROSS JOIN keeps messages outermost: a scan of messages_arrival (arrival, rowid),
        # then each message's recipients by primary key (message_id, rcpt_no). That is
        # exactly the ORDER BY, so SQLite sorts nothing (an index with arrival, sender,
        # size and id would also spare the lookups of the message rows).
        query = ("SELECT m.id, m.sender, m.arrival, m.size, r.address, r.state, r.attempts,"
                 " r.next_attempt, r.last_error FROM messages m CROSS JOIN recipients r"
                 f" ON r.message_id = m.id WHERE r.state IN {_PENDING_SQL}"
                 " ORDER BY m.arrival, m.rowid, r.rcpt_no")
        entry: QueueEntry | None = None
        current = None
        async with self.db.execute(query) as cur:
            ahead = asyncio.ensure_future(cur.fetchmany(batch))
            try:
                while rows := await ahead:
                    ahead = asyncio.ensure_future(cur.fetchmany(batch))
                    done: list[QueueEntry] = []
                    for row in rows:
                        if row[0] != current:
                            if entry is not None:
                                done.append(entry)
                            current = row[0]
                            entry = QueueEntry("deferred", current, row[1], row[2], row[3], [])
                            append = entry.recipients.append
                        append(row[4:])
                        # classify_message(), one recipient at a time
                        state = row[5]
                        if state != "deferred" and entry.queue_name != "hold":
                            entry.queue_name = "hold" if state == "held" else "active"
                    if done:
                        yield done
            finally:  # closed early (a broken pipe) or failed: settle the read ahead
                ahead.cancel()
                await asyncio.gather(ahead, return_exceptions=True)
        if entry is not None:
            yield [entry]

    async def message_detail(self, message_id: str) -> MessageDetail | None:
        """The whole message for `mta queue show`, read in one snapshot."""
        def read(conn: sqlite3.Connection) -> tuple[Any, list[Any], list[Any]] | None:
            conn.execute("BEGIN")  # one read transaction: the three queries see the same queue
            try:
                row = conn.execute(
                    "SELECT id, sender, arrival, size, client, listener, smtputf8, body_8bit, ret, envid,"
                    " helo, auth_user, b.data FROM messages JOIN bodies b ON b.message_id = id WHERE id = ?",
                    (message_id,)).fetchone()
                if row is None:
                    return None
                rcpts = conn.execute(
                    "SELECT address, state, attempts, next_attempt, last_error, notify, orcpt FROM recipients"
                    " WHERE message_id = ? ORDER BY rcpt_no", (message_id,)).fetchall()
                history = conn.execute(
                    "SELECT time, recipient, event, detail FROM history WHERE message_id = ?"
                    " ORDER BY time, rowid", (message_id,)).fetchall()
                return row, rcpts, history
            finally:
                conn.execute("ROLLBACK")  # read only: nothing to commit

        async with self._write_lock:  # keeps a batch's BEGIN out of this read transaction
            found = await self._in_thread(read)
        if found is None:
            return None
        row, rcpt_rows, history_rows = found
        (mid, sender, arrival, size, client, listener, smtputf8, body_8bit, ret, envid,
         helo, auth_user, data) = row
        recipients = tuple(
            Recipient(address=str(a), state=_RCPT_STATES[str(s)], attempts=int(n), next_attempt=float(t),
                      last_error=e, notify=nt, orcpt=o)
            for a, s, n, t, e, nt, o in rcpt_rows)
        message = QueuedMessage(id=str(mid), sender=str(sender), arrival=float(arrival), size=int(size),
                                recipients=recipients, client=str(client), listener=str(listener),
                                smtputf8=bool(smtputf8), body_8bit=bool(body_8bit), ret=ret, envid=envid)
        history = tuple(HistoryEntry(float(t), r, str(ev), d) for t, r, ev, d in history_rows)
        return MessageDetail(message, str(helo), auth_user, bytes(data), history)

    async def hold(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult:
        """Pending recipients (queued, deferred, even active) become 'held': never claimed.
        One being delivered right now keeps its result if that is final (record_outcomes)."""
        return await self._admin(ids, ("queued", "deferred", "active"), "held",
                                 "state = 'held'", (), now, detail)

    async def release(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult:
        """Held recipients are due now: 'deferred' if tried before, else 'queued'."""
        return await self._admin(ids, ("held",), "released",
                                 "state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END,"
                                 " next_attempt = ?", (now,), now, detail)

    async def flush(self, ids: Iterable[str] | None, now: float, *, detail: str | None = None) -> AdminResult:
        """Deferred recipients (of ``ids``, or all) are due now; they stay 'deferred'."""
        return await self._admin(ids, ("deferred",), "flushed", "next_attempt = ?", (now,), now, detail)

    async def requeue(self, ids: Iterable[str], now: float, *, detail: str | None = None) -> AdminResult:
        """Queued, deferred and held recipients become fresh work due now ('queued'; attempts
        kept). Active ones are left to the delivery in progress."""
        return await self._admin(ids, ("queued", "deferred", "held"), "requeued",
                                 "state = 'queued', next_attempt = ?", (now,), now, detail)

    async def delete(self, ids: Iterable[str] | None) -> AdminResult:
        """Remove messages (``ids``, or all); recipients and history go with them."""
        return await self._admin(ids, None, None, "", (), 0.0, None)

    async def _admin(self, ids: Iterable[str] | None, states: tuple[str, ...] | None, event: str | None,
                     assignment: str, args: tuple[Any, ...], now: float, detail: str | None) -> AdminResult:
        """Update the recipients in ``states`` of the messages ``ids`` with ``assignment``
        and write an ``event`` history row for each; delete the messages when ``states``
        is None. ids=None means every message with a recipient in ``states``."""
        # The recipients acted on (delete: counts the pending ones it removes). Within a
        # chunk, "+state" keeps SQLite on the primary key (message_id): the (state, …)
        # index would have it scan every deferred recipient of the queue for each chunk.
        state_list = f"({', '.join(repr(s) for s in states)})" if states else _PENDING_SQL
        in_states = f"+state IN {state_list}"
        if ids is None:
            query = ("SELECT id FROM messages ORDER BY arrival, id" if states is None else
                     f"SELECT DISTINCT message_id FROM recipients WHERE state IN {state_list}")
            async with self.db.execute(query) as cur:
                ids = [str(r[0]) for r in await cur.fetchall()]
        wanted = list(dict.fromkeys(ids))
        found: list[str] = []
        changed: dict[str, int] = {}
        for start in range(0, len(wanted), ADMIN_CHUNK):
            chunk = tuple(wanted[start:start + ADMIN_CHUNK])
            marks = ", ".join("?" * len(chunk))

            def op(conn: sqlite3.Connection, chunk: tuple[str, ...] = chunk,
                   marks: str = marks) -> tuple[set[str], dict[str, int]]:
                present = {str(r[0]) for r in conn.execute(f"SELECT id FROM messages WHERE id IN ({marks})",
                                                           chunk)}
                counts = {str(m): int(n) for m, n in conn.execute(
                    f"SELECT message_id, count(*) FROM recipients WHERE message_id IN ({marks})"
                    f" AND {in_states} GROUP BY message_id", chunk)}
                if states is None:
                    conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
                elif counts:
                    conn.execute(
                        "INSERT INTO history (message_id, time, recipient, event, detail)"
                        f" SELECT message_id, ?, address, ?, ? FROM recipients WHERE message_id IN ({marks})"
                        f" AND {in_states} ORDER BY message_id, rcpt_no", (now, event, detail, *chunk))
                    conn.execute(
                        f"UPDATE recipients SET {assignment}, updated = ? WHERE message_id IN ({marks})"
                        f" AND {in_states}", (*args, now, *chunk))
                return present, counts

            present, counts = await self._write(op)
            for message_id in chunk:
                if message_id in present:
                    found.append(message_id)
                    changed[message_id] = counts.get(message_id, 0)
        return AdminResult(tuple(found), changed)


def create_schema(conn: sqlite3.Connection) -> None:
    """The current schema in an empty database, inside the caller's transaction
    (`mta queue repair` builds its new file with it)."""
    for target in range(1, SCHEMA_VERSION + 1):
        _migrate_to(target, conn)


def _migrate_to(target: int, conn: sqlite3.Connection) -> None:
    for statement in _statements(MIGRATIONS[target - 1]):
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {target}")


def _run_transaction(conn: sqlite3.Connection, ops: Sequence[Callable[[sqlite3.Connection], Any]],
                     busy_timeout: float = 10.0, synchronous: str | None = None, *, wait: bool = True) -> list[Any]:
    """BEGIN IMMEDIATE, every op, COMMIT (one fsync unless synchronous=NORMAL);
    ROLLBACK if anything fails. ``synchronous``: set that PRAGMA first. ``wait=False``:
    a busy write lock raises at once (the connection's busy_timeout, 0 inline)."""
    if synchronous is not None:
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    if wait:
        _begin_immediate(conn, busy_timeout)
    else:
        conn.execute("BEGIN IMMEDIATE")
    try:
        results = [op(conn) for op in ops]
        conn.execute("COMMIT")
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction left to roll back (SQLite may already have ended it)
        raise
    return results


# See QueueStore._run_inline: about 1,000 WAL pages (SQLite's auto-checkpoint size)
# at ~20 pages per claim and outcome.
INLINE_CHECKPOINT_EVERY = 50

# Sleeps between inline tries for the write lock (QueueStore._run_batch).
_INLINE_WAITS = (0.0002, 0.0004, 0.0008, 0.0016, 0.0032)

# See QueueStore._free_space.
FREE_SPACE_SLACK = 1 << 30
FREE_SPACE_TTL = 0.1

# Waits between tries for the write lock while another process holds it.
_BEGIN_WAITS = (0.0001, 0.0002, 0.0004, 0.0008, 0.0016)


def _next_due(conn: sqlite3.Connection) -> float | None:
    """When the earliest deferred recipient is due (one index lookup)."""
    row = conn.execute("SELECT min(next_attempt) FROM recipients WHERE state = 'deferred'").fetchone()
    return float(row[0]) if row and row[0] is not None else None


def _history_worth_writing(conn: sqlite3.Connection, message_id: str, history: Sequence[HistoryEntry],
                           short_of_space: bool) -> list[HistoryEntry]:
    """The entries of one attempt worth a row: deferrals only when the disk is not short
    of space and they say something new (see HISTORY_ROWS_PER_MESSAGE); others always."""
    if all(h.event != "deferred" for h in history):
        return list(history)
    rows = HISTORY_ROWS_PER_MESSAGE
    if not short_of_space:   # reads only (the history_message index): they cost no room
        rows = int(conn.execute("SELECT count(*) FROM history WHERE message_id = ?",
                                (message_id,)).fetchone()[0])
    keep: list[HistoryEntry] = []
    for h in history:
        if h.event == "deferred":
            if rows >= HISTORY_ROWS_PER_MESSAGE:
                continue
            last = conn.execute(
                "SELECT event, detail FROM history WHERE message_id = ? AND recipient IS ?"
                " ORDER BY time DESC, rowid DESC LIMIT 1", (message_id, h.recipient)).fetchone()
            if last == ("deferred", h.detail):
                continue
            rows += 1
        keep.append(h)
    return keep


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _open_inline(path: Path) -> sqlite3.Connection:
    """The delivery process's connection for QueueStore._run_inline."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 0")        # never wait on the event loop's thread
    conn.execute("PRAGMA synchronous = NORMAL")    # non-durable writes only (QueueStore._write)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA secure_delete = {SECURE_DELETE}")
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints run in the database thread
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}").fetchall()
    return conn


def _begin_immediate(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """Take the write lock, waiting in short steps while another process writes.

    The daemon's listeners and its delivery process (mta/worker.py) write to
    the same file, each holding the lock for well under a millisecond. SQLite's
    own busy handler sleeps 1, 2, 5, 10 ms ... between tries: a collision would
    cost a serial client a millisecond or more per message. Here the first
    tries come after 0.1-1.6 ms; past those, SQLite's handler takes over with
    the connection's busy_timeout.
    """
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        for wait in _BEGIN_WAITS:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
            time.sleep(wait)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute("BEGIN IMMEDIATE")


def _insert_message(conn: sqlite3.Connection, m: NewMessage) -> None:
    conn.execute(
        "INSERT INTO messages (id, sender, arrival, size, client, listener, helo, auth_user,"
        " smtputf8, body_8bit, ret, envid) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (m.id, m.sender, m.arrival, len(m.data), m.client, m.listener, m.helo, m.auth_user,
         int(m.smtputf8), int(m.body_8bit), m.ret, m.envid))
    conn.execute("INSERT INTO bodies (message_id, data) VALUES (?, ?)", (m.id, m.data))
    # next_attempt = arrival: fresh mail is due at once, oldest first.
    conn.executemany(
        "INSERT INTO recipients (message_id, rcpt_no, address, state, next_attempt, notify,"
        " orcpt, updated) VALUES (?,?,?,?,?,?,?,?)",
        [(m.id, i, r.address, str(r.state), r.next_attempt or m.arrival, r.notify, r.orcpt, m.arrival)
         for i, r in enumerate(m.recipients)])


def _statements(script: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _group_messages(rows: Iterable[Sequence[object]]) -> list[QueuedMessage]:
    messages: list[QueuedMessage] = []
    current: dict[str, object] | None = None
    rcpts: list[Recipient] = []

    def flush() -> None:
        if current is not None:
            messages.append(QueuedMessage(recipients=tuple(rcpts), **current))  # type: ignore[arg-type]

    for row in rows:
        (mid, sender, arrival, size, client, listener, smtputf8, body_8bit, ret, envid,
         address, state, attempts, next_attempt, last_error, notify, orcpt) = row
        if current is None or current["id"] != mid:
            flush()
            current = dict(id=mid, sender=sender, arrival=arrival, size=size, client=client,
                           listener=listener, smtputf8=bool(smtputf8), body_8bit=bool(body_8bit),
                           ret=ret, envid=envid)
            rcpts = []
        rcpts.append(Recipient(address=str(address), state=RcptState(str(state)), attempts=int(attempts),  # type: ignore[call-overload]
                               next_attempt=float(next_attempt), last_error=last_error,  # type: ignore[arg-type]
                               notify=notify, orcpt=orcpt))  # type: ignore[arg-type]
    flush()
    return messages


_SEQUENCE = itertools.count()


def new_queue_id() -> str:
    """A short unique id in Postfix's style: 12 hex digits, increasing with time.

    40 bits of microseconds (wrapping after ~12.7 days, far beyond any message's
    life in the queue) plus an 8-bit counter, so ids made in the same
    microsecond still differ; the PRIMARY KEY would catch the impossible rest.
    """
    micros = time.time_ns() // 1000
    return f"{micros & 0xFFFFFFFFFF:010X}{next(_SEQUENCE) & 0xFF:02X}"
