"""One daemon per queue: an exclusive lock on ``<queue.path>.lock``.

SQLite lets any number of processes open the queue, so nothing in the database
stops a second ``mta serve`` (another config, the same ``queue.path``) from
treating the first one's in-flight recipients as left over from a crash
(``recover_in_flight``) and delivering them again, or from serving POP3 logins
to the same mailboxes at once. Postfix's master takes the same kind of lock on
``master.lock`` in its data directory for the same reason.

The lock is ``flock(2)`` on a small file beside the queue, holding the main
process's pid for the refusal message. The kernel drops it when the last
descriptor on it closes -- when the daemon dies, even by SIGKILL -- so a stale
file never keeps a restart out. The delivery child (mta/daemon/delivery_process.py) inherits
the descriptor and takes no lock of its own: the queue stays locked until the
whole daemon, child included, has gone. The queue CLI (``mta queue``, ``mta
mailbox``) never takes it: it works beside the daemon by design.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from mta.errors import StartupError

# A lock held for a moment by someone else is waited for this long: `mta check-config`
# probes the lock (see holder()), and a daemon killed just now may still have its
# delivery child on the way out (it dies by PR_SET_PDEATHSIG, a few ms later).
ACQUIRE_WAIT = 0.5


def lock_path(queue_path: str | os.PathLike[str]) -> str:
    return os.fspath(queue_path) + ".lock"


class QueueLock:
    """Held from acquire() until release() or the end of the process."""

    def __init__(self, queue_path: str, fd: int):
        self.queue_path = queue_path
        self.fd: int | None = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)   # the daemon's child may still hold it until it exits


def acquire(queue_path: str | os.PathLike[str], wait: float = ACQUIRE_WAIT) -> QueueLock:
    """Take the queue's lock or raise StartupError naming the daemon that has it.

    The queue's directory must exist (preflight makes it)."""
    queue_path = os.fspath(queue_path)
    path = lock_path(queue_path)
    try:
        # 0600 like the queue; O_CLOEXEC: only children we pass it to keep it.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"queue: {path}: {exc.strerror or exc}") from None
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise StartupError(f"queue: {path}: {exc.strerror or exc}") from None
            if time.monotonic() >= deadline:
                pid = _read_pid(fd)
                os.close(fd)
                raise StartupError(f"queue: {queue_path} is in use by mta pid {pid or '?'}") from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return QueueLock(queue_path, fd)


def holder(queue_path: str | os.PathLike[str]) -> int | None:
    """The pid of the daemon using the queue (0 if it has not written it yet), or
    None if none is. Takes nothing and creates nothing (for `mta check-config`)."""
    try:
        fd = os.open(lock_path(queue_path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None   # no lock file: no daemon has run on this queue (or we cannot tell)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    # The holder writes its pid right after taking the lock: an empty file is
    # one caught in between, so look again briefly.
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None
