"""What the daemon knows is wrong with itself, for /healthz, metrics and the log.

A relay that says it is healthy while it cannot do its job is worse than one
that stops (issue 12): every part that finds a fault it cannot heal at once
reports it here under a fixed component name, with a one-line reason, and
clears it when it has healed. ``GET /healthz`` answers 503 with the reasons
while any fault is set; ``mta_health_status{component}`` is 0 for a failing
component (config/prometheus-alerts.yml watches it); the log gets one line when
a fault appears or changes, and one when it clears.

The delivery child reports its faults over its channel (mta/daemon/delivery_process.py), so the
main process's :class:`Health` is the one place that knows them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("mta.health")

# Every component that can fail, known in advance so that each metric series
# exists (at 1, healthy) before the first fault.
COMPONENTS: tuple[str, ...] = (
    "delivery_process",      # the delivery child is not running (mta/daemon/delivery_process.py)
    "queue_database",        # the queue file is damaged (SQLite reports corruption)
    "queue_storage",         # queue writes fail: disk full beyond the reserve, I/O errors
    "mailboxes_users_file",  # mailboxes.users_file cannot be read: mail for lab mailboxes is deferred
    "auth_users_file",       # auth.users_file cannot be read: submission logins fail with 454
)


class Health:
    """The set of current faults: component -> one-line reason."""

    def __init__(self) -> None:
        self._faults: dict[str, str] = {}
        # Called with (component, reason or None) on every change: the delivery child
        # forwards its faults to the main process this way.
        self.on_change: Callable[[str, str | None], None] | None = None

    def fail(self, component: str, reason: str, *, logged: bool = False) -> None:
        """``component`` cannot do its job because of ``reason`` (one line). ``logged``:
        the line is in the log already (the delivery child wrote it), say nothing more."""
        reason = " ".join(reason.split())
        if self._faults.get(component) == reason:
            return
        self._faults[component] = reason
        if not logged:
            log.error("health: %s: %s", component, reason)
        if self.on_change is not None:
            self.on_change(component, reason)

    def clear(self, component: str, *, logged: bool = False) -> None:
        """``component`` works again."""
        if self._faults.pop(component, None) is None:
            return
        if not logged:
            log.warning("health: %s: recovered", component)
        if self.on_change is not None:
            self.on_change(component, None)

    def failing(self, component: str) -> bool:
        return component in self._faults

    @property
    def ok(self) -> bool:
        return not self._faults

    def faults(self) -> dict[str, str]:
        return dict(self._faults)

    def report(self) -> str:
        """What /healthz says: "ok", or one line per fault."""
        if not self._faults:
            return "ok\n"
        return "".join(f"{component}: {reason}\n" for component, reason in sorted(self._faults.items()))
