"""Composition root: config → store → listeners (→ delivery) on one event loop.

Nothing imports this module except the CLI. Every long-lived object is built
here and handed to the parts that need it (no module-level singletons).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import warnings
from typing import Any

from mta import preflight
from mta.config import Config, load_config, reloaded
from mta.daemon.delivery_process import DeliveryProcess
from mta.daemon.delivery_side import DeliverySide
from mta.daemon.runtime import SHUTDOWN_GRACE, event_loop_factory
from mta.daemon.sd_notify import Notifier
from mta.delivery.pool import ConnectionPool
from mta.delivery.router import Router
from mta.errors import ConfigError, StoreError
from mta.health import Health
from mta.inbound.chaos import Chaos
from mta.inbound.handler import InboundHandler
from mta.inbound.peername import PeerNames
from mta.inbound.server import Listener
from mta.mailbox.users import MailboxUsers
from mta.metrics import Metrics
from mta.passwords import AuthThrottle, UsersFile
from mta.queue.manager import QueueManager
from mta.store.api import Store
from mta.store.factory import make_store
from mta.store.sqlite.lock import QueueLock
from mta.store.sqlite.lock import acquire as acquire_queue_lock
from mta.web.app import WebContext, WebListener
from mta.web.chaos_api import CONTEXT_KEY as CHAOS_KEY
from mta.web.server import HttpServer

log = logging.getLogger("mta.master")

PRUNE_INTERVAL = 60.0  # how often mail older than mailboxes.max_age is removed
TABLE_CHECK_INTERVAL = 2.0  # how often the users files are looked at (one stat() each)


class App:
    def __init__(self, config: Config, config_path: str | None = None, *, deliver: bool = True,
                 delivery_process: bool = False, log_level: str = "INFO",
                 queue_lock: QueueLock | None = None):
        self.config = config
        # One daemon per queue (mta/store/sqlite/lock.py): serve() takes it in its preflight, else start().
        self.queue_lock = queue_lock
        self.deliver = deliver  # False: accept and queue only (inbound tests)
        # True: the queue manager runs in a child process (mta/daemon/delivery_process.py), on the second core.
        self.delivery_process = delivery_process
        self.log_level = log_level
        self.delivery: DeliverySide | DeliveryProcess | None = None
        self.config_path = config_path
        # Like Postfix, keep 1.5 x message_size_limit free for the queue manager's own
        # writes: new mail is refused with 452 4.3.1 before the disk is really full.
        # Every fault either heals by itself or shows here: /healthz, mta_health_status, the log.
        self.health = Health()
        self.store: Store = make_store(config, role="inbound", health=self.health,
                                       delivers=deliver and not delivery_process)
        self.listeners: list[Any] = []   # SMTP Listener and POP3Listener: start/sockets/stop_accepting/drain
        self.mailboxes = self.store.mailboxes
        self.mailbox_users = MailboxUsers(config, health=self.health)
        self.auth_users: UsersFile | None = None
        self._tables_task: asyncio.Task[None] | None = None
        # Fault-injection triggers (chaos: true), shared by the SMTP listeners and the HTTP API;
        # kept in memory only, as Mailpit keeps them.
        self.chaos = Chaos(enabled=config.chaos)
        self.mailbox_locks: set[str] = set()   # mailboxes held by a POP3 session, across listeners
        self._prune_task: asyncio.Task[None] | None = None
        self.metrics = Metrics([lc.name for lc in config.listeners if lc.mode not in ("pop3", "http")],
                               pop3_listeners=[lc.name for lc in config.listeners if lc.mode == "pop3"],
                               refresh=self._refresh_queue_metrics, health=self.health)
        self.http = HttpServer(self.metrics)   # metrics.address: /metrics, /healthz, /livez, /readyz
        self.web_listeners: list[WebListener] = []   # mode: http (the lab inbox's API and UI)
        # The in-process delivery side's parts, for tests that look inside (None with a child process).
        self.pool: ConnectionPool | None = None
        self.router: Router | None = None
        self.scheduler: QueueManager | None = None
        self._stop = asyncio.Event()
        self.notifier = Notifier.from_env()  # systemd Type=notify; a no-op elsewhere

    def _build_listeners(self) -> None:
        users = UsersFile(self.config.auth.users_file, health=self.health) if self.config.auth.users_file else None
        peer_names = PeerNames()   # one cache of client names for every listener
        self.auth_users = users
        throttle = AuthThrottle()
        for lc in self.config.listeners:
            if lc.mode == "http":
                continue   # started by _start_web, once the SMTP and POP3 listeners are up
            if lc.mode == "pop3":
                from mta.pop3.server import POP3Listener
                self.listeners.append(POP3Listener(self.config, lc, self.mailboxes, self.mailbox_users,
                                                   locks=self.mailbox_locks, throttle=throttle,
                                                   metrics=self.metrics))
                continue
            handler = InboundHandler(self.config, lc, self.store.queue, users=users, throttle=throttle,
                                     on_received=self.metrics.message_received,
                                     on_rejected=self.metrics.rejected, mailbox_users=self.mailbox_users,
                                     peer_names=peer_names, chaos=self.chaos,
                                     on_chaos=self.metrics.chaos_triggered)
            self.listeners.append(Listener(self.config, lc, handler, on_connection=self.metrics.smtp_connection))

    async def start(self) -> None:
        if self.queue_lock is None:   # before anything touches the queue
            preflight.queue_directory(self.config.queue.path, create=True)
            self.queue_lock = acquire_queue_lock(self.config.queue.path)
        try:
            await self.store.open()   # a file that cannot be opened at all: QueueDamagedError, exit 2
            # Damage inside a file that opens: start anyway, refuse new mail with 451 and say so
            # (mta/store/sqlite/damage.py); what is queued stays where `mta queue check` and a repair can reach it.
            await self.store.check_at_start()
            self._build_listeners()
            for listener in self.listeners:
                try:
                    await listener.start()
                except OSError as exc:
                    raise preflight.cannot_listen(listener.listener, exc) from None
            await self._start_web()
        except BaseException:
            for listener in self.listeners:
                listener.stop_accepting()
            for web_listener in self.web_listeners:
                await web_listener.stop()
            await self.store.close()
            self.queue_lock.release()
            raise
        if self.deliver:
            await self._start_delivery()
        # Always: the postmaster's mailbox may take mail on any relay (mailboxes.max_age applies).
        self._prune_task = asyncio.create_task(self._prune_mailboxes(), name="mailbox-prune")
        if self.auth_users is not None or self.mailbox_users.users is not None:
            self._tables_task = asyncio.create_task(self._watch_tables(), name="users-files")
        if self.config.metrics.host is not None:
            try:
                await self.http.start(self.config.metrics.host, self.config.metrics.port)
            except OSError as exc:
                await self.shutdown()
                raise preflight.metrics_cannot_listen(self.config, exc) from None
        log.info("mta ready: hostname=%s, queue=%s, %d listener(s)", self.config.hostname,
                 self.config.queue.location, len(self.listeners))

    async def _start_web(self) -> None:
        """The http listeners: the lab inbox over Mailpit's API (mta/web/app.py)."""
        for lc in self.config.listeners:
            if lc.mode != "http":
                continue
            context = WebContext(config=self.config, listener=lc, store=self.store, health=self.health,
                                 metrics=self.metrics, extras={CHAOS_KEY: self.chaos})
            web_listener = WebListener(context, health=self.health)
            try:
                await web_listener.start()
            except OSError as exc:
                raise preflight.cannot_listen(lc, exc) from None
            self.web_listeners.append(web_listener)

    async def _start_delivery(self) -> None:
        own = self.own_sockets()
        if self.delivery_process:
            # The child inherits the queue lock: the queue stays locked until it has gone too.
            lock_fd = self.queue_lock.fd if self.queue_lock is not None else None
            self.delivery = DeliveryProcess(self.config_path, self.metrics, own, log_level=self.log_level,
                                            config=self.config,
                                            inherit_fds=() if lock_fd is None else (lock_fd,))
            await self.delivery.start()
            self.store.queue.add_listener(self.delivery.wake)   # new mail: wake the child at once
        else:
            service = DeliverySide(self.config, self.store.queue, self.metrics, own)
            self.pool, self.router, self.scheduler = service.pool, service.router, service.scheduler
            self.delivery = service
            service.start().add_done_callback(self._scheduler_ended)
            self.metrics.delivery_process_running(True)   # the queue manager runs in this process

    async def _prune_mailboxes(self) -> None:
        """mailboxes.max_age: old mail goes (max_messages is kept at each delivery)."""
        while True:
            max_age = self.config.mailboxes.max_age
            try:
                pruned = await self.mailboxes.prune_older_than(time.time() - max_age, skip=self.mailbox_locks)
            except StoreError as exc:
                log.warning("mailbox: pruning old mail failed, trying again later: %s", exc)
            else:
                if pruned:
                    log.info("mailbox: removed %d message(s) older than %gs (mailboxes.max_age)", pruned, max_age)
            await asyncio.sleep(PRUNE_INTERVAL)

    async def _watch_tables(self) -> None:
        """Look at the users files every few seconds, so that a broken one shows in the
        log and /healthz at once, not only at the next RCPT or login (issue 12)."""
        while True:
            await asyncio.sleep(TABLE_CHECK_INTERVAL)
            self.mailbox_users.refresh()
            if self.auth_users is not None:
                self.auth_users.refresh()

    def _scheduler_ended(self, task: asyncio.Task[None]) -> None:
        self.metrics.delivery_process_running(False)
        if not task.cancelled() and task.exception() is not None:
            # Without the queue manager nothing is delivered: stop loudly, the
            # service manager restarts us and the queue is intact.
            log.critical("queue manager failed: %r", task.exception())
            self._stop.set()

    async def _refresh_queue_metrics(self) -> None:
        now = time.time()
        self.metrics.update_queue(await self.store.admin.queue_summary(now), now)

    def own_sockets(self) -> frozenset[tuple[str, int]]:
        return frozenset(sock for listener in self.listeners for sock in listener.sockets())

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config."""
        loop = asyncio.get_running_loop()
        # The listeners accept before start() returns: a signal then killed the daemon by
        # its default action (a reload right after a start; a stop of a daemon still
        # starting, which must end as cleanly as any other). A SIGHUP is kept for
        # afterwards; a SIGTERM makes the daemon stop as soon as it has started.
        early_hup: list[int] = []
        loop.add_signal_handler(signal.SIGHUP, early_hup.append, 1)
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        try:
            await self.start()
        except BaseException:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            raise
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        # Listeners bound and the queue open: now systemd may call us started.
        self.notifier.ready(f"accepting mail on {', '.join(lc.address for lc in self.config.listeners)}")
        if early_hup:
            self.reload()
        watchdog = asyncio.create_task(self.notifier.run_watchdog(self._healthy), name="watchdog")
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.notifier.stopping()
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            await self.shutdown()

    def _healthy(self) -> bool:
        """The watchdog is fed only while the queue manager is alive."""
        return self.delivery is None or self.delivery.healthy

    def request_stop(self, why: str = "request") -> None:
        log.info("stopping (%s)", why)
        self._stop.set()

    async def shutdown(self) -> None:
        """Stop accepting; let inbound transactions and running deliveries finish
        (at the same time, each within SHUTDOWN_GRACE); QUIT cached sessions; close
        the queue. Each step runs even if an earlier one failed."""
        try:
            await self.http.stop()
            for web_listener in self.web_listeners:
                await web_listener.stop()
            for task in (self._prune_task, self._tables_task):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            for listener in self.listeners:
                listener.stop_accepting()
            steps = [listener.drain(SHUTDOWN_GRACE) for listener in self.listeners]
            if self.delivery is not None:
                # Running deliveries finish, then QUIT to every cached session (RFC 5321 §4.1.1.10).
                steps.append(self.delivery.stop(SHUTDOWN_GRACE))
            for result in await asyncio.gather(*steps, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("shutdown: %r", result)
        finally:
            await self.store.close()
            if self.queue_lock is not None:
                self.queue_lock.release()
            log.info("stopped")

    def reload(self) -> None:
        """SIGHUP: apply what can change at run time; name what needs a restart."""
        self.notifier.reloading()
        try:
            self._reload()
        finally:
            self.notifier.ready()

    def _reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload failed, keeping the old configuration: config: %s", exc)
            return
        new, needs_restart = reloaded(self.config, new)
        if needs_restart:
            log.warning("reload: changes to %s take effect after a restart", ", ".join(needs_restart))
        self.config = new
        if self.chaos.enabled != new.chaos:
            self.chaos.enabled = new.chaos
            log.info("reload: chaos %s", "enabled" if new.chaos else "disabled, triggers cleared")
        self.mailbox_users = MailboxUsers(new, health=self.health, previous=self.mailbox_users)
        for listener in self.listeners:
            listener.config = new
            if isinstance(listener, Listener):
                listener.handler.config = new
                listener.handler.mailbox_users = self.mailbox_users
            else:
                listener.users = self.mailbox_users
        if self.delivery is not None:
            self.delivery.reconfigure(new, self.mailbox_users)
        for web_listener in self.web_listeners:
            web_listener.context.config = new
            web_listener.reload_users()
        log.info("reload: configuration re-read from %s", self.config_path or "built-in defaults")


def serve(config: Config, config_path: str | None, log_level: str = "INFO") -> int:
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
    # Before the first log line: a daemon that cannot start says why in one line.
    lock = preflight.startup(config)

    async def main() -> None:
        await App(config, config_path, delivery_process=use_delivery_process(),
                  log_level=log_level, queue_lock=lock).run()

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main())
    return 0


def use_delivery_process() -> bool:
    """A second process for delivery when there is a second core to run it
    (benchmarks/README.md has the figures); MTA_DELIVERY_PROCESS=no keeps one process."""
    setting = os.environ.get("MTA_DELIVERY_PROCESS", "auto").lower()
    if setting in ("no", "0", "false", "off"):
        return False
    if setting in ("yes", "1", "true", "on"):
        return True
    return len(os.sched_getaffinity(0)) > 1 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) > 1
