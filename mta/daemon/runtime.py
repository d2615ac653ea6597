"""What both the daemon (mta/daemon/main_process.py) and its delivery process (mta/daemon/delivery_process.py) run
on, kept apart so that `mta deliver` does not import the listeners to get it."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

log = logging.getLogger("mta.master")

SHUTDOWN_GRACE = 10.0  # seconds running SMTP transactions get to finish on SIGTERM


def event_loop_factory(*, quiet: bool = False) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (the `fast` extra), else asyncio's own loop.

    uvloop runs the same code with a cheaper event loop and socket layer
    (benchmarks/README.md). MTA_EVENT_LOOP=asyncio turns it off.
    """
    if os.environ.get("MTA_EVENT_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    if not quiet:
        log.info("event loop: uvloop %s", getattr(uvloop, "__version__", "?"))
    return uvloop.new_event_loop
