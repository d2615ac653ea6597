#!/usr/bin/env python3
"""The queue store alone, SQLite against PostgreSQL: enqueue and the delivery cycle.

    python benchmarks/store_bench.py [--messages 3000] [--runs 5] [--dsn URI]

No SMTP, no daemon: the store's own calls, as the daemon makes them, in this
process. Per backend and run (backends alternate, each run on a fresh queue):

  enqueue x1     enqueue() one message at a time (a single serial client)
  enqueue x20    20 tasks enqueueing at once (20 SMTP sessions' DATA commits)
  cycle          claim(limit 20, bodies prefetched) then record_outcomes() for
                 each claimed message at once, until the queue is empty: the
                 delivery process's store work for one delivered message

Each prints messages/s, this process's CPU per message (the client side:
Python, asyncpg or aiosqlite's thread) and, for PostgreSQL, the database
server's CPU per message (every process of the private cluster, from /proc)
and its write transactions (commits) per message (transaction ids assigned). Medians over
--runs. Messages are 1 KB with one recipient, as in relay_bench's scenario (a).

PostgreSQL: a private cluster started with tests/support/postgres.py (as the
postgres user when run as root; fsync and synchronous_commit on), or --dsn for
a server of your own (its CPU is then not measured). --pg-set name=value sets
a server parameter on the private cluster (ALTER SYSTEM, reloaded), e.g.
``--pg-set commit_delay=200 --pg-set commit_siblings=2`` to try PostgreSQL's
own commit grouping.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import procfs  # noqa: E402

from mta.model import NewMessage, RcptState, Recipient  # noqa: E402
from mta.store.api import Queue, RecipientUpdate, new_queue_id  # noqa: E402

CONCURRENCY = 20
CLAIM_LIMIT = 20
PREFETCH_BYTES = 1 << 20
BODY = (b"Benchmark body line, padded to a realistic length for the store bench.\r\n" * 15)[:1024]


def make_message(i: int) -> NewMessage:
    mid = new_queue_id()
    return NewMessage(id=mid, sender="sender@source.test", recipients=(Recipient("rcpt@dest.test"),),
                      data=f"Message-ID: <{mid}@bench.test>\r\nSubject: {i}\r\n\r\n".encode() + BODY,
                      arrival=time.time(), client="127.0.0.1", listener="bench", helo="bench")


@dataclass
class Figures:
    rate: float = 0.0            # messages/s
    client_ms: float = 0.0       # this process's CPU per message
    server_ms: float | None = None   # the database server's CPU per message
    xacts: float | None = None   # committed transactions per message (PostgreSQL)


class Backend:
    """One fresh queue per phase; opened, measured, closed."""

    name = ""

    async def open(self) -> Queue: ...
    async def close(self) -> None: ...
    def server_cpu(self) -> float | None: return None
    async def xact_commits(self) -> int | None: return None


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.n = 0

    async def open(self) -> Queue:
        from mta.store.sqlite.store import SQLiteStore
        self.n += 1
        self.store = SQLiteStore(self.tmp / f"queue-{self.n}.db")
        await self.store.open()
        return self.store.queue

    async def close(self) -> None:
        await self.store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.tmp / f'queue-{self.n}.db'}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240


class PostgreSQLBackend(Backend):
    name = "postgresql"

    def __init__(self, cluster, dsn: str | None, *, unbatched: bool = False):
        self.cluster = cluster
        self.fixed_dsn = dsn
        self.unbatched = unbatched
        self.database: str | None = None

    async def open(self) -> Queue:
        from mta.store.postgresql.engine import PgEngine
        from mta.store.postgresql.queue import PostgreSQLQueue
        if self.cluster is not None:
            self.database = self.cluster.create_database()
            dsn = self.cluster.dsn(self.database)
        else:
            dsn = self.fixed_dsn
            await self._clear(dsn)
        # The daemon's pool size (PgEngine's default): sessions beyond it wait for a connection.
        self.engine = PgEngine(dsn)
        await self.engine.open()
        self.stat_conn = await _connect(dsn)
        queue = PostgreSQLQueue(self.engine, node="bench")
        if self.unbatched:   # the batches of mta/store/postgresql/batches.py off
            queue._new_mail = Unbatched(queue._store_new_mail)
            queue._outcomes = Unbatched(queue._record_plain_outcomes)
        return queue

    @staticmethod
    async def _clear(dsn: str) -> None:
        conn = await _connect(dsn)
        try:
            if await conn.fetchval("SELECT to_regclass('messages') IS NOT NULL"):
                await conn.execute("TRUNCATE messages, bodies, recipients, history CASCADE")
        finally:
            await conn.close()

    async def close(self) -> None:
        await self.stat_conn.close()
        await self.engine.close()
        if self.cluster is not None and self.database:
            self.cluster.drop_database(self.database)

    def server_cpu(self) -> float | None:
        if self.cluster is None:
            return None
        return procfs.cpu_seconds(procfs.tree(postmaster_pid(self.cluster.data)))

    async def xact_commits(self) -> int | None:
        # Write transactions (each commits with a WAL flush) get a transaction id; read-only
        # ones do not. The next id to be assigned, read without taking one: ids assigned in
        # between = write transactions committed or rolled back, cluster-wide (the private
        # cluster has no other users). pg_stat_database's xact_commit would count reads
        # too, and reaches the view only seconds later.
        return int(await self.stat_conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"))

class Unbatched:
    """--unbatched: each enqueue and each outcome a transaction of its own."""

    def __init__(self, store):
        self.store = store

    async def add(self, item):
        [result] = await self.store([item])
        return result


async def _connect(dsn: str):
    import asyncpg
    return await asyncpg.connect(dsn)


def postmaster_pid(data: Path) -> int:
    return int((data / "postmaster.pid").read_text().split()[0])


# --------------------------------------------------------------------------- the phases

async def enqueue_serial(queue: Queue, n: int) -> None:
    for i in range(n):
        await queue.enqueue(make_message(i))


async def enqueue_concurrent(queue: Queue, n: int) -> None:
    numbers = iter(range(n))

    async def session() -> None:
        for i in numbers:
            await queue.enqueue(make_message(i))

    await asyncio.gather(*(session() for _ in range(CONCURRENCY)))


async def cycle(queue: Queue, n: int) -> None:
    delivered = 0
    while True:
        claimed = await queue.claim(time.time(), CLAIM_LIMIT, prefetch_bytes=PREFETCH_BYTES)
        if not claimed.due:
            break
        for due in claimed.due:
            if due.message_id not in claimed.bodies:
                await queue.message_data(due.message_id)
        now = time.time()
        await asyncio.gather(*(queue.record_outcomes(
            d.message_id, [RecipientUpdate(d.rcpt_no, RcptState.DELIVERED, d.attempts + 1, 0.0, None)], now)
            for d in claimed.due))
        delivered += len(claimed.due)
    if delivered != n:
        raise RuntimeError(f"cycle delivered {delivered} of {n}")


PHASES = ("enqueue x1", "enqueue x20", "cycle")


async def measure(backend: Backend, phase: str, n: int) -> Figures:
    queue = await backend.open()
    try:
        if phase == "cycle":
            await enqueue_concurrent(queue, n)        # not measured: the mail to deliver
        work: Callable[[Queue, int], Awaitable[None]] = {
            "enqueue x1": enqueue_serial, "enqueue x20": enqueue_concurrent, "cycle": cycle}[phase]
        xacts0 = await backend.xact_commits()
        server0 = backend.server_cpu()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        await work(queue, n)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        server1 = backend.server_cpu()
        xacts1 = await backend.xact_commits()
    finally:
        await backend.close()
    figures = Figures(n / elapsed, 1000 * cpu / n)
    if server0 is not None and server1 is not None:
        figures.server_ms = 1000 * (server1 - server0) / n
    if xacts0 is not None and xacts1 is not None:
        figures.xacts = (xacts1 - xacts0) / n
    return figures


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


async def run(args: argparse.Namespace, backends: list[Backend]) -> None:
    results: dict[tuple[str, str], list[Figures]] = {}
    for run_no in range(args.runs):
        order = backends if run_no % 2 == 0 else backends[::-1]
        for phase in args.phases:
            for backend in order:
                f = await measure(backend, phase, args.messages)
                results.setdefault((phase, backend.name), []).append(f)
                print(f"  run {run_no + 1} {phase:12} {backend.name:11} {f.rate:8.0f}/s  client {f.client_ms:.3f}"
                      f" ms/msg  server {fmt(f.server_ms, '.3f')} ms/msg  xact/msg {fmt(f.xacts, '.3f')}",
                      flush=True)
    print(f"\n==== median of {args.runs} run(s), {args.messages:,} messages of 1 KB per phase; {os.cpu_count()} CPUs;"
          f" load average now {os.getloadavg()[0]:.1f}")
    print(f"{'phase':13}{'backend':12}{'msg/s':>9}{'client ms':>11}{'server ms':>11}{'total ms':>10}{'xact/msg':>10}")
    for phase in args.phases:
        for backend in backends:
            runs = results[(phase, backend.name)]
            rate = median([r.rate for r in runs])
            client = median([r.client_ms for r in runs])
            server = median([r.server_ms for r in runs])
            total = median([r.client_ms + (r.server_ms or 0.0) for r in runs])
            xacts = median([r.xacts for r in runs])
            print(f"{phase:13}{backend.name:12}{fmt(rate, ',.0f'):>9}{fmt(client, '.3f'):>11}"
                  f"{fmt(server, '.3f'):>11}{fmt(total, '.3f'):>10}{fmt(xacts, '.3f'):>10}")
    print("client ms: this process's CPU per message; server ms: the PostgreSQL cluster's processes;"
          " xact/msg: write transactions (commits) per message")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=3000, help="messages per phase (default 3,000)")
    p.add_argument("--runs", type=int, default=5, help="runs per phase and backend (default 5)")
    p.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite,postgresql")
    p.add_argument("--phases", default="x1,x20,cycle", help="comma-separated: x1,x20,cycle")
    p.add_argument("--dsn", help="a PostgreSQL database of your own (emptied before each phase) instead of"
                                 " a private cluster")
    p.add_argument("--pg-set", action="append", default=[], metavar="NAME=VALUE",
                   help="a server parameter for the private cluster (ALTER SYSTEM), e.g. commit_delay=200")
    p.add_argument("--unbatched", action="store_true",
                   help="PostgreSQL: every enqueue and delivery outcome in a transaction of its own (to measure"
                        " what sharing commits gives)")
    p.add_argument("--tmpdir", default=None, help="where the SQLite files and the cluster live (a real disk)")
    args = p.parse_args(argv)
    names = {"x1": "enqueue x1", "x20": "enqueue x20", "cycle": "cycle"}
    try:
        args.phases = [names[k.strip()] for k in args.phases.split(",") if k.strip()]
    except KeyError as exc:
        p.error(f"unknown phase {exc}")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if set(args.backends) - {"sqlite", "postgresql"}:
        p.error("--backends: sqlite and/or postgresql")
    if args.pg_set and args.dsn:
        p.error("--pg-set is for the private cluster (set the parameters on your own server yourself)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tmpdir:
        tempfile.tempdir = args.tmpdir
    cluster = None
    try:
        backends: list[Backend] = []
        tmp = Path(tempfile.mkdtemp(prefix="store-bench-"))
        if "sqlite" in args.backends:
            backends.append(SQLiteBackend(tmp))
        if "postgresql" in args.backends:
            if args.dsn is None:
                from tests.support.postgres import Cluster, unavailable_reason
                if reason := unavailable_reason():
                    sys.exit(f"store_bench: {reason} (or give --dsn)")
                cluster = Cluster()
                cluster.start()
                for setting in args.pg_set:
                    name, _, value = setting.partition("=")
                    cluster.psql(f"ALTER SYSTEM SET {name} = '{value}'")
                if args.pg_set:
                    cluster.psql("SELECT pg_reload_conf()")
                    print("server:", ", ".join(
                        f"{s.partition('=')[0]} = {cluster.psql('SHOW ' + s.partition('=')[0]).strip()}"
                        for s in args.pg_set))
            backends.append(PostgreSQLBackend(cluster, args.dsn, unbatched=args.unbatched))
        try:
            import uvloop  # as the daemon (mta/daemon/runtime.py), when installed
            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = asyncio.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(args, backends))
    finally:
        if cluster is not None:
            cluster.remove()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
