"""Polling until something is true, for tests that watch a queue file, a peer or a log."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

What = str | Callable[[], object]


def _describe(what: What) -> object:
    return what() if callable(what) else what


async def wait_until(predicate: Callable[[], T | Awaitable[T]], timeout: float = 10.0,  # noqa: ASYNC109
                     what: What = "condition", *, interval: float = 0.02) -> T:
    """Poll ``predicate`` (a plain or an async callable) until it returns something true,
    and return that. After ``timeout`` seconds, AssertionError naming ``what`` (a string,
    or a callable called then, to show the state that was not reached)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {_describe(what)}")
        await asyncio.sleep(interval)


def wait_until_sync(predicate: Callable[[], T], timeout: float = 10.0, what: What = "condition",
                    *, interval: float = 0.05) -> T:
    """wait_until for tests without an event loop (blocking sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {_describe(what)}")
        time.sleep(interval)
