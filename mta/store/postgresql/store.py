"""A shared PostgreSQL database as one node's whole store (issue 16).

Every node that names the same database is one relay: the same queue, the same
mailboxes and inbox, the same POP3 locks. What makes the store a node's:

* its name in leases (``node``: the config's ``hostname``), held for the main
  process's life by an advisory lock (mta/store/postgresql/node.py);
* in the delivery process, the store renews this node's leases every third of a
  lease and wakes the queue manager when another node commits new mail
  (LISTEN/NOTIFY), so nothing above the storage interface knows there are nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mta.errors import StoreError
from mta.health import Health
from mta.store.postgresql.admin import PostgreSQLQueueAdmin
from mta.store.postgresql.engine import PgEngine
from mta.store.postgresql.inbox import PostgreSQLInbox
from mta.store.postgresql.mailboxes import PostgreSQLMailboxes
from mta.store.postgresql.node import NodeLock
from mta.store.postgresql.queue import PostgreSQLQueue

log = logging.getLogger("mta.queue")


class PostgreSQLStore:
    """mta.store.api.Store on a shared database, for the node ``node``.

    ``hold_name``: take the node-name lock at open (the daemon's main process).
    ``keep_leases``: renew leases and listen to the other nodes (the delivery process)."""

    def __init__(self, dsn: str, *, node: str, lease: float, health: Health | None = None,
                 max_connections: int = 10, hold_name: bool = False, keep_leases: bool = False):
        self.engine = PgEngine(dsn, health=health, max_connections=max_connections)
        self.node = node
        self.queue = PostgreSQLQueue(self.engine, node=node, lease=lease)
        self.admin = PostgreSQLQueueAdmin(self.engine)
        self.mailboxes = PostgreSQLMailboxes(self.engine)
        self.inbox = PostgreSQLInbox(self.engine)
        self._name = NodeLock(dsn, node, health=self.engine.health) if hold_name else None
        self._keep_leases = keep_leases
        self._renewing: asyncio.Task[None] | None = None

    @property
    def health(self) -> Health:
        return self.engine.health

    async def open(self) -> None:
        await self.engine.open()
        try:
            if self._name is not None:
                await self._name.acquire()
        except BaseException:
            await self.engine.close()
            raise
        if self._keep_leases:
            self.queue.listen_to_other_nodes()
            self._renewing = asyncio.create_task(self._renew_leases(), name="lease-renewal")

    async def check_at_start(self) -> None:
        """Nothing to look at: the database server keeps its own files sound."""

    async def _renew_leases(self) -> None:
        # A third of a lease: one renewal may fail (the database restarting) and the
        # next still comes before the lease ends.
        interval = self.queue.lease / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.queue.renew_leases()
            except StoreError as exc:
                log.warning("queue: cannot renew this node's leases: %s", exc)

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
            self._renewing = None
        if self._name is not None:
            await self._name.release()
        await self.engine.close()
