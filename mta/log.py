"""Logging set-up: one line per event on stderr, in Postfix's shape.

Lines about a message start with its queue id, so operators can grep a
message's whole life as they do with Postfix:
``3F2A9C1B7D01: from=<a@b>, size=1234, nrcpt=2 (queued)``.
Under systemd the journal adds time and host, so the timestamp is optional.
"""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str = "INFO", timestamps: bool | None = None) -> None:
    if timestamps is None:
        timestamps = "JOURNAL_STREAM" not in os.environ  # journald stamps lines itself
    fmt = "%(name)s[%(process)d]: %(levelname)s %(message)s"
    if timestamps:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO ("<peer> >> b'MAIL ...'"); ours say what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # Several lines per message: skip what the format never shows (the logging
    # HOWTO's "Optimization" section): no caller lookup (a walk up the stack for
    # every record), no thread or multiprocessing names. The pid stays: it is in
    # the format, as in Postfix's lines.
    logging._srcfile = None   # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
