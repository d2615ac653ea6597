"""Logging set-up: one line per event, in Postfix's shape, so its log tools read ours.

A line is ``mta/<component>[<pid>]: <text>``, as Postfix writes
``postfix/smtpd[812]: ...``; warnings and errors say so first (``warning: ``,
``error: ``, ``fatal: ``), INFO lines say nothing. Lines about a message start
with its queue id, so operators grep a message's whole life as with Postfix::

    mta/smtpd[812]: 3F2A9C1B7D01: client=lab1.example[10.0.0.7]
    mta/qmgr[813]: 3F2A9C1B7D01: to=<a@b>, relay=mx[192.0.2.5]:25, delay=0.41, delays=0.01/0/0.2/0.2, ...

pflogsumm reads them with ``--syslog-name=mta``.

Where they go:
* under systemd (``JOURNAL_STREAM`` set), to the syslog socket ``/dev/log`` with
  facility mail: journald (and rsyslog's mail.log) then records the tag
  ``mta/smtpd`` and the pid per line, and ``journalctl -u mta`` shows them as
  Postfix's lines are shown. Written to stderr, every line would carry the one
  identifier of the unit instead.
* elsewhere, to stderr, behind an RFC 3339 time stamp and the host name as a
  syslog file has them (``MTA_LOG=stderr`` or ``syslog`` chooses).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys
import time

# Postfix's severity words (msg_warn, msg_error, msg_fatal); INFO has none.
_SEVERITY = {logging.DEBUG: "debug: ", logging.WARNING: "warning: ", logging.ERROR: "error: ",
             logging.CRITICAL: "fatal: "}
# Loggers of libraries we use, shown under a component name of ours.
_COMPONENT = {"mail.log": "aiosmtpd"}
SYSLOG_SOCKET = "/dev/log"


def component(logger_name: str) -> str:
    """``mta.smtpd`` -> ``smtpd``; another library's logger keeps a short name of its own."""
    if logger_name.startswith("mta."):
        return logger_name[4:]
    return _COMPONENT.get(logger_name, logger_name.partition(".")[0])


class PostfixFormatter(logging.Formatter):
    """``mta/smtpd[812]: warning: text`` (tag, pid, severity word, message)."""

    def __init__(self, stamp: bool = False):
        super().__init__()
        self.stamp = stamp
        self.host = socket.gethostname().split(".")[0] or "localhost"

    def format(self, record: logging.LogRecord) -> str:
        text = f"mta/{component(record.name)}[{record.process}]: {_SEVERITY.get(record.levelno, '')}" \
               f"{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.stamp:
            text = f"{_rfc3339(record.created)} {self.host} {text}"
        return text


def _rfc3339(t: float) -> str:
    """2026-12-02T20:39:18.965123+00:00, as Postfix's maillog_file (and pflogsumm) know it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}+00:00"


def _syslog_handler() -> logging.Handler | None:
    try:
        handler = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET,
                                                 facility=logging.handlers.SysLogHandler.LOG_MAIL)
    except OSError:
        return None
    handler.append_nul = False   # journald and rsyslog take the line as it is
    return handler


def setup_logging(level: str = "INFO", timestamps: bool | None = None) -> None:
    where = os.environ.get("MTA_LOG", "auto").lower()
    under_journal = "JOURNAL_STREAM" in os.environ
    handler: logging.Handler | None = None
    if where == "syslog" or (where == "auto" and under_journal):
        handler = _syslog_handler()
        if handler is not None:
            handler.setFormatter(PostfixFormatter(stamp=False))
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        if timestamps is None:
            timestamps = not under_journal   # journald stamps lines itself
        handler.setFormatter(PostfixFormatter(stamp=timestamps))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO ("<peer> >> b'MAIL ...'"); ours say what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # Several lines per message: skip what the format never shows (the logging
    # HOWTO's "Optimization" section): no caller lookup (a walk up the stack for
    # every record), no thread or multiprocessing names. The pid stays: it is in
    # the format, as in Postfix's lines.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
