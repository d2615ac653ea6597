#!/usr/bin/env python3
"""Relay throughput: mta against Postfix, same workload, same run, alternating.

    python benchmarks/relay_bench.py [--runs 3] [--scenarios a,b,c,d,e] [--quick]

Each MTA relays to Postfix's smtp-sink on loopback. Per scenario and MTA it
prints the medians over --runs of:

  accepted/s    messages / wall time of the sending client (smtp-source)
  delivered/s   messages / time from the client's start until the sink has
                received every message (counted with smtp-sink -c)
  CPU s         user+system CPU of the MTA's processes during the window
                (mta: its main and delivery processes; Postfix: master and every process
                under it, exited children included via cutime/cstime)
  RSS MB        peak resident memory in the window (VmHWM, reset at the
                start): for both, the SUM of their processes'
                own peaks (an upper bound: shared pages count once per process)
  PSS MB        peak of the summed proportional set size, sampled every 0.5 s
                (shared pages split between sharers: the fairer comparison)

Needs root (smtp-sink -u nobody, Postfix's own instance, /proc/PID/clear_refs)
and Debian's postfix package. Nothing listens on port 25 and /etc/postfix is
only read. Every process and temporary directory is cleaned up on exit,
Ctrl-C included.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procfs  # noqa: E402
from mta_peer import ROOT, MtaDaemon, create_backlog_db, mta_env, wait_greeting, write_config  # noqa: E402
from pg_peer import PgServer  # noqa: E402
from pg_peer import unavailable_reason as pg_unavailable  # noqa: E402
from postfix_peer import PostfixRelay  # noqa: E402
from sink import Sink, free_port  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
HERE = Path(__file__).resolve().parent
SINK_HOST = "127.0.0.3"           # smarthost / relayhost address (the sink listens on all addresses)
BACKLOG_DOMAIN = "backlog.test"   # the deferred backlog's recipients; never delivered during the bench
EMPTY = {"mta": "mta, no backlog", "postfix": "postfix, no backlog"}  # (d)'s paired baseline rows
HTTP_POLL = "mta + http poll"     # --http-poll: the HTTP listener on, its message list read every 100 ms
POLL_INTERVAL = 0.1
# Issue 16: mta with its queue on PostgreSQL, one node, and two nodes on one database
# (two `mta serve` on this machine, the clients split between them).
PG_NODES = {1: "mta pg, 1 node", 2: "mta pg, 2 nodes"}
DATABASE = "database"             # the PostgreSQL server's share of the CPU (Result.cpu_parts)


# --------------------------------------------------------------------------- scenarios

@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    messages: int
    size: int
    sessions: int
    keep_connection: bool = False       # smtp-source -d: all messages over one session
    domains: int = 0                    # >0: one recipient in each of this many domains (own next hops)
    backlog: int = 0                    # deferred messages in the queue while this runs

    @property
    def transactions(self) -> int:
        """SMTP transactions the sink must see: one per message and next hop."""
        return self.messages * max(1, self.domains)


def scenarios(quick: bool) -> dict[str, Scenario]:
    q = quick
    return {s.key: s for s in (
        Scenario("a", "{n} x 1 KB, 20 sessions", 500 if q else 5000, 1024, 20),
        Scenario("b", "{n} x 100 KB, 20 sessions", 200 if q else 2000, 100 * 1024, 20),
        Scenario("c", "{n} x 1 KB, one session", 200 if q else 2000, 1024, 1, keep_connection=True),
        Scenario("d", "{n} x 1 KB, 20 sessions, {backlog:,} deferred in the queue", 500 if q else 5000,
                 1024, 20, backlog=10_000 if q else 100_000),
        Scenario("e", "{n} x 1 KB, 10 recipients in 10 domains, 20 sessions", 100 if q else 1000, 1024, 20,
                 domains=10),
    )}


def describe(s: Scenario) -> str:
    return f"({s.key}) " + s.title.format(n=f"{s.messages:,}", backlog=s.backlog)


# --------------------------------------------------------------------------- results

@dataclass
class Result:
    accepted: float = 0.0      # messages/s
    delivered: float = 0.0     # messages/s
    cpu: float = 0.0           # seconds
    rss_kb: int = 0
    pss_kb: int = 0
    startup: float = 0.0       # seconds until the first 220
    rss_max_single_kb: int = 0
    processes: int = 0
    error: str | None = None
    run_no: int = 0            # which run (pairs the variants of one run)
    cpu_parts: dict[str, float] = field(default_factory=dict)   # seconds: per node, the database


@dataclass
class Cell:
    results: list[Result] = field(default_factory=list)

    def ok(self) -> list[Result]:
        return [r for r in self.results if r.error is None]

    def median(self, name: str) -> float | None:
        values = [getattr(r, name) for r in self.ok()]
        return statistics.median(values) if values else None

    def spread(self, name: str) -> float | None:
        """(max - min) / median of a figure over the runs: how noisy the runs were."""
        values = [getattr(r, name) for r in self.ok()]
        if len(values) < 2 or not statistics.median(values):
            return None
        return (max(values) - min(values)) / statistics.median(values)


# --------------------------------------------------------------------------- clean-up

class Cleanup:
    """Everything started is registered here and torn down in reverse order."""

    def __init__(self) -> None:
        self._items: list[tuple[str, object]] = []

    def add(self, what: object) -> object:
        self._items.append(("obj", what))
        return what

    def add_dir(self, path: Path) -> Path:
        self._items.append(("dir", path))
        return path

    def discard(self, what: object) -> None:
        self._items = [(k, o) for k, o in self._items if o is not what]

    def run(self, keep_dirs: bool = False) -> None:
        while self._items:
            kind, what = self._items.pop()
            try:
                if kind == "dir":
                    if not keep_dirs:
                        shutil.rmtree(what, ignore_errors=True)  # type: ignore[arg-type]
                elif isinstance(what, subprocess.Popen):
                    if what.poll() is None:
                        what.kill()
                        what.wait()
                else:
                    what.stop()  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                print(f"cleanup: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------- one measurement

class PeakPss(threading.Thread):
    """Samples the summed PSS of a process tree every ``interval`` seconds."""

    def __init__(self, pids_of, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pids_of = pids_of
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, procfs.pss_kb(self.pids_of()))
            if self._done.wait(self.interval):
                return

    def finish(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, procfs.pss_kb(self.pids_of()))
        return self.peak


class Poller(threading.Thread):
    """A lab test suite's client: GET the inbox's message list every POLL_INTERVAL seconds."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.requests = self.failures = 0
        self.last_error = ""
        self._done = threading.Event()

    def run(self) -> None:
        import urllib.request
        while not self._done.wait(POLL_INTERVAL):
            self.requests += 1
            try:
                with urllib.request.urlopen(self.url + "?limit=50", timeout=5) as reply:
                    reply.read()
            except OSError as exc:
                self.failures += 1
                self.last_error = str(exc)

    def finish(self) -> None:
        self._done.set()
        self.join()


def client_command(s: Scenario, port: int, sink_port: int) -> list[str]:
    if s.domains:
        cmd = [sys.executable, str(HERE / "multircpt_source.py")]
        for i in range(s.domains):
            cmd += ["-t", f"rcpt{i}@d{i}.test"]
    else:
        cmd = [SMTP_SOURCE, "-t", "rcpt@dest.test"]
        if s.keep_connection:
            cmd.append("-d")
    return cmd + ["-l", str(s.size), "-m", str(s.messages), "-s", str(s.sessions),
                  "-f", "sender@source.test", f"127.0.0.1:{port}"]


def run_workload(s: Scenario, port: int | list[int], sink: Sink, pids_of, cleanup: Cleanup, *,
                 source_args: list[str] | None = None, parts: dict[str, object] | None = None) -> Result:
    """Send the scenario's mail to 127.0.0.1:port; wait until the sink has all of it.

    Several ports (several mta nodes): the messages and sessions are split evenly between
    them, one client each. ``parts``: name -> pids_of, CPU measured apart for each (the
    nodes, the database server); the result's CPU is then their sum."""
    res = Result()
    ports = [port] if isinstance(port, int) else port
    parts = parts or {"": pids_of}
    pids = pids_of()
    procfs.reset_peaks(pids)
    cpu0 = {name: procfs.cpu_seconds(f()) for name, f in parts.items()}  # type: ignore[operator]
    pss = PeakPss(pids_of)
    sink.mark()
    pss.start()
    timeout = 60 + s.transactions / 40
    commands = [source_args] if source_args else [
        client_command(share, p, sink.port) for share, p in zip(split(s, len(ports)), ports, strict=True)]
    t0 = time.monotonic()
    clients = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
               for cmd in commands]
    for client in clients:
        cleanup.add(client)
    accepted_at = None
    try:
        while True:
            now = time.monotonic()
            if accepted_at is None and all(c.poll() is not None for c in clients):
                accepted_at = now
                failed = [c for c in clients if c.returncode != 0]
                if failed:
                    client = failed[0]
                    err = client.stderr.read().decode(errors="replace").strip() if client.stderr else ""
                    res.error = f"client failed ({client.returncode}): {err[-300:]}"
                    break
            got = sink.count()
            if accepted_at is not None and got >= s.transactions:
                break
            if now - t0 > timeout:
                res.error = f"timeout after {timeout:.0f}s: sink has {got}/{s.transactions}"
                break
            time.sleep(0.01)
        done = time.monotonic()
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
            cleanup.discard(client)
        pss_peak = pss.finish()
    pids = pids_of()
    mem = procfs.peak_memory(pids)
    res.cpu_parts = {name: procfs.cpu_seconds(f()) - cpu0[name] for name, f in parts.items()}  # type: ignore[operator]
    res.cpu = sum(res.cpu_parts.values())
    if list(res.cpu_parts) == [""]:
        res.cpu_parts = {}
    res.rss_kb, res.rss_max_single_kb, res.processes = mem.hwm_sum_kb, mem.hwm_max_kb, mem.processes
    res.pss_kb = pss_peak
    if accepted_at is not None:
        res.accepted = s.messages / (accepted_at - t0)
    res.delivered = s.messages / (done - t0)
    return res


def split(s: Scenario, ways: int) -> list[Scenario]:
    """The scenario's messages and sessions shared out between ``ways`` clients."""
    if ways == 1:
        return [s]
    return [dataclasses.replace(s, messages=s.messages // ways + (i < s.messages % ways),
                                sessions=max(1, s.sessions // ways + (i < s.sessions % ways)))
            for i in range(ways)]


# --------------------------------------------------------------------------- the bench

class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cleanup = Cleanup()
        self.work = self.cleanup.add_dir(Path(tempfile.mkdtemp(prefix="relay-bench-", dir=args.tmpdir)))
        os.chmod(self.work, 0o755)  # Postfix's daemons (user postfix) must reach their queue under it
        self.cells: dict[tuple[str, str], Cell] = {}
        self.notes: list[str] = []
        self.extra: dict[str, float] = {}
        self.profiles: dict[tuple[str, str], list[Path]] = {}  # (scenario, variant) -> py-spy files
        self._n = 0
        self.load_start = os.getloadavg()[0]
        self.pg: PgServer | None = None     # the database of the "mta pg" variants (issue 16)

    def new_dir(self, name: str) -> Path:
        self._n += 1
        path = self.work / f"{self._n:03d}-{name}"
        path.mkdir()
        os.chmod(path, 0o755)
        return path

    def cell(self, scenario: str, mta: str) -> Cell:
        return self.cells.setdefault((scenario, mta), Cell())

    @staticmethod
    def routes(s: Scenario, sink: Sink) -> dict[str, tuple[str, int]]:
        return {f"d{i}.test": (f"127.0.0.{10 + i}", sink.port) for i in range(s.domains)}

    # -------------------------------------------------------------- mta
    def run_mta(self, s: Scenario, sink: Sink, backlog_db: Path | None, *, http_poll: bool = False) -> Result:
        d = self.new_dir(f"mta-{s.key}")
        listen = ("127.0.0.1", free_port("127.0.0.1"))
        http = ("127.0.0.1", free_port("127.0.0.1")) if http_poll else None
        config = write_config(d, listen, smarthost=None if s.domains else (SINK_HOST, sink.port),
                              routes=self.routes(s, sink), http=http)
        if backlog_db is not None:
            shutil.copyfile(backlog_db, d / "queue.db")
            # The copy is 170 MB of dirty page cache: left to the kernel, its writeback
            # would compete with the run's own fsyncs (ext4 orders them) and count
            # against the backlog. The scenario is mail sitting in the queue, not a
            # queue file written a moment ago.
            with open(d / "queue.db", "rb+") as f:
                os.fsync(f.fileno())
        daemon = MtaDaemon(config, listen, d / "mta.log")
        self.cleanup.add(daemon)
        spy = None
        try:
            daemon.start()
            if self.args.profile:
                spy = self.start_profiler(daemon, s, "mta" if backlog_db or not s.backlog else EMPTY["mta"])
            poller = Poller(f"http://{http[0]}:{http[1]}/api/v1/messages") if http else None
            if poller is not None:
                poller.start()
            try:
                res = run_workload(s, listen[1], sink, daemon.pids, self.cleanup)
            finally:
                if poller is not None:
                    poller.finish()
            if poller is not None and res.error is None and (poller.failures or not poller.requests):
                res.error = f"http poll: {poller.requests} requests, {poller.failures} failed ({poller.last_error})"
            res.startup = daemon.startup_s
            if res.error:
                res.error += "\n" + daemon.log_tail(5)
        except RuntimeError as exc:
            res = Result(error=str(exc))
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    spy.wait(60)
                except subprocess.TimeoutExpired:
                    spy.kill()
                self.cleanup.discard(spy)
            status = daemon.stop()
            self.cleanup.discard(daemon)
        if status not in (0, None) and res.error is None:
            res.error = f"mta exited with status {status} on SIGTERM"
        if backlog_db is not None:  # kept for `mta queue list`; only the latest copy
            previous = getattr(self, "last_mta_backlog", None)
            if previous is not None:
                shutil.rmtree(previous[1], ignore_errors=True)
            self.last_mta_backlog = (config, d)
        else:
            shutil.rmtree(d, ignore_errors=True)
        return res

    def start_profiler(self, daemon: MtaDaemon, s: Scenario, variant: str) -> subprocess.Popen[bytes]:
        """py-spy samples the daemon (without pausing it) for the whole workload."""
        self.args.profile.mkdir(parents=True, exist_ok=True)
        files = self.profiles.setdefault((s.key, variant), [])
        tag = "-no-backlog" if variant != "mta" else ""
        out = self.args.profile / f"mta-{s.key}{tag}-{len(files) + 1}.txt"
        spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "--threads", "--subprocesses", "--rate", "200",
                                "--format", "raw", "--output", str(out), "--pid", str(daemon.proc.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.cleanup.add(spy)
        files.append(out)
        time.sleep(1.0)  # py-spy attaches
        return spy

    # -------------------------------------------------------------- mta on PostgreSQL
    def run_mta_pg(self, s: Scenario, sink: Sink, nodes: int) -> Result:
        """mta with its queue on a fresh PostgreSQL database: ``nodes`` daemons on it, each
        with its own hostname (its node name) and listener, the clients split between them."""
        assert self.pg is not None
        dsn = self.pg.create_database()
        daemons: list[MtaDaemon] = []
        res = Result()
        try:
            for i in range(nodes):
                d = self.new_dir(f"mta-pg{nodes}-node{i + 1}-{s.key}")
                listen = ("127.0.0.1", free_port("127.0.0.1"))
                config = write_config(d, listen, smarthost=None if s.domains else (SINK_HOST, sink.port),
                                      routes=self.routes(s, sink), dsn=dsn, hostname=f"mta{i + 1}.bench.test")
                daemon = MtaDaemon(config, listen, d / "mta.log")
                self.cleanup.add(daemon)
                daemons.append(daemon)
                daemon.start()     # one after the other: the first creates the schema

            def all_pids() -> list[int]:
                return [pid for daemon in daemons for pid in daemon.pids()] + self.pg.pids()  # type: ignore[union-attr]

            parts: dict[str, object] = {f"node {i + 1}": daemon.pids for i, daemon in enumerate(daemons)}
            parts[DATABASE] = self.pg.pids
            time.sleep(0.2)
            res = run_workload(s, [daemon.listen[1] for daemon in daemons], sink, all_pids, self.cleanup,
                               parts=parts)
            res.startup = max(daemon.startup_s for daemon in daemons)
            if res.error:
                res.error += "".join("\n" + daemon.log_tail(5) for daemon in daemons)
        except RuntimeError as exc:
            res = Result(error=str(exc))
        finally:
            for daemon in daemons:
                status = daemon.stop()
                self.cleanup.discard(daemon)
                if status not in (0, None) and res.error is None:
                    res.error = f"mta exited with status {status} on SIGTERM\n{daemon.log_tail(5)}"
                if not self.args.keep:
                    shutil.rmtree(daemon.config.parent, ignore_errors=True)
            try:
                self.pg.drop_database(dsn)
            except Exception as exc:  # noqa: BLE001 - the next run has its own database
                print(f"    (could not drop {dsn}: {exc})", file=sys.stderr)
        return res

    # -------------------------------------------------------------- Postfix
    def make_postfix(self, s: Scenario, sink: Sink, name: str) -> PostfixRelay:
        d = self.new_dir(name)
        listen = ("127.0.0.1", free_port("127.0.0.1"))
        pf = PostfixRelay(d / "postfix", listen, (SINK_HOST, sink.port), transport=self.routes(s, sink),
                          backlog_domain=BACKLOG_DOMAIN if s.backlog else None)
        self.cleanup.add(pf)
        return pf

    def start_postfix(self, pf: PostfixRelay) -> float:
        t0 = time.monotonic()
        pf.start()
        wait_greeting(*pf.listen, timeout=60)
        return time.monotonic() - t0

    def run_postfix(self, s: Scenario, sink: Sink, persistent: PostfixRelay | None = None) -> Result:
        pf = persistent or self.make_postfix(s, sink, f"postfix-{s.key}")
        try:
            if persistent is None:
                startup = self.start_postfix(pf)
            else:
                startup = self.extra.get("pf_backlog_startup", 0.0)
            time.sleep(0.2)  # let master's first children settle before the CPU baseline
            res = run_workload(s, pf.listen[1], sink, pf.pids, self.cleanup)
            res.startup = startup
            if res.error:
                res.error += "\n" + pf.log_tail(5)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            res = Result(error=str(exc))
        finally:
            if persistent is None:
                pf.stop()
                self.cleanup.discard(pf)
                shutil.rmtree(pf.root.parent, ignore_errors=True)
        return res

    def fill_postfix_backlog(self, s: Scenario, sink: Sink) -> PostfixRelay:
        """A Postfix whose deferred queue holds s.backlog messages (defer_transports)."""
        pf = self.make_postfix(s, sink, "postfix-backlog")
        self.start_postfix(pf)
        print(f"    filling Postfix's deferred queue with {s.backlog:,} messages via SMTP ...", flush=True)
        t0 = time.monotonic()
        subprocess.run([SMTP_SOURCE, "-d", "-s", "20", "-m", str(s.backlog), "-l", "1024",
                        "-f", "sender@bench.test", "-t", f"user@{BACKLOG_DOMAIN}",
                        f"127.0.0.1:{pf.listen[1]}"],
                       check=True, stdout=subprocess.DEVNULL, timeout=3600)
        while pf.queue_count("deferred") < s.backlog or pf.queue_count("incoming", "active"):
            if time.monotonic() - t0 > 3600:
                raise RuntimeError("Postfix did not defer the backlog in time")
            time.sleep(0.5)
        self.extra["pf_backlog_fill"] = time.monotonic() - t0
        # Start-up with the backlog in place: stop and start again.
        pf.stop()
        self.extra["pf_backlog_startup"] = self.start_postfix(pf)
        return pf

    # -------------------------------------------------------------- a scenario
    def run_scenario(self, s: Scenario) -> None:
        print(f"\n== {describe(s)}", flush=True)
        sink = Sink(self.new_dir(f"sink-{s.key}"))
        self.cleanup.add(sink)
        backlog_db = pf_backlog = None
        try:
            if s.backlog:
                backlog_db = self.new_dir("backlog") / "queue.db"
                took = create_backlog_db(backlog_db, s.backlog, domain=BACKLOG_DOMAIN)
                print(f"    mta backlog queue.db: {s.backlog:,} deferred messages written with the"
                      f" store's insert code in {took:.1f}s ({backlog_db.stat().st_size / 1e6:.0f} MB)",
                      flush=True)
                if not self.args.no_postfix_backlog:
                    pf_backlog = self.fill_postfix_backlog(s, sink)
            # (d) also measures the same fresh workload on an empty queue in every run, next to the
            # backlog runs, so its with/without ratio is not skewed by load drifting between scenarios.
            variants = ["mta", "postfix"]
            if self.args.http_poll and not s.backlog:
                variants = ["mta", HTTP_POLL, "postfix"]
            if self.pg is not None and not s.backlog:
                variants[-1:-1] = [PG_NODES[n] for n in self.args.pg_nodes]
            if s.backlog:
                variants = ["mta", EMPTY["mta"]] + (["postfix", EMPTY["postfix"]] if pf_backlog else [])
            for run in range(self.args.runs):
                order = variants if run % 2 == 0 else variants[::-1]
                for variant in order:
                    if variant == "mta":
                        res = self.run_mta(s, sink, backlog_db)
                    elif variant == HTTP_POLL:
                        res = self.run_mta(s, sink, None, http_poll=True)
                    elif variant == EMPTY["mta"]:
                        res = self.run_mta(s, sink, None)
                    elif variant in PG_NODES.values():
                        res = self.run_mta_pg(s, sink, next(n for n, v in PG_NODES.items() if v == variant))
                    elif variant == "postfix":
                        res = self.run_postfix(s, sink, pf_backlog)
                    else:
                        res = self.run_postfix(s, sink, None)
                    res.run_no = run
                    self.cell(s.key, variant).results.append(res)
                    parts = "".join(f"  {name} {cpu:.2f}s" for name, cpu in res.cpu_parts.items())
                    print(f"    run {run + 1} {variant:16} " + (
                        f"accepted {res.accepted:7.0f}/s  delivered {res.delivered:7.0f}/s  "
                        f"cpu {res.cpu:6.2f}s  start-up {res.startup:5.2f}s" + (f"  ({parts.strip()})" if parts else "")
                        if res.error is None else f"FAILED: {res.error}"), flush=True)
            if s.backlog:
                self.measure_queue_listing(s, pf_backlog)
        finally:
            if pf_backlog is not None:
                pf_backlog.stop()
                self.cleanup.discard(pf_backlog)
            sink.stop()
            self.cleanup.discard(sink)

    def measure_queue_listing(self, s: Scenario, pf: PostfixRelay | None) -> None:
        config, _ = self.last_mta_backlog
        times = []
        for _ in range(self.args.runs):
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "mta", "queue", "list", "--config", str(config)],
                           stdout=subprocess.DEVNULL, check=True, env=mta_env(), cwd=ROOT)
            times.append(time.monotonic() - t0)
        self.extra["mta_queue_list"] = statistics.median(times)
        if pf is not None:
            times = []
            for _ in range(self.args.runs):
                t0 = time.monotonic()
                subprocess.run(["/usr/sbin/postqueue", "-c", str(pf.config_dir), "-p"],
                               stdout=subprocess.DEVNULL, check=True)
                times.append(time.monotonic() - t0)
            self.extra["pf_mailq"] = statistics.median(times)

    def run(self) -> None:
        table = scenarios(self.args.quick)
        if self.args.postgresql:
            self.pg = PgServer(self.args.dsn, self.args.tmpdir)
            self.cleanup.add(self.pg)
            self.pg.start()
            print(f"mta pg variants on {self.pg.describe()}", flush=True)
        for key in self.args.scenarios:
            self.run_scenario(table[key])
        self.report(table)

    # -------------------------------------------------------------- output
    def report(self, table: dict[str, Scenario]) -> None:
        cols = [("accepted/s", "accepted", "{:.0f}"), ("delivered/s", "delivered", "{:.0f}"),
                ("CPU s", "cpu", "{:.2f}"), ("CPU ms/msg", None, "{:.2f}"),
                ("RSS MB", "rss_kb", "{:.0f}"), ("PSS MB", "pss_kb", "{:.0f}"),
                ("start-up s", "startup", "{:.2f}")]
        print(f"\n==== Results: median of {self.args.runs} run(s){' (--quick)' if self.args.quick else ''}; "
              f"mta {git_describe()} vs Postfix {postfix_version()}; {os.cpu_count()} CPUs; "
              f"load average at start {self.load_start:.1f}, now {os.getloadavg()[0]:.1f}")
        if max(self.load_start, os.getloadavg()[0]) > 1.5:
            print("WARNING: other work was running on this machine: rates are noisy (CPU s less so).")
        head = f"{'':20}" + "".join(f"{c[0]:>13}" for c in cols)
        for key in self.args.scenarios:
            s = table[key]
            print(f"\n{describe(s)}")
            print(head)
            values: dict[str, list[float | None]] = {}
            for mta in ("mta", HTTP_POLL, *PG_NODES.values(), "postfix", EMPTY["mta"], EMPTY["postfix"]):
                cell = self.cells.get((key, mta))
                if cell is None:
                    continue
                row = []
                for _, name, _ in cols:
                    if name is None:
                        cpu = cell.median("cpu")
                        row.append(None if cpu is None else 1000 * cpu / s.messages)
                    elif name in ("rss_kb", "pss_kb"):
                        v = cell.median(name)
                        row.append(None if v is None else v / 1024)
                    else:
                        row.append(cell.median(name))
                values[mta] = row
                failed = len(cell.results) - len(cell.ok())
                print(f"{mta:20}" + "".join(f"{fmt(v, c[2]):>13}" for v, c in zip(row, cols))
                      + (f"   ({failed} failed run(s))" if failed else ""))
            if "mta" in values and "postfix" in values:
                ratios = [a / b if a is not None and b else None
                          for a, b in zip(values["mta"], values["postfix"])]
                print(f"{'mta/postfix':20}" + "".join(f"{fmt(r, '{:.2f}x'):>13}" for r in ratios))
            elif key == "d":
                print(f"{'':20}(Postfix not measured with a backlog: --no-postfix-backlog)")
            self.report_postgresql(key, s, values)
            if "mta" in values and HTTP_POLL in values:
                ratios = [a / b if a is not None and b else None for a, b in zip(values[HTTP_POLL], values["mta"])]
                print(f"{'http poll/mta':20}" + "".join(f"{fmt(r, '{:.2f}x'):>13}" for r in ratios))
                spread = self.cell(key, "mta").spread("delivered")
                if spread is not None:
                    print(f"{'':20}(noise: mta's own delivered/s runs span {spread:.0%} of their median)")
        print("\nRSS: mta = sum of its processes' VmHWM (main and delivery); Postfix = sum of every process's own VmHWM (shared pages"
              "\n     counted per process, so an upper bound). PSS: peak of the summed proportional set size"
              " (0.5 s samples).")
        postfix_runs = [r for (_, m), c in self.cells.items() if m == "postfix" for r in c.ok()]
        pf_single = [r.rss_max_single_kb for r in postfix_runs]
        pf_procs = [r.processes for r in postfix_runs]
        if pf_single:
            print(f"     Postfix's largest single process peaked at {max(pf_single) / 1024:.0f} MB; "
                  f"up to {max(pf_procs)} Postfix processes were alive at the end of a run.")
        if "d" in self.args.scenarios:
            self.report_backlog(table)
        for (key, variant), files in self.profiles.items():
            which = f" [{variant}]" if variant != "mta" else ""
            print(f"\nmta profile, {describe(table[key])}{which} (py-spy, share of samples;"
                  f" {files[0].parent}):")
            print(profile_summary(files))

    def paired(self, key: str, a: str, b: str, name: str) -> float | None:
        """The median over runs of a's figure / b's in the same run (the runs alternate)."""
        first = {r.run_no: getattr(r, name) for r in self.cell(key, a).ok()}
        second = {r.run_no: getattr(r, name) for r in self.cell(key, b).ok()}
        ratios = [first[n] / second[n] for n in first if n in second and second[n]]
        return statistics.median(ratios) if ratios else None

    def report_postgresql(self, key: str, s: Scenario, values: dict[str, list[float | None]]) -> None:
        """Issue 16: the PostgreSQL rows against SQLite and Postfix, and where the CPU went."""
        for variant in PG_NODES.values():
            if variant not in values:
                continue
            for other, label in (("postfix", "postfix"), ("mta", "mta sqlite")):
                if other not in values:
                    continue
                ratios = [a / b if a is not None and b else None for a, b in zip(values[variant], values[other], strict=True)]
                print(f"{variant.replace('mta ', '') + '/' + label:20}" + "".join(
                    f"{fmt(r, '{:.2f}x'):>13}" for r in ratios))
        for variant in PG_NODES.values():
            cell = self.cells.get((key, variant))
            if cell is None or not cell.ok():
                continue
            names = list(cell.ok()[0].cpu_parts)
            shares = {n: statistics.median(r.cpu_parts.get(n, 0.0) for r in cell.ok()) for n in names}
            total = cell.median("cpu") or 0.0
            print(f"  {variant}: CPU ms/msg " + ", ".join(
                f"{n} {1000 * v / s.messages:.2f}" for n, v in shares.items())
                + f" (total {1000 * total / s.messages:.2f}; the database's share"
                  f" {shares.get(DATABASE, 0.0) / total:.0%})" if total else "")
            for other, label in (("postfix", "Postfix"), ("mta", "mta on SQLite")):
                if (key, other) in self.cells:
                    d = self.paired(key, variant, other, "delivered")
                    c = self.paired(key, variant, other, "cpu")
                    print(f"    paired with {label} (median of per-run ratios): delivered/s {fmt(d, '{:.2f}x')},"
                          f" CPU {fmt(c, '{:.2f}x')}")

    def report_backlog(self, table: dict[str, Scenario]) -> None:
        d = table["d"]
        print(f"\nIssue 3: {d.backlog:,} deferred messages in the queue do not slow the delivery of new mail"
              f" (target: within 10% of the same workload on an empty queue, measured in the same runs)")
        for mta in ("mta", "postfix"):
            empty, backlog = self.cells.get(("d", EMPTY[mta])), self.cells.get(("d", mta))
            if not empty or not backlog or not empty.median("delivered") or not backlog.median("delivered"):
                continue
            ratio = backlog.median("delivered") / empty.median("delivered")
            verdict = "PASS" if ratio >= 0.9 else "FAIL"
            print(f"  {mta:8} fresh mail delivered/s: empty queue {empty.median('delivered'):.0f}, "
                  f"with the backlog {backlog.median('delivered'):.0f}: ratio {ratio:.2f}  {verdict}")
            per_msg = [1000 * cell.median("cpu") / d.messages for cell in (empty, backlog)]
            print(f"  {'':8} CPU per fresh message: empty queue {per_msg[0]:.2f} ms, "
                  f"with the backlog {per_msg[1]:.2f} ms")
            print(f"  {'':8} start-up until the first 220: empty queue {empty.median('startup'):.2f}s, "
                  f"with the backlog {backlog.median('startup'):.2f}s")
            a = self.cells.get(("a", mta))
            if a and a.median("delivered"):
                print(f"  {'':8} (scenario (a), the same workload measured earlier:"
                      f" {a.median('delivered'):.0f}/s)")
        if "mta_queue_list" in self.extra:
            line = (f"  listing the {d.backlog:,}-message queue: `mta queue list`"
                    f" {self.extra['mta_queue_list']:.2f}s")
            if "pf_mailq" in self.extra:
                line += f", Postfix `postqueue -p` {self.extra['pf_mailq']:.2f}s"
            print(line)
        if "pf_backlog_fill" in self.extra:
            print(f"  (Postfix's backlog was filled over SMTP and deferred by defer_transports in "
                  f"{self.extra['pf_backlog_fill']:.0f}s; mta's was written into queue.db directly)")


def profile_summary(files: list[Path], top: int = 15) -> str:
    """Top functions by own time (leaf frame) and the big subtrees, from py-spy raw stacks."""
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            stack, _, count = line.rpartition(" ")
            n = int(count)
            thread, *frames = stack.split(";")
            frames = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") and ":" in f else f for f in frames]
            if "MainThread" not in thread:
                frames = ["[sqlite thread] " + f for f in frames]
            total += n
            if frames:
                leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
            for f in set(frames):
                inclusive[f] = inclusive.get(f, 0) + n
    if not total:
        return "  (no samples)"
    out = ["  own time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in sorted(leaf.items(), key=lambda x: -x[1])[:top]]
    picks = [f for f in inclusive if any(k in f for k in (
        "InboundSMTP._handle_client", "Listener._protocol", "QueueManager._worker", "Engine._write_pending",
        "Router.deliver", "_connection_worker_thread", "EpollSelector.select", "StreamHandler.emit",
        "SMTP._getaddr", "handle_DATA", "Connection._execute"))]
    out.append("  including callees:")
    out += [f"  {100 * inclusive[f] / total:5.1f}%  {f}" for f in sorted(picks, key=lambda f: -inclusive[f])]
    return "\n".join(out)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def git_describe() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return out or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def postfix_version() -> str:
    try:
        out = subprocess.run(["/usr/sbin/postconf", "-d", "-h", "mail_version"], capture_output=True,
                             text=True, timeout=10,
                             env={**os.environ, "MAIL_CONFIG": "/etc/postfix"}).stdout.strip()
        return out or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=None,
                   help="runs per scenario and MTA (default 3; 1 with --quick)")
    p.add_argument("--scenarios", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    p.add_argument("--quick", action="store_true", help="scaled-down counts for a smoke check (< 2 minutes)")
    p.add_argument("--no-postfix-backlog", action="store_true",
                   help="(d): measure mta only (skips filling Postfix's deferred queue over SMTP)")
    p.add_argument("--tmpdir", default=None, help="where the queues live (default: $TMPDIR or /tmp)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="sample every mta run with py-spy (pip install py-spy) into DIR and print its"
                        " hotspots; the sampling costs the daemon some speed")
    p.add_argument("--http-poll", action="store_true",
                   help="also run mta with its HTTP listener on and a client reading the message list every"
                        " 100 ms (issue 15), paired with the plain runs")
    p.add_argument("--no-postgresql", dest="postgresql", action="store_false",
                   help="skip the 'mta pg' variants (mta with its queue on PostgreSQL, issue 16); they run"
                        " by default when PostgreSQL and asyncpg are installed")
    p.add_argument("--pg-nodes", default="1,2", help="the 'mta pg' variants: 1 and/or 2 nodes (default 1,2)")
    p.add_argument("--dsn", default=None, help="a PostgreSQL server of yours for the 'mta pg' variants (a"
                   " database is created and dropped per run; the role needs CREATEDB) instead of a private"
                   " cluster started as the tests do; its CPU is then not measured")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) for inspection")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    bad = [k for k in keys if k not in "abcde"]
    if bad:
        p.error(f"unknown scenario(s): {', '.join(bad)}")
    args.scenarios = sorted(set(keys), key="abcde".index)
    try:
        args.pg_nodes = sorted({int(n) for n in args.pg_nodes.split(",") if n.strip()})
    except ValueError:
        p.error("--pg-nodes: 1, 2 or 1,2")
    if not set(args.pg_nodes) <= set(PG_NODES) or not args.pg_nodes:
        p.error("--pg-nodes: 1, 2 or 1,2")
    if args.postgresql and args.dsn is None and (reason := pg_unavailable()):
        print(f"relay_bench: no 'mta pg' variants: {reason}", file=sys.stderr)
        args.postgresql = False
    if args.profile and not shutil.which("py-spy"):
        p.error("--profile needs py-spy (pip install py-spy)")
    return args


def preflight() -> None:
    if os.geteuid() != 0:
        sys.exit("relay_bench: needs root (smtp-sink -u, a private Postfix instance, /proc/PID/clear_refs)")
    for tool in (SMTP_SOURCE, "/usr/sbin/smtp-sink", "/usr/sbin/postfix"):
        if not os.access(tool, os.X_OK):
            sys.exit(f"relay_bench: {tool} is missing (apt-get install postfix)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preflight()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    t0 = time.monotonic()
    try:
        bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        bench.cleanup.run(keep_dirs=args.keep)
        if args.keep:
            print(f"work directory kept: {bench.work}", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    print(f"\n(total bench time {time.monotonic() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
