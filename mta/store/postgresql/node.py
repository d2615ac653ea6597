"""One daemon per node name on a shared database: an advisory lock on the name.

Every node is known in leases by its name (the config's ``hostname``). Two
daemons using one name on one database would each take the other's in-flight
recipients for their own, left over from a restart (``recover_in_flight``), and
deliver them twice. The SQLite backend's lock file (mta/store/sqlite/lock.py)
only sees daemons on the same machine; this lock sees every node: the main
process holds ``pg_advisory_lock`` on the name's key on a connection of its own
for its whole life. PostgreSQL drops a session's advisory locks when its
connection ends, so a node that dies (even by SIGKILL) frees its name at once.

If that connection breaks (the database restarted), the lock is taken again on a
new one; while another daemon holds the name meanwhile, health says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from typing import Any

import asyncpg

from mta.errors import StartupError, StoreError
from mta.health import Health
from mta.store.postgresql.engine import CONNECTION_ERRORS, one_line

log = logging.getLogger("mta.queue")

HEALTH_COMPONENT = "node_name"
# Advisory lock keys are one 64-bit space per database: node names take keys
# "mta\0node" XOR a hash, away from schema.py's MIGRATION_LOCK and the mailbox locks.
_KEY_SPACE = b"node"


def node_key(name: str) -> int:
    digest = hashlib.blake2b(_KEY_SPACE + name.lower().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class NodeLock:
    """Held from acquire() to release() (or the process's end)."""

    def __init__(self, dsn: str, name: str, *, health: Health | None = None,
                 connect_timeout: float = 5.0, retry: float = 1.0):
        self.dsn = dsn
        self.name = name
        self.health = health or Health()
        self.connect_timeout = connect_timeout
        self.retry = retry
        self._conn: Any = None
        self._watch: asyncio.Task[None] | None = None

    async def acquire(self) -> None:
        """Take the name or raise StartupError (another node has it) / StoreError (no database)."""
        try:
            taken = await self._take()
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            raise StoreError(one_line(exc)) from exc
        if not taken:
            raise StartupError(f"queue: node name {self.name} is in use by another mta on this database "
                               "(give each node its own hostname)")
        self._watch = asyncio.create_task(self._keep(), name="node-lock")

    async def _take(self) -> bool:
        conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout,
                                     server_settings={"application_name": f"mta node {self.name}"[:63]})
        try:
            taken = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", node_key(self.name)))
        except BaseException:
            conn.terminate()
            raise
        if not taken:
            await conn.close()
            return False
        self._conn = conn
        return True

    async def _keep(self) -> None:
        """Take the name again whenever its connection has ended."""
        while True:
            ended = asyncio.Event()
            self._conn.add_termination_listener(lambda _conn, ended=ended: ended.set())
            await ended.wait()
            self._conn = None
            while self._conn is None:
                await asyncio.sleep(self.retry)
                try:
                    if await self._take():
                        self.health.clear(HEALTH_COMPONENT)
                        log.info("queue: node name %s held again", self.name)
                    else:
                        self.health.fail(HEALTH_COMPONENT, f"node name {self.name} is in use by another mta "
                                                            "on this database")
                except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
                    log.debug("node name lock: %s", one_line(exc))

    async def release(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), self.connect_timeout)
            except (TimeoutError, asyncpg.PostgresError, *CONNECTION_ERRORS):
                conn.terminate()
