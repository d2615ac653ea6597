"""systemd's sd_notify protocol, written out: a few datagrams on $NOTIFY_SOCKET.

The service manager (systemd with ``Type=notify``, or anything speaking the same
protocol) passes the path of an AF_UNIX datagram socket in $NOTIFY_SOCKET; the
daemon sends newline-separated ``KEY=VALUE`` assignments to it:

    READY=1            start-up finished: listeners bound, queue open
    RELOADING=1        a SIGHUP reload began (followed by READY=1 when done)
    STOPPING=1         shutdown began
    STATUS=...         one line shown by ``systemctl status``
    WATCHDOG=1         keep-alive, at least every $WATCHDOG_USEC microseconds

See sd_notify(3) and systemd.service(5) (WatchdogSec=, Type=notify-reload).
A path starting with "@" names a Linux abstract socket. Without $NOTIFY_SOCKET
every method is a no-op, so the daemon runs the same by hand, in a container
or in tests. Nothing here raises: a lost notification is logged at debug
level, because the service manager (not the daemon) acts on its absence.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("mta.notify")

SEND_TIMEOUT = 1.0  # seconds a send may block the loop if the manager's queue is full


class Notifier:
    """Sends sd_notify messages; built from the environment with from_env()."""

    def __init__(self, address: str | None = None, *, watchdog_usec: int | None = None):
        self.address = _socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """$NOTIFY_SOCKET, and $WATCHDOG_USEC when $WATCHDOG_PID is unset or is this process."""
        return cls(environ.get("NOTIFY_SOCKET") or None, watchdog_usec=_watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # ------------------------------------------------------------------ messages

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) pairs RELOADING=1 with the CLOCK_MONOTONIC
        # time; older managers and Type=notify ignore both harmlessly.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of KEY=VALUE lines; True if it was sent."""
        if self.address is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            # A socket per message, as sd_notify(3) does: nothing to keep open or close,
            # and a manager that was restarted (new socket inode) is reached next time.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(message, self.address)
            return True
        except (OSError, ValueError) as exc:  # ValueError: e.g. a path too long for sun_path
            log.debug("sd_notify %r to %r failed: %s", message, self.address, exc)
            return False

    # ------------------------------------------------------------------ watchdog

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of WatchdogSec=, as systemd advises; None = off."""
        if not self._watchdog_usec:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    async def run_watchdog(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping the watchdog until cancelled; returns at once when there is none.

        Pings come from the event loop, so a loop that stops turning (a blocking
        call, a deadlock) stops them and the service manager restarts the daemon.
        ``healthy``, if given, is asked before each ping; False skips that ping.
        """
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        while True:
            ok = True
            if healthy is not None:
                try:
                    ok = bool(healthy())
                except Exception as exc:  # a broken check counts as unhealthy, never kills the task
                    log.debug("watchdog health check failed: %r", exc)
                    ok = False
            if ok:
                self.watchdog()
            else:
                log.warning("watchdog: health check failed, not pinging")
            await asyncio.sleep(interval)


def _socket_address(value: str) -> bytes | None:
    """The sendto() address for $NOTIFY_SOCKET: a path, or "@name" for an abstract socket."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    log.debug("NOTIFY_SOCKET=%r is neither an absolute path nor @abstract; not notifying", value)
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # the watchdog is meant for another process (e.g. our parent)
        except ValueError:
            return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def _one_line(text: str) -> str:
    # A newline would start another assignment; STATUS= is one line.
    return " ".join(str(text).splitlines())
