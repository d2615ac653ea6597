"""Build the store from the configuration: the one place that names the backend.

The daemon (app.py), the delivery process (worker.py), the CLI and sendmail's
direct path call :func:`make_store` and see only mta.store.api's protocols.
Each role gets the store it needs:

* ``inbound`` (the daemon's main process, sendmail when the daemon is down):
  like Postfix, 1.5 x limits.message_size of disk stays free for the queue
  manager's own writes, and new mail is refused with 452 4.3.1 before the
  disk is really full;
* ``delivery`` (the queue manager's process): the same reserve (below it the
  queue manager keeps its own writes small); claims and outcomes commit on the
  event loop's own thread, and an outcome waits up to COMMIT_DELAY for the
  next claim to share its commit;
* ``admin`` (`mta queue …`, `mta mailbox …`): no reserve.
"""

from __future__ import annotations

from typing import Literal

from mta.config import Config
from mta.health import Health
from mta.store.api import Store
from mta.store.sqlite.store import SQLiteStore
from mta.store.transfer import TransferStore

Role = Literal["inbound", "delivery", "admin"]

# A delivery's outcome waits up to this long for the next claim to share its commit
# (Engine.commit_delay): the main process's commits are never delayed.
COMMIT_DELAY = 0.002


def make_store(config: Config, *, role: Role, health: Health | None = None) -> Store:
    """The store for ``role``, not yet opened."""
    reserve = 0 if role == "admin" else int(1.5 * config.limits.message_size)
    delivery = role == "delivery"
    return SQLiteStore(config.queue.path, reserve=reserve, health=health,
                       commit_delay=COMMIT_DELAY if delivery else 0.0,
                       # claims and outcomes commit on the event loop's thread (Engine._run_inline)
                       inline_writes=delivery)


def make_transfer(config: Config) -> TransferStore:
    """The configured queue as `mta queue export` reads it and `mta queue import` writes it,
    not yet opened (mta/store/transfer.py)."""
    if config.queue.backend == "postgresql":
        # Imported here: asyncpg is the optional extra `mta[postgresql]`.
        from mta.store.postgresql.transfer import PostgreSQLTransfer
        return PostgreSQLTransfer(config.queue.dsn or "")
    from mta.store.sqlite.transfer import SQLiteTransfer
    return SQLiteTransfer(config.queue.path)
