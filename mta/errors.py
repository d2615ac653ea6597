"""Exceptions that cross module boundaries."""

from __future__ import annotations

from mta.model import Reply


class ConfigError(Exception):
    """A configuration problem; str() is one line naming the key path."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class StartupError(Exception):
    """Something outside the config's syntax keeps the daemon from starting: a
    missing certificate, a queue directory that cannot be written, a port in use,
    the queue locked by another daemon. str() is the one line `mta serve` and
    `mta check-config` print (exit status 2), naming the key or resource."""


class DeliveryError(Exception):
    """A failed delivery step carrying the reply that explains it (slimta's RelayError)."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return self.reply.permanent


class PermanentError(DeliveryError):
    """5xx: the recipient fails now."""


class TransientError(DeliveryError):
    """4xx or a network problem: the recipient is deferred."""


class StoreError(Exception):
    """The queue could not commit; the SMTP client gets a 4xx and retries."""

    def __init__(self, message: str, disk_full: bool = False):
        super().__init__(message)
        self.disk_full = disk_full


class QueueDamagedError(StoreError):
    """The queue file is damaged (SQLite reports corruption); str() is one line naming the
    file: "/var/lib/mta/queue.db is damaged: file is not a database" (damage_reason)."""


# Where the README tells how to recover a damaged queue: said after every damage line.
RECOVERY_HINT = 'see README "Recovering a damaged queue"'


def damage_reason(path: object, what: object) -> str:
    """The one line naming the file: "/var/lib/mta/queue.db is damaged: file is not a database"."""
    return f"{path} is damaged: {' '.join(str(what).split())}"
