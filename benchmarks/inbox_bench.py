#!/usr/bin/env python3
"""Lab inbox reads over a large store: the list, paging, searches and counts (issue 15).

    python benchmarks/inbox_bench.py [--messages 100000] [--runs 7] [--tmpdir DIR] [--keep]
    python benchmarks/inbox_bench.py --queue DIR/queue.db     # the reads again, on a kept file
    python benchmarks/inbox_bench.py --backend postgresql [--dsn postgresql://...]

With ``--backend postgresql`` the store is a PostgreSQL database: ``--dsn`` names an
empty one (or one filled by an earlier run: ``--no-fill``), else a private cluster is
started for the run (tests/support/postgres.py: Debian's server binaries, a temporary
directory, a free port; run as root, it runs as the postgres user) and removed after.
The fill goes through the PostgreSQL queue's own copy path (queue.py _insert_copies),
1,000 messages per transaction, and the reads through PostgreSQLInbox.

Fills a fresh queue file with --messages delivered messages through the store's
own insert path (mta.store.sqlite.mailboxes.insert_copies, the SQL local
delivery's commit runs, in batches of 1,000 per commit), each summarized as
local delivery summarizes it (in worker processes). Messages go to 10 lab mailboxes (every tenth to
two of them), ~1.5 KB each, every twentieth with an attachment. Then, through
SQLiteStore.inbox as the HTTP API calls it, it prints the median and the
slowest of --runs timings of:

  newest 50        page(): the list's first page (target: <= 50 ms at 100,000)
  page @50000      page(start=50000)
  subject search   page(subject:"order 04242"): one match (target: <= 500 ms)
  subject broad    page(subject:order): every message matches
  free word        page(quartz): a word in 1 in 100 bodies
  free word none   page(zebrafish): no match, every body read
  mailbox filter   page(mailbox=user3@lab.test)
  counts           page(limit=0): total, unread and the tags in use

Then the same file is served by a real `mta serve` with an http listener,
and the newest 50, the subject search and the mailbox filter are timed again
as a Mailpit client sees them: GET /api/v1/messages and /api/v1/search over
one keep-alive connection, JSON read to the end (--no-http skips this).

The file lives under --tmpdir (a real disk), in a temporary directory removed
at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mta.inbox.model import InboxSummary  # noqa: E402
from mta.inbox.search import parse_query  # noqa: E402
from mta.inbox.summary import summarize  # noqa: E402
from mta.mailbox.local import delivery_headers  # noqa: E402
from mta.model import MailboxCopy  # noqa: E402
from mta.store.sqlite.mailboxes import insert_copies  # noqa: E402
from mta.store.sqlite.store import SQLiteStore  # noqa: E402

BATCH = 1000
MAILBOXES = [f"user{n}@lab.test" for n in range(10)]
LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et"
         " dolore magna aliqua enim minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea"
         " commodo consequat duis aute irure reprehenderit voluptate velit esse cillum fugiat nulla")
WORDS = LOREM.split()


def make_message(n: int, rng: random.Random) -> bytes:
    body = "\r\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(18))
    if n % 100 == 7:
        body += "\r\nquartz delivery notice"
    headers = (f"From: Shop {n % 97} <shop{n % 97}@shop.test>\r\nTo: Customer <{MAILBOXES[n % 10]}>\r\n"
               f"Subject: Order {n:05d} confirmation\r\nMessage-ID: <order-{n}@shop.test>\r\n"
               "Date: Tue, 02 Jan 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n")
    if n % 20 == 0:
        return (headers + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
                "Content-Type: text/plain\r\n\r\n" + body + "\r\n--b\r\nContent-Type: application/pdf\r\n"
                'Content-Disposition: attachment; filename="invoice.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
                "\r\nJVBERi0xLjQK\r\n--b--\r\n").encode()
    return (headers + "Content-Type: text/plain\r\n\r\n" + body + "\r\n").encode()


def summarized(first: int, last: int) -> list[tuple[int, bytes, InboxSummary]]:
    """Messages first..last-1 with their summaries (in a worker process: parsing is
    local delivery's work, ~2.5 ms a message, not the store's)."""
    rng = random.Random(first)
    out = []
    for n in range(first, last):
        data = make_message(n, rng)
        out.append((n, data, summarize(data)))
    return out


async def fill(store: Any, count: int) -> tuple[float, float]:
    """Returns (wall seconds, seconds spent in the store's commits)."""
    started = time.monotonic()
    in_store = 0.0
    base = time.time() - count
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor() as pool:
        batches = [loop.run_in_executor(pool, summarized, first, min(first + BATCH, count))
                   for first in range(0, count, BATCH)]
        for done, batch in enumerate(batches, 1):
            copies = []
            for n, data, summary in await batch:
                boxes = [MAILBOXES[n % 10]] + ([MAILBOXES[(n + 1) % 10]] if n % 10 == 0 else [])
                copies += [MailboxCopy(box, f"{n:012X}", "shop@shop.test", "",
                                       delivery_headers("shop@shop.test", box, None) + data, base + n, 1_000_000,
                                       summary) for box in boxes]

            commit = time.monotonic()
            if isinstance(store, SQLiteStore):
                def insert(conn: Any, copies: list[MailboxCopy] = copies) -> int:
                    return insert_copies(conn, copies, time.time())

                await store.engine.write(insert)
            else:
                from mta.store.postgresql.queue import _insert_copies

                async def insert_pg(conn: Any, copies: list[MailboxCopy] = copies) -> None:
                    await _insert_copies(conn, copies, time.time())

                await store.engine.run(insert_pg)
            in_store += time.monotonic() - commit
            print(f"\r  filled {min(done * BATCH, count)}/{count}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return time.monotonic() - started, in_store


async def timed(runs: int, call: Callable[[], Awaitable[Any]]) -> tuple[float, float, Any]:
    await call()   # warm: the first read opens the aside connection and fills the page cache
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), max(times), result


class _PgStore:
    """The PostgreSQL engine and inbox (what this benchmark uses of a store)."""

    def __init__(self, dsn: str):
        from mta.store.postgresql.engine import PgEngine
        from mta.store.postgresql.inbox import PostgreSQLInbox

        self.engine = PgEngine(dsn)
        self.inbox = PostgreSQLInbox(self.engine)

    async def open(self) -> None:
        await self.engine.open()

    async def close(self) -> None:
        await self.engine.close()

    async def size(self) -> int:
        async def read(conn: Any) -> int:
            return int(await conn.fetchval("SELECT pg_database_size(current_database())"))

        return await self.engine.run(read)

    async def analyze(self) -> None:
        """VACUUM ANALYZE, as autovacuum would soon after a bulk load: planner statistics
        and the visibility map (counts by index-only scans)."""
        import asyncpg

        from mta.store.postgresql.engine import one_line
        conn = await asyncpg.connect(self.engine.dsn)
        try:
            await conn.execute("VACUUM ANALYZE")
        except asyncpg.PostgresError as exc:
            print(f"VACUUM ANALYZE: {one_line(exc)}", file=sys.stderr)
        finally:
            await conn.close()


async def bench(args: argparse.Namespace, directory: Path) -> None:
    path = args.queue or directory / "queue.db"
    store: Any = SQLiteStore(path) if args.backend == "sqlite" else _PgStore(args.dsn)
    await store.open()
    try:
        inbox = store.inbox
        if args.queue is None and not args.no_fill:
            took, in_store = await fill(store, args.messages)
            await inbox.set_read([f"{n:012X}" for n in range(0, args.messages, 3)], True)
            await inbox.set_tags([f"{n:012X}" for n in range(0, args.messages, 1000)], ["sampled"])
            if isinstance(store, SQLiteStore):
                await store.engine.checkpoint()
                size = os.path.getsize(path)   # noqa: ASYNC240 - once, between measurements
                where = "queue file"
            else:   # what autovacuum does within a minute of the fill (schema.py: at 2% of the entries)
                await store.analyze()
                size, where = await store.size(), "database (after VACUUM ANALYZE)"
            print(f"fill: {args.messages} messages in {took:.1f} s, {in_store:.1f} s of it in the store's commits"
                  f" ({args.messages / in_store:.0f} messages/s); {where} {size / 1e6:.0f} MB")
        else:
            args.messages = (await inbox.page(limit=0)).total
            print(f"{path if args.backend == 'sqlite' else args.dsn}: {args.messages} messages")
        cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("newest 50", lambda: inbox.page()),
            ("page @50000", lambda: inbox.page(start=min(50_000, args.messages // 2))),
            ("subject search", lambda: inbox.page(parse_query('subject:"order 04242"'))),
            ("subject broad", lambda: inbox.page(parse_query("subject:order"))),
            ("free word", lambda: inbox.page(parse_query("quartz"))),
            ("free word none", lambda: inbox.page(parse_query("zebrafish"))),
            ("mailbox filter", lambda: inbox.page(mailbox="user3@lab.test")),
            ("counts", lambda: inbox.page(limit=0)),
        ]
        print(f"backend: {args.backend}")
        print(f"{'read':<16} {'median ms':>10} {'max ms':>8}  {'matched':>8} {'listed':>6}   ({args.runs} runs)")
        for name, call in cases:
            median, worst, page = await timed(args.runs, call)
            print(f"{name:<16} {median * 1000:>10.1f} {worst * 1000:>8.1f}  {page.matched:>8} {len(page.entries):>6}")
    finally:
        await store.close()


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def bench_http(args: argparse.Namespace, path: Path, directory: Path) -> None:
    """The reads through a real daemon's Mailpit API (store, HTTP and JSON together)."""
    smtp, web = free_port("127.0.0.1"), free_port("127.0.0.1")
    config = directory / "mta.yaml"
    config.write_text(json.dumps({   # JSON is YAML
        "hostname": "inbox-bench.test", "local_domains": ["lab.test"], "mailboxes": {"catch_all": True},
        "queue": ({"path": str(path)} if args.backend == "sqlite" else {"backend": "postgresql", "dsn": args.dsn}),
        "metrics": {"address": None},
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{smtp}", "mode": "relay"},
                      {"name": "web", "address": f"127.0.0.1:{web}", "mode": "http"}]}))
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(directory / "mta.log", "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "mta", "serve", "--config", str(config)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", web), timeout=1).close()
                break
            except OSError:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"inbox_bench: mta serve did not start; see {directory / 'mta.log'}") from None
                time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", web, timeout=30)
        cases = [("newest 50", "/api/v1/messages?limit=50"),
                 ("subject search", "/api/v1/search?limit=50&query="
                  + urllib.parse.quote('subject:"order 04242"')),
                 ("mailbox filter", "/api/v1/messages?limit=50&mailbox=user3@lab.test")]
        print(f"\nthrough mta serve's HTTP API (keep-alive, JSON read and parsed; {args.runs} runs)")
        print(f"{'GET':<16} {'median ms':>10} {'max ms':>8}  {'total':>8} {'count':>6}")
        for name, url in cases:
            times, body = [], {}
            for run in range(args.runs + 1):   # the first one warms the daemon's caches
                started = time.perf_counter()
                conn.request("GET", url)
                reply = conn.getresponse()
                body = json.loads(reply.read())
                if reply.status != 200:
                    raise SystemExit(f"inbox_bench: GET {url}: {reply.status} {body}")
                if run:
                    times.append(time.perf_counter() - started)
            print(f"{name:<16} {statistics.median(times) * 1000:>10.1f} {max(times) * 1000:>8.1f}"
                  f"  {body['messages_count']:>8} {body['count']:>6}")
        conn.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--tmpdir", default=None, help="where the queue file lives (default: $TMPDIR or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the queue file (to run again with --queue)")
    p.add_argument("--queue", type=Path, default=None, help="read this kept queue file instead of filling one")
    p.add_argument("--no-http", action="store_true", help="time the store only, not a daemon's HTTP API")
    p.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--dsn", default=None,
                   help="postgresql: the database (default: a private cluster started for the run)")
    p.add_argument("--no-fill", action="store_true", help="postgresql: read the database --dsn as it is")
    return p.parse_args(argv)


def private_cluster() -> Any:
    """A private PostgreSQL cluster for this run (the tests' own, tests/support/postgres.py)."""
    from tests.support.postgres import Cluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"inbox_bench: {reason}")
    cluster = Cluster()
    cluster.start()
    return cluster


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="inbox-bench-", dir=args.tmpdir))
    cluster = None
    try:
        if args.backend == "postgresql" and args.dsn is None:
            cluster = private_cluster()
            args.dsn = cluster.dsn(cluster.create_database())
        asyncio.run(bench(args, directory))
        if not args.no_http:
            bench_http(args, args.queue or directory / "queue.db", directory)
    finally:
        if cluster is not None:
            cluster.remove()
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
