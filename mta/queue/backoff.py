"""Retry timing: pure functions, so the schedule is unit-tested without waiting."""

from __future__ import annotations

import random

from mta.config import RetryConfig


def next_delay(attempts: int, retry: RetryConfig, rng: random.Random | None = None) -> float:
    """Seconds until the next try after ``attempts`` failed tries (1 = the first).

    Doubles from min_backoff up to max_backoff, like Postfix's
    minimal/maximal_backoff_time, with ±10% jitter so that a restart or an
    outage does not make every deferred message retry in the same second.
    """
    base: float = retry.min_backoff * (2 ** max(0, attempts - 1))   # int ** int is Any to mypy
    delay = min(base, retry.max_backoff)
    jitter = (rng or random).uniform(0.9, 1.1)
    return max(0.0, min(delay * jitter, retry.max_backoff))


def expired(arrival: float, now: float, retry: RetryConfig) -> bool:
    """True once a message has been queued longer than max_lifetime."""
    return now - arrival >= retry.max_lifetime
