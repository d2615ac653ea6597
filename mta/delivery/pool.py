"""Connection cache for outbound SMTP sessions (Postfix's smtp_connection_cache).

After a transaction the session is parked here, keyed by next hop
("address:port"), so the next message to the same host skips TCP, greeting,
EHLO and STARTTLS. A parked session is QUIT after ``idle_timeout`` without work
or after ``max_messages`` transactions, and is reset with RSET (RFC 5321 4.1.1.5)
before reuse (pipelined with the next transaction). A peer that speaks while we are idle -- usually "421 timeout"
before it hangs up (RFC 5321 3.8) -- makes the session unusable: the idle
watcher notices at once and ``Session.reuse`` checks again at acquire time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from mta.delivery.client import Session

log = logging.getLogger("mta.delivery")


@dataclass(slots=True)
class _Idle:
    session: Session
    watcher: asyncio.Task[None]


class ConnectionPool:
    def __init__(self, *, max_messages: int, idle_timeout: float, per_destination: int,
                 max_idle_total: int):
        self.max_messages = max_messages
        self.idle_timeout = idle_timeout
        self.per_destination = per_destination
        self.max_idle_total = max_idle_total
        self.opened = 0     # sessions opened by the router (note_opened)
        self.reused = 0     # sessions handed out again by acquire
        self._idle: dict[str, list[_Idle]] = {}
        self._tasks: set[asyncio.Task[None]] = set()   # watchers and their QUITs
        self._closed = False

    def note_opened(self) -> None:
        self.opened += 1

    @property
    def idle_count(self) -> int:
        return sum(len(entries) for entries in self._idle.values())

    async def acquire(self, key: str) -> Session | None:
        """An idle session for ``key``, or None. Its RSET goes out with the next
        transaction (Session.reuse); if that RSET fails the router retries on a
        fresh connection."""
        while entries := self._idle.get(key):
            entry = entries.pop()            # the most recently used: older ones may time out
            if not entries:
                del self._idle[key]
            entry.watcher.cancel()
            await asyncio.gather(entry.watcher, return_exceptions=True)
            if entry.session.reuse():
                self.reused += 1
                log.debug("reusing cached connection to %s (%d transactions so far)",
                          entry.session.peer, entry.session.transactions)
                return entry.session
            log.debug("cached connection to %s is no longer usable; dropped", entry.session.peer)
            await entry.session.quit()
        return None

    async def release(self, key: str, session: Session, *, reusable: bool = True) -> None:
        """Park ``session`` for reuse, or QUIT it when it cannot or should not be kept."""
        why = None
        if self._closed:
            why = "the cache is closed"
        elif not reusable or not session.is_alive:
            why = "not reusable"
        elif session.transactions >= self.max_messages:
            why = f"reached {self.max_messages} transactions"
        elif len(self._idle.get(key, ())) >= self.per_destination:
            why = "cache full for this destination"
        elif self.idle_count >= self.max_idle_total:
            why = "cache full"
        if why is not None:
            log.debug("closing connection to %s: %s", session.peer, why)
            await session.quit()
            return
        entry = _Idle(session, asyncio.create_task(self._watch(key, session), name=f"idle {key}"))
        self._tasks.add(entry.watcher)
        entry.watcher.add_done_callback(self._tasks.discard)
        self._idle.setdefault(key, []).append(entry)

    async def _watch(self, key: str, session: Session) -> None:
        """QUIT ``session`` after idle_timeout, or drop it as soon as the peer speaks."""
        try:
            async with asyncio.timeout(self.idle_timeout):
                await session.wait_unsolicited()
            log.debug("%s spoke or hung up while idle; dropping the cached connection", session.peer)
        except TimeoutError:
            log.debug("cached connection to %s idle for %.1fs; closing", session.peer, self.idle_timeout)
        except Exception:   # noqa: BLE001 -- a reset while idle is just a dead session
            pass
        # Leave the cache before the first await below, so acquire never gets a
        # session that is being QUIT. (Cancellation only reaches us before this.)
        entries = self._idle.get(key, [])
        for i, entry in enumerate(entries):
            if entry.session is session:
                del entries[i]
                break
        if not entries:
            self._idle.pop(key, None)
        await session.quit()

    async def close(self) -> None:
        """QUIT every cached session and wait for the watchers (daemon shutdown)."""
        self._closed = True
        entries = [entry for group in self._idle.values() for entry in group]
        self._idle.clear()
        for entry in entries:
            entry.watcher.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(entry.session.quit() for entry in entries))
