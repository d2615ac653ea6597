"""A damaged queue file: recognising SQLite's corruption errors, and the start-up check.

A queue file can be damaged by a disk fault, a copy taken while the daemon
wrote to it, or a careless `cp`/`truncate`. Before this module such a file was
silent (issue 12): a damaged header made `mta serve` and `mta queue list` hang
after a traceback (aiosqlite's worker thread is not a daemon thread, and open()
left it running), and a damaged data page let the daemon answer 250 to new mail
while the queue manager failed on every claim. Now:

* a file that cannot be opened at all is refused: exit status 2 and one line
  (:data:`RECOVERY_HINT` says where the README tells how to recover it);
* ``mta serve`` runs ``PRAGMA quick_check`` at start, bounded in time;
* any store operation, in either process, that gets SQLITE_CORRUPT or
  SQLITE_NOTADB reports ``queue_database`` to Health (``/healthz`` 503,
  ``mta_health_status{component="queue_database"} 0``, the MTAUnhealthy alert,
  one log line), and new mail is refused with ``451 4.3.0`` from then on.

The fault stays until the daemon is restarted on a repaired file: SQLite does
not heal a damaged page, and a repair replaces the file under the open
connection.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from mta.errors import RECOVERY_HINT, damage_reason

__all__ = ["RECOVERY_HINT", "damage_reason", "is_corruption", "quick_check"]

log = logging.getLogger("mta.queue")

# Primary result codes (https://www.sqlite.org/rescode.html); extended codes keep them
# in the low byte (SQLITE_CORRUPT_INDEX = 779 = 11 | 3 << 8).
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26

# How long `mta serve` may spend on PRAGMA quick_check before it starts anyway: the
# check reads every page (about 0.3 s for 460 MB from the page cache, seconds from a
# cold disk). A bigger queue is checked in part, and the log says so; the rest is
# checked as it is read (any corruption found later is reported the same way).
QUICK_CHECK_SECONDS = 10.0


def is_corruption(exc: BaseException) -> bool:
    """SQLite says the file is damaged (not busy, not full, not an I/O error)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)   # Python 3.11+
    if code is not None:
        return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def quick_check(conn: sqlite3.Connection, seconds: float = QUICK_CHECK_SECONDS) -> str | None:
    """``PRAGMA quick_check`` on ``conn``, given at most ``seconds``.

    Returns None when the file is fine, or checked in part because time ran out
    (logged), else what is wrong, in one line. SQLite reports some damage as rows
    and some by failing the statement (a page of garbage: "database disk image
    is malformed"); both come back as the answer. Runs on the database thread."""
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    # Called every 1,000 virtual machine steps; a true answer interrupts the statement.
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    try:
        rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check(10)").fetchall()]
    except sqlite3.OperationalError as exc:
        if "interrupt" not in str(exc):
            raise
        size = _file_size(conn)
        log.warning("queue check: PRAGMA quick_check stopped after %gs (%d MB queue): not all of it was "
                    "checked; damage elsewhere is reported when it is read", seconds, size // 1_000_000)
        return None
    except sqlite3.DatabaseError as exc:
        if is_corruption(exc):
            return str(exc)
        raise
    finally:
        conn.set_progress_handler(None, 0)
    if rows == ["ok"]:
        log.info("queue check: PRAGMA quick_check ok (%.2fs)", time.monotonic() - started)
        return None
    more = f" (and {len(rows) - 1} more problem(s))" if len(rows) > 1 else ""
    return f"PRAGMA quick_check: {rows[0]}{more}"


def _file_size(conn: sqlite3.Connection) -> int:
    try:
        path = conn.execute("PRAGMA database_list").fetchone()[2]
        return Path(path).stat().st_size
    except (sqlite3.Error, OSError, TypeError, IndexError):
        return 0
