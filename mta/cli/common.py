"""What the `mta queue …` and `mta mailbox …` commands share: the exit status of
a usage error, opening the daemon's queue file, and how a time is printed."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

from mta.config import Config
from mta.health import Health
from mta.store.api import Store
from mta.store.factory import make_store

EXIT_USAGE = 2


class NoQueue(Exception):
    """The queue file does not exist: a one-line error and exit status 1."""


def require_queue(config: Config, command: str) -> None:
    """Before the event loop starts: NoQueue unless the queue file is there (a shared
    database is made by the first node or command that opens it)."""
    if config.queue.backend == "sqlite" and not os.path.exists(config.queue.path):
        raise NoQueue(f"mta: {command}: {config.queue.path}: no queue database (has the daemon run?)")


@contextlib.asynccontextmanager
async def opened_queue(config: Config) -> AsyncIterator[Store]:
    store = make_store(config, role="admin", health=Health())
    # A command says what is wrong in its own one line (main()); Health's log line would repeat it.
    quiet = logging.getLogger("mta.health")
    hush = logging.Filter("nothing")   # passes only records of a logger named "nothing"
    quiet.addFilter(hush)
    try:
        await store.open()
        try:
            yield store
        finally:
            await store.close()
    finally:
        quiet.removeFilter(hush)


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t))
