"""One SQLite queue file as a whole store: the engine and the four parts on it.

The parts share the engine (one connection, one group commit), so the
daemon's inbound writes, the mailboxes' deletions and the admin commands'
changes are committed together when they arrive together.
"""

from __future__ import annotations

import os
from pathlib import Path

from mta.health import Health
from mta.store.sqlite.admin import SQLiteQueueAdmin
from mta.store.sqlite.engine import Engine
from mta.store.sqlite.inbox import SQLiteInbox
from mta.store.sqlite.mailboxes import SQLiteMailboxes
from mta.store.sqlite.queue import SQLiteQueue


class SQLiteStore:
    """mta.store.api.Store on one SQLite file. ``commit_delay`` and ``inline_writes``
    are for the delivery process (see Engine); ``reserve`` is the disk space kept
    free for the queue manager's own writes."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0, reserve: int = 0,
                 health: Health | None = None, commit_delay: float = 0.0, inline_writes: bool = False):
        self.engine = Engine(path, busy_timeout=busy_timeout, reserve=reserve, health=health,
                             commit_delay=commit_delay, inline_writes=inline_writes)
        self.queue = SQLiteQueue(self.engine)
        self.admin = SQLiteQueueAdmin(self.engine)
        self.mailboxes = SQLiteMailboxes(self.engine)
        self.inbox = SQLiteInbox(self.engine)

    @property
    def path(self) -> Path:
        return self.engine.path

    @property
    def health(self) -> Health:
        return self.engine.health

    async def open(self) -> None:
        await self.engine.open()

    async def check_at_start(self) -> None:
        await self.engine.check_at_start()

    async def close(self) -> None:
        await self.engine.close()
