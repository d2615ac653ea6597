"""The SQLite commit engine: one queue file, its connections and its commits.

The queue (queue.py), its administration (admin.py) and the mailboxes
(mailboxes.py) each run their SQL through this engine's public methods only:
:meth:`Engine.write` (a write transaction, group-committed), :meth:`Engine.write_new_mail`
(the same for accepted mail, after the disk reserve check), :meth:`Engine.read`
(a read on the database thread), :meth:`Engine.read_snapshot` and
:meth:`Engine.stream`. Everything SQLite-specific about *how* things are
committed lives here:

* one SQLite file in WAL mode with synchronous=FULL, so a commit survives a
  power cut: the 250 is sent only after the commit of the message's write;
* group commit: while one batch is being written, new writes wait in
  ``_pending`` and the next commit takes them all, so one fsync serves many
  messages under load; the queue manager's own bookkeeping commits without an
  fsync of its own (``durable=False``), in the delivery process on its event
  loop's own thread (``inline_writes``);
* the disk reserve (1.5 x message_size stays free for the queue manager's
  writes), splitting a batch that fails on a full disk, WAL checkpoints;
* schema migrations at open (schema.py) and damage: corruption met by any
  read or write is reported to health (damage.py) and new mail is refused.

Errors leave as :class:`StoreError` / :class:`QueueDamagedError`, never as sqlite3's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from mta.errors import QueueDamagedError, StoreError
from mta.health import Health
from mta.store.sqlite.damage import damage_reason, is_corruption, quick_check
from mta.store.sqlite.schema import SCHEMA_VERSION, migrate_to

log = logging.getLogger("mta.queue")

T = TypeVar("T")

# A unit of work for the engine: runs on a sqlite3 connection inside a transaction.
Op = Callable[[sqlite3.Connection], T]


def _is_disk_full(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("disk is full" in text or "database or disk" in text)


@dataclass(slots=True)
class _PendingWrite:
    op: Callable[[sqlite3.Connection], Any]
    done: asyncio.Future[Any]
    urgent: bool = True   # False: may wait up to commit_delay for company in its commit
    durable: bool = True  # False: committed without an fsync of its own (see Engine.write)


# Debian builds SQLite with SQLITE_SECURE_DELETE: every page freed by a deletion is
# zero-filled, so removing a delivered message rewrote its body's overflow pages too
# (on the captured full queue, shared/repro, 185 kB of WAL per removal instead of 157 kB).
# FAST still clears deleted content inside pages that are written anyway, at no extra
# I/O; what a full disk needs is that recording an outcome costs little room.
SECURE_DELETE = "FAST"

# The WAL is trimmed back to this size whenever it is reset after a checkpoint, so one
# large transaction does not keep its high-water mark allocated on disk for ever.
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024


class Engine:
    """Async access to the queue file. One per process (mta/store/factory.py builds it)."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0, reserve: int = 0,
                 health: Health | None = None, commit_delay: float = 0.0, inline_writes: bool = False):
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
        self._free_space_seen = 0     # last statvfs answer worth reusing (see free_space)
        self._free_space_until = 0.0  # ... until this time.monotonic()
        self._db: aiosqlite.Connection | None = None
        self._pending: list[_PendingWrite] = []
        self._writer: asyncio.Task[None] | None = None
        # Write transactions span several awaits on one connection; this lock
        # keeps another coroutine's statements out of a transaction in progress.
        self._write_lock = asyncio.Lock()
        self.commits = 0  # write batches committed (group commit makes this < writes)
        # Seconds a batch of only non-urgent writes (delivery outcomes) waits for other
        # writes to share its commit; 0 commits at once. Set by the delivery process.
        self.commit_delay = commit_delay
        self._urgent = asyncio.Event()
        self._synchronous = "FULL"  # the connection's PRAGMA synchronous, as last set
        # True: non-durable writes are committed on the event loop's own thread (see
        # _run_inline). Set by the delivery process.
        self.inline_writes = inline_writes
        self._inline: sqlite3.Connection | None = None
        self._inline_commits = 0   # since the last checkpoint asked for (see _run_inline)
        self._checkpointer: asyncio.Task[None] | None = None
        self._splitting = False       # disk-full batches are being split (logged once)
        # read_aside's connection and the one thread it is used on, opened at first use.
        self._aside: sqlite3.Connection | None = None
        self._aside_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._aside_opening = asyncio.Lock()

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
        if self._aside_thread is not None:
            thread, aside = self._aside_thread, self._aside
            self._aside_thread = self._aside = None
            if aside is not None:
                await asyncio.get_running_loop().run_in_executor(thread, aside.close)
            thread.shutdown(wait=False)
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def check_at_start(self) -> None:
        """``PRAGMA quick_check``, bounded in time (damage.py); damage found is
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
        """The aiosqlite connection (for this package's tests and tools; the SQL parts
        go through write/read/stream)."""
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
                await self._in_thread(_run_transaction, [partial(migrate_to, target)], self.busy_timeout)
                log.info("queue schema migrated to version %d", target)

    # ----------------------------------------------------------------- group commit

    async def write(self, op: Op[T], *, urgent: bool = True, durable: bool = True) -> T:
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

        ``urgent=False`` (delivery outcomes) lets the batch wait up to
        ``commit_delay`` for company. Failures raise StoreError (``disk_full``).
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self.commit_delay)
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
                        await self.checkpoint()
                    for item in batch:
                        await self._run_alone(item)
                    continue
                self._fail(batch, exc)
                if _is_disk_full(exc):
                    # The failed transaction may have grown the WAL; give that room back.
                    await self.checkpoint()
                continue
            self._splitting = False
            for item, result in zip(batch, results, strict=True):
                if not item.done.done():
                    item.done.set_result(result)
            if self.free_space() < self._low_water:
                # Short of space: checkpoint now and truncate the WAL, so the WAL never
                # holds more than one batch. Otherwise a WAL of many megabytes could no
                # longer be checkpointed once the disk is full (the database file must
                # grow to take its pages), and without a checkpoint no later write --
                # not even a deletion that would free room -- could ever commit again.
                await self.checkpoint()

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
            self._checkpointer = asyncio.create_task(self.checkpoint("PASSIVE"))
        return results

    async def read(self, op: Op[T]) -> T:
        """Run ``op(connection)`` on the database thread (one hand-off), outside any
        write transaction of ours; sqlite3's errors come back as StoreError, damage
        as QueueDamagedError (and reported to health)."""
        try:
            return await self._in_thread(op)
        except sqlite3.Error as exc:
            raise self._store_error(exc) from exc

    async def read_snapshot(self, op: Op[T]) -> T:
        """``read(op)`` inside one read transaction: every query of ``op`` sees the same data."""

        def snapshot(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN")
            try:
                return op(conn)
            finally:
                conn.execute("ROLLBACK")  # read only: nothing to commit

        async with self._write_lock:  # keeps a batch's BEGIN out of this read transaction
            return await self.read(snapshot)

    async def read_aside(self, op: Op[T]) -> T:
        """``op(connection)`` in one read transaction (a snapshot) on a connection and a
        thread of its own, for long reads (the lab inbox's searches): WAL lets them run
        beside the queue's commits and reads, which they would otherwise hold up (one
        aiosqlite thread serves those). Errors as :meth:`read`'s."""
        loop = asyncio.get_running_loop()
        if self._db is None:
            raise StoreError("queue is not open")
        async with self._aside_opening:
            if self._aside_thread is None:
                thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mta-store-aside")
                try:
                    self._aside = await loop.run_in_executor(thread, _open_aside, self.path, self.busy_timeout)
                except BaseException:
                    thread.shutdown(wait=False)
                    raise
                self._aside_thread = thread
        thread, conn = self._aside_thread, self._aside
        assert thread is not None and conn is not None
        try:
            return await loop.run_in_executor(thread, _read_transaction, conn, op)
        except sqlite3.Error as exc:
            if is_corruption(exc):
                self._report_damage(exc)
            raise self._store_error(exc) from exc

    async def stream(self, query: str, args: Sequence[Any] = (), *, batch: int = 2000) -> AsyncGenerator[list[Any], None]:
        """The rows of one SELECT in lists of up to ``batch``, from one snapshot however long
        the caller takes; the next rows are fetched (in the database thread) while the
        caller works on the current ones."""
        try:
            async with self.db.execute(query, args) as cur:
                ahead = asyncio.ensure_future(cur.fetchmany(batch))
                try:
                    while rows := await ahead:
                        ahead = asyncio.ensure_future(cur.fetchmany(batch))
                        yield list(rows)
                finally:  # closed early (a broken pipe) or failed: settle the read ahead
                    ahead.cancel()
                    await asyncio.gather(ahead, return_exceptions=True)
        except sqlite3.Error as exc:
            if is_corruption(exc):
                self._report_damage(exc)
            raise self._store_error(exc) from exc

    def _store_error(self, exc: sqlite3.Error) -> StoreError:
        if is_corruption(exc):
            return QueueDamagedError(damage_reason(self.path, exc))
        return StoreError(str(exc), disk_full=_is_disk_full(exc))

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
            result: T = await db._execute(fn, db._conn, *args)  # type: ignore[no-untyped-call]
            return result
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
                await self.checkpoint()
        else:
            if not item.done.done():
                item.done.set_result(result)
            if self.free_space() < self._low_water:
                await self.checkpoint()   # as after a batch (_write_pending): room for the next one

    def free_space(self) -> int:
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

    async def checkpoint(self, mode: str = "TRUNCATE") -> None:
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

    async def write_new_mail(self, op: Op[T], size: int) -> T:
        """``write(op)`` for accepted mail of ``size`` bytes, durable: refused first
        (StoreError, disk full) when it would eat into the reserve, and at once
        (QueueDamagedError) while the file is known to be damaged: no more mail is
        written into a file that SQLite may not be able to read back."""
        if (damaged := self.damaged) is not None:
            raise QueueDamagedError(damaged)
        await self._check_room(size)
        self._enqueuing += size
        try:
            return await self.write(op)
        finally:
            self._enqueuing -= size

    async def _check_room(self, size: int) -> None:
        """Refuse a message of ``size`` bytes (StoreError, disk full) when storing it would
        leave less than the reserve. It takes about twice its size until checkpointed (the
        WAL and the database file); messages still waiting for their commit count too.
        Pages freed inside the database by delivered mail are reused before the file
        grows, so they count as free: acceptance resumes as soon as mail leaves the queue."""
        need = self.reserve + 2 * (size + self._enqueuing)
        free = self.free_space()
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
        return f"{self.free_space()} bytes free in {self._directory} (reserve {self.reserve})"

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
        # No transaction may be left to roll back (SQLite may already have ended it).
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return results


# See Engine._run_inline: about 1,000 WAL pages (SQLite's auto-checkpoint size)
# at ~20 pages per claim and outcome.
INLINE_CHECKPOINT_EVERY = 50

# Sleeps between inline tries for the write lock (Engine._run_batch).
_INLINE_WAITS = (0.0002, 0.0004, 0.0008, 0.0016, 0.0032)

# Engine.read_aside's page cache, KiB (used only as far as reads fill it).
ASIDE_CACHE_KIB = 32 * 1024

# See Engine.free_space.
FREE_SPACE_SLACK = 1 << 30
FREE_SPACE_TTL = 0.1

# Waits between tries for the write lock while another process holds it.
_BEGIN_WAITS = (0.0001, 0.0002, 0.0004, 0.0008, 0.0016)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _open_inline(path: Path) -> sqlite3.Connection:
    """The delivery process's connection for Engine._run_inline."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 0")        # never wait on the event loop's thread
    conn.execute("PRAGMA synchronous = NORMAL")    # non-durable writes only (Engine.write)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA secure_delete = {SECURE_DELETE}")
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints run in the database thread
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}").fetchall()
    return conn


def _open_aside(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Engine.read_aside's connection: reads only, used on one thread (its executor's)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute("PRAGMA query_only = ON")
    # A search scans the inbox's tables (tens of MB at 100,000 messages): a page cache
    # larger than SQLite's 2 MB default keeps repeated searches off the file system.
    conn.execute(f"PRAGMA cache_size = {-ASIDE_CACHE_KIB}")
    return conn


def _read_transaction(conn: sqlite3.Connection, op: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN")
    try:
        return op(conn)
    finally:
        conn.execute("ROLLBACK")   # read only: nothing to commit


def _begin_immediate(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """Take the write lock, waiting in short steps while another process writes.

    The daemon's listeners and its delivery process (mta/daemon/delivery_process.py) write to
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


