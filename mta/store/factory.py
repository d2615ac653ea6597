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
* ``admin`` (`mta queue …`, `mta mailbox …`): no reserve;
* ``sendmail`` (sendmail(1) queueing by itself while the daemon is down): as
  ``inbound``, but not this node's daemon: it holds no node name.

With ``queue.backend: postgresql`` (issue 16) the store is the shared database
as this node (its ``hostname``) sees it: the main process holds the node's name,
the delivery process renews its leases and listens to the other nodes, and the
CLI only reads and changes rows. The driver is an optional extra, imported only
here and only then.
"""

from __future__ import annotations

from typing import Literal

from mta.config import Config
from mta.errors import StartupError
from mta.health import Health
from mta.store.api import Store
from mta.store.sqlite.store import SQLiteStore
from mta.store.transfer import TransferStore

Role = Literal["inbound", "delivery", "admin", "sendmail"]

# A delivery's outcome waits up to this long for the next claim to share its commit
# (Engine.commit_delay): the main process's commits are never delayed.
COMMIT_DELAY = 0.002


def make_store(config: Config, *, role: Role, health: Health | None = None, delivers: bool = False) -> Store:
    """The store for ``role``, not yet opened. ``delivers``: the queue manager runs on
    this ``inbound`` store too (one process: MTA_DELIVERY_PROCESS=no, or one core), so on
    a shared database it renews this node's leases and listens to the other nodes."""
    if config.queue.backend == "postgresql":
        return _postgresql(config, role, health, delivers)
    reserve = 0 if role == "admin" else int(1.5 * config.limits.message_size)
    delivery = role == "delivery"
    return SQLiteStore(config.queue.path, reserve=reserve, health=health,
                       commit_delay=COMMIT_DELAY if delivery else 0.0,
                       # claims and outcomes commit on the event loop's thread (Engine._run_inline)
                       inline_writes=delivery)


NO_DRIVER = "queue.backend: postgresql needs its driver (asyncpg is not installed): pip install 'mta[postgresql]'"

# Connections per process: the main process's sessions and the delivery process's
# claims and outcomes share a pool each; the CLI makes a few calls at a time.
POOL_SIZES: dict[Role, int] = {"inbound": 10, "delivery": 10, "admin": 2, "sendmail": 1}


def _postgresql(config: Config, role: Role, health: Health | None, delivers: bool) -> Store:
    try:
        from mta.store.postgresql.store import PostgreSQLStore
    except ModuleNotFoundError as exc:
        if exc.name != "asyncpg":
            raise
        raise StartupError(NO_DRIVER) from None
    assert config.queue.dsn is not None   # mta/config.py requires it with this backend
    return PostgreSQLStore(config.queue.dsn, node=config.hostname, lease=config.queue.lease, health=health,
                           max_connections=POOL_SIZES[role], hold_name=role == "inbound",
                           keep_leases=role == "delivery" or delivers)


def make_transfer(config: Config) -> TransferStore:
    """The configured queue as `mta queue export` reads it and `mta queue import` writes it,
    not yet opened (mta/store/transfer.py)."""
    if config.queue.backend == "postgresql":
        try:
            from mta.store.postgresql.transfer import PostgreSQLTransfer
        except ModuleNotFoundError as exc:
            if exc.name != "asyncpg":
                raise
            raise StartupError(NO_DRIVER) from None
        assert config.queue.dsn is not None   # mta/config.py requires it with this backend
        return PostgreSQLTransfer(config.queue.dsn)
    from mta.store.sqlite.transfer import SQLiteTransfer
    return SQLiteTransfer(config.queue.path)
