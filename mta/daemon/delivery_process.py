"""The delivery side in a process of its own (``mta deliver``, started by ``mta serve``).

One event loop runs on one core. Postfix spreads its work over processes
(smtpd, cleanup, qmgr, smtp), so on a 2-core relay it uses both; so do we:
the main process keeps the listeners, the metrics endpoint and the POP3
server, and a child process runs the queue manager with its SMTP clients
(mta/daemon/delivery_side.py). Both open the same SQLite queue in WAL mode, which allows one
writer at a time and readers beside it, so nothing else is shared.

A socket pair joins the two:
- main → child: one byte per commit of new mail ("w"), so fresh mail is
  picked up at once (the queue manager also polls every second, so a lost
  wake-up only delays, never loses). End of file means the main process is
  gone: the child stops.
- child → main: one line per event the metrics count ("r <state> <delay> <relay>",
  "b", "p <opened> <reused>") and per fault found or cleared ("h <component>
  [<reason>]"); the main process serves them on /metrics and /healthz. And
  "ready" once, when the queue is open and the queue manager started.

The child dies with the main process even on SIGKILL (PR_SET_PDEATHSIG), so a
crashed daemon never leaves a queue manager behind to race the next one. A
child that exits on its own is started again after a pause, as Postfix's
master restarts qmgr: 1 s, doubling to 60 s while it keeps dying, back to 1 s
once a child has run for a minute. While no child is up, /healthz answers 503
(component delivery_process) with the last exit, mta_delivery_process_up is 0
and mta_delivery_process_restarts_total counts the restarts. "Up" means the
child has opened the queue, started its queue manager and said so ("ready")
on the channel, and is still running a second later.

The child runs the very package the main process runs, never one found in the
working directory (see _child_command).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mta.config import Config, load_config, reloaded
from mta.errors import ConfigError
from mta.health import Health
from mta.mailbox.users import MailboxUsers
from mta.model import LOCAL_RELAY, RcptState
from mta.store.factory import make_store

if TYPE_CHECKING:
    from mta.metrics import Metrics, RecipientResultLike

log = logging.getLogger("mta.master")

RESTART_DELAY = 1.0    # seconds before a delivery process that exited is started again ...
MAX_RESTART_DELAY = 60.0   # ... doubling while it keeps dying, up to this
STABLE_AFTER = 60.0    # a child up this long was not crash-looping: the next delay is 1 s again
UP_AFTER = 1.0         # seconds a child must run after saying "ready" before it counts as up
READY_TIMEOUT = 30.0   # a child not ready by then is a fault too (a hang, not an exit)
STOP_MARGIN = 5.0      # beyond the grace period, before a child that will not stop is killed
_WAKE = b"w"
# Read the configuration again. Sent over the channel rather than as SIGHUP: a
# signal that came before the child installed its handler would kill it, while
# a byte waits in the socket until the child reads it.
_RELOAD = b"h"


@dataclass
class _PoolCounts:
    """The child's connection-cache counters, as the metrics' pool collector reads them."""

    opened: int = 0
    reused: int = 0


@dataclass(frozen=True, slots=True)
class _Result:
    state: RcptState
    delay: float
    relay: str   # only "local" or not matters to the metrics (the transport label)


class DeliveryProcess:
    """The main process's handle on the delivery child: start, wake, reload, stop."""

    def __init__(self, config_path: str | None, metrics: Metrics, own_sockets: frozenset[tuple[str, int]],
                 log_level: str = "INFO", *, config: Config | None = None, inherit_fds: tuple[int, ...] = ()):
        self.config_path = config_path
        # Descriptors the child keeps open for its whole life: the queue lock (mta/store/sqlite/lock.py).
        self.inherit_fds = inherit_fds
        # The main process's configuration as started: a child started later (after a
        # crash) keeps its restart-only keys too, whatever the file says by then.
        self.config = config
        self.metrics = metrics
        self.own_sockets = own_sockets
        self.log_level = log_level
        self.proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._wake_due = False
        self._delay = RESTART_DELAY
        self.restarts = 0
        self._ready_at: float | None = None
        self._timers: list[asyncio.TimerHandle] = []

    async def start(self) -> None:
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="delivery-process")

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        # systemd's notify socket belongs to the main process (NotifyAccess=main).
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        args = [*_child_command(), "deliver", "--channel-fd", str(theirs.fileno()),
                "--parent-pid", str(os.getpid()),
                "--own-sockets", json.dumps(sorted(self.own_sockets)), "--log-level", self.log_level]
        if self.config_path:
            args += ["--config", self.config_path]
        if self.config is not None:
            args += ["--hostname", self.config.hostname, "--queue-path", self.config.queue.path]
        try:
            self.proc = await asyncio.create_subprocess_exec(*args, pass_fds=[theirs.fileno(), *self.inherit_fds],
                                                             env=env,
                                                             stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._ready_at = None
        proc = self.proc
        self._timers.append(asyncio.get_running_loop().call_later(READY_TIMEOUT, self._not_ready, proc))
        reader, self._writer = await asyncio.open_connection(sock=ours)
        pool = _PoolCounts()
        self.metrics.attach_pool(pool)
        self._events = asyncio.create_task(self._read_events(reader, pool), name="delivery-events")
        log.info("delivery process started (pid %d)", self.proc.pid)

    async def _read_events(self, reader: asyncio.StreamReader, pool: _PoolCounts) -> None:
        metrics = self.metrics
        while line := await reader.readline():
            kind, _, rest = line.decode("ascii", "replace").strip().partition(" ")
            try:
                if kind == "r":
                    state, delay, relay = rest.split()
                    metrics.recipient_result(_Result(RcptState(state), float(delay), relay))
                elif kind == "b":
                    metrics.bounce_generated()
                elif kind == "p":
                    opened, reused = rest.split()
                    pool.opened, pool.reused = int(opened), int(reused)
                elif kind == "ready":   # queue open, queue manager running
                    self._child_ready()
                elif kind == "h":   # a fault the child found, or cleared (mta/health.py)
                    component, _, reason = rest.partition(" ")
                    if reason:   # the child logged it already: one line per fault in the journal
                        self.metrics.health.fail(component, reason, logged=True)
                    else:
                        self.metrics.health.clear(component, logged=True)
            except ValueError:
                log.warning("delivery process sent a line not understood: %r", line[:100])

    def _child_ready(self) -> None:
        self._ready_at = time.monotonic()
        self._cancel_timers()
        self._timers.append(asyncio.get_running_loop().call_later(UP_AFTER, self._up, self.proc))

    def _up(self, proc: asyncio.subprocess.Process | None) -> None:
        if proc is not None and proc is self.proc and proc.returncode is None:
            self.metrics.delivery_process_running(True)
            self.metrics.health.clear("delivery_process")

    def _not_ready(self, proc: asyncio.subprocess.Process) -> None:
        if proc is self.proc and proc.returncode is None:
            self.metrics.health.fail("delivery_process", f"delivery process (pid {proc.pid}) started "
                                     f"{READY_TIMEOUT:.0f}s ago and has not opened the queue yet")

    def _cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    async def _supervise(self) -> None:
        health = self.metrics.health
        while True:
            assert self.proc is not None
            proc = self.proc
            status = await proc.wait()
            await asyncio.gather(self._events, return_exceptions=True)
            if self._writer is not None:
                self._writer.close()
            self._cancel_timers()
            self.metrics.delivery_process_running(False)
            if self._stopping:
                return
            if self._ready_at is not None and time.monotonic() - self._ready_at >= STABLE_AFTER:
                self._delay = RESTART_DELAY
            why = f"delivery process (pid {proc.pid}) {_exit_status(status)}"
            while True:
                delay, self._delay = self._delay, min(2 * self._delay, MAX_RESTART_DELAY)
                self.restarts += 1
                # The one line per exit (Health logs it); the child's stderr said why it died.
                health.fail("delivery_process", f"{why}; starting it again in {delay:.0f}s "
                            f"({self.restarts} restart{'s' if self.restarts != 1 else ''})")
                try:
                    await asyncio.wait_for(self._stopped.wait(), delay)
                    return   # stop() during the pause
                except TimeoutError:
                    pass
                self.metrics.delivery_process_restarted()
                try:
                    await self._spawn()
                    break
                except OSError as exc:
                    why = f"cannot start the delivery process: {exc}"

    def wake(self, *_: object) -> None:
        # A group commit calls this once per message: one byte per loop turn will do.
        if not self._wake_due:
            self._wake_due = True
            asyncio.get_running_loop().call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_due = False
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(_WAKE)

    @property
    def healthy(self) -> bool:
        """For the systemd watchdog: a child is running, or one will be started after
        the pause (a child that keeps dying shows on /healthz; restarting the whole
        daemon for it would stop mail acceptance too and cure nothing)."""
        if self.proc is None:
            return False
        return self.proc.returncode is None or (self._supervisor is not None and not self._supervisor.done())

    def reconfigure(self, config: Config, users: MailboxUsers) -> None:
        """SIGHUP: the child reads the configuration again itself."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(_RELOAD)

    async def stop(self, grace: float) -> None:
        """SIGTERM: the child lets deliveries finish within ``grace`` and QUITs its sessions."""
        self._stopping = True
        self._stopped.set()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace + STOP_MARGIN)
            except TimeoutError:
                log.error("delivery process (pid %d) did not stop; killing it", proc.pid)
                proc.kill()
                await proc.wait()
        if self._supervisor is not None:
            await asyncio.gather(self._supervisor, return_exceptions=True)


def _exit_status(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by signal {-status} ({signal.Signals(-status).name})"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


# Run by the child with -P: load the package at the path given (the main process's
# own, mta.__file__) as "mta", then run the CLI on the remaining arguments.
_BOOTSTRAP = ("import sys,importlib.util as u;s=u.spec_from_file_location('mta',sys.argv.pop(1));"
              "m=sys.modules['mta']=u.module_from_spec(s);s.loader.exec_module(m);"
              "from mta.cli import main;sys.exit(main())")


def _child_command() -> list[str]:
    """The interpreter and arguments that start the child, up to its subcommand.

    `python -m mta` put the working directory first on sys.path, so `mta serve` run
    where an `mta` package lies (another checkout, an old copy, the parent of a
    clone) started children that imported that package, died at once and were
    started again every second. -P (Python 3.11, "safe path") keeps the working
    directory and the script's directory off sys.path; PYTHONPATH and site-packages
    (editable installs' finders too) still count, for the dependencies. -P alone is
    not enough: a main process run as `python -m mta` from a checkout that is not
    installed imported the checkout, and its child would import another copy (or
    none). So the child loads the main process's own package from its path: both
    sides always run the same code and speak the same channel protocol.
    """
    import mta
    init = getattr(mta, "__file__", None)
    if init and os.path.basename(init) == "__init__.py" and os.path.isfile(init):
        return [sys.executable, "-P", "-c", _BOOTSTRAP, os.path.abspath(init)]
    return [sys.executable, "-P", "-m", "mta"]   # not from a plain directory (a zip, frozen)


# ----------------------------------------------------------------------------- the child

FORWARD_INTERVAL = 0.1   # seconds the child gathers metrics events before one write


class _Forwarder:
    """Stands in for mta.metrics.Metrics in the child: each event becomes a line,
    sent in one write per FORWARD_INTERVAL (a socket write per delivered message
    would cost both processes a system call and a wake-up)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.pool: object | None = None
        self._lines: list[str] = []
        self._flush_at: asyncio.TimerHandle | None = None

    def attach_pool(self, pool: object) -> None:
        self.pool = pool

    def recipient_result(self, result: RecipientResultLike) -> None:
        # Metrics.recipient_result clamps the delay; the relay only as the transport it names.
        relay = LOCAL_RELAY if result.relay == LOCAL_RELAY else "smtp"
        self._send(f"r {result.state} {result.delay:.6f} {relay}\n")

    def bounce_generated(self) -> None:
        self._send("b\n")

    def ready(self) -> None:
        """The queue is open and the queue manager started: the main process may call us up."""
        self._send("ready\n")
        self.flush()

    def health_changed(self, component: str, reason: str | None) -> None:
        """Health.on_change in the child: the main process's /healthz shows the child's faults."""
        self._send(f"h {component} {' '.join(reason.split())}\n" if reason else f"h {component}\n")
        self.flush()   # at once, not with the next batch of counters

    def _send(self, line: str) -> None:
        self._lines.append(line)
        if self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(FORWARD_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        pool = self.pool
        if pool is not None:   # the pool's counters as they are now (absolute values)
            self._lines.append(f"p {getattr(pool, 'opened', 0)} {getattr(pool, 'reused', 0)}\n")
        text, self._lines = "".join(self._lines), []
        if text and not self.writer.is_closing():
            self.writer.write(text.encode("ascii", "replace"))


def _die_with_parent(parent_pid: int) -> None:
    """PR_SET_PDEATHSIG: the kernel sends us SIGKILL when the main process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass   # not Linux: the end of the channel still stops us
    # Compared with the pid we were given, not with 1: in a container the main
    # process may itself be pid 1.
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)   # the main process died before the line above


async def run_child(config: Config, config_path: str | None, channel_fd: int,
                    own_sockets: frozenset[tuple[str, int]], grace: float, parent_pid: int = 0) -> int:
    from mta.daemon.delivery_side import DeliverySide  # the child's imports only

    _die_with_parent(parent_pid)
    health = Health()
    # The main process's reserve; claims and outcomes commit on this loop's thread (mta/store/factory.py).
    store = make_store(config, role="delivery", health=health)
    await store.open()
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=channel_fd))
    forwarder = _Forwarder(writer)
    health.on_change = forwarder.health_changed
    service = DeliverySide(config, store.queue, forwarder, own_sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def reload() -> None:
        try:
            new = load_config(config_path)
        except ConfigError as exc:
            log.error("delivery: reload failed, keeping the old configuration: config: %s", exc)
            return
        new, _ = reloaded(service.config, new)   # the main process logs what needs a restart
        service.reconfigure(new, MailboxUsers(new, health=health, previous=service.local.users))
        log.info("delivery: reload: configuration re-read from %s", config_path or "built-in defaults")

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)

    async def wakes() -> None:
        while data := await reader.read(4096):
            if _RELOAD in data:
                reload()
            service.wake()
        stop.set()   # the main process is gone

    task = service.start()
    task.add_done_callback(lambda _: stop.set())
    waker = asyncio.create_task(wakes(), name="wakes")
    forwarder.ready()
    status = 0
    try:
        await stop.wait()
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.critical("queue manager failed: %r", task.exception())
            status = 1
    finally:
        waker.cancel()
        await asyncio.gather(waker, return_exceptions=True)
        await service.stop(grace)
        forwarder.flush()
        writer.close()
        await store.close()
        log.info("delivery process stopped")
    return status


def child_main(config: Config, config_path: str | None, channel_fd: int, own_sockets_json: str,
               grace: float, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None,
               parent_pid: int = 0) -> int:
    own = frozenset((str(h), int(p)) for h, p in json.loads(own_sockets_json))
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(run_child(config, config_path, channel_fd, own, grace, parent_pid))
