"""The TRANSACTION state of a POP3 session (RFC 1939 §5) and its end, UPDATE (§6).

After a login the session hands every transaction command (STAT, LIST, UIDL,
RETR, TOP, DELE, RSET) to a Transaction: the maildrop as it was at login,
numbered 1..n oldest first, the DELE marks, and what was read, for the
disconnect line. Nothing changes in the store before QUIT, when ``update()``
removes the marked messages in one commit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mta.message import header_bounds
from mta.pop3 import replies as R
from mta.pop3.commands import Refused, exact_args, no_args, plural, printable
from mta.store.api import Mailboxes, StoredMessage

if TYPE_CHECKING:
    from mta.metrics import Metrics

log = logging.getLogger("mta.pop3")

_NUMBER = re.compile(r"[0-9]{1,10}")


@dataclass
class Maildrop:
    """The mailbox as snapshotted at login; message n is ``messages[n - 1]``."""

    messages: list[StoredMessage]
    deleted: set[int] = field(default_factory=set)   # message numbers marked by DELE

    def live(self) -> Iterator[tuple[int, StoredMessage]]:
        for number, message in enumerate(self.messages, 1):
            if number not in self.deleted:
                yield number, message

    def totals(self) -> tuple[int, int]:
        sizes = [m.size for _, m in self.live()]
        return len(sizes), sum(sizes)


def top_of(data: bytes, lines: int) -> bytes:
    """RFC 1939 §7 TOP: the header, the blank line, then ``lines`` lines of the body."""
    start = header_bounds(data)[1]   # past the empty line
    end = start
    for _ in range(lines):
        newline = data.find(b"\n", end)
        if newline < 0:
            return data
        end = newline + 1
    return data[:end]


class Transaction:
    """One logged-in user's maildrop and the commands on it."""

    def __init__(self, user: str, messages: list[StoredMessage], store: Mailboxes,
                 listener: str, metrics: Metrics | None):
        self.user = user
        self.maildrop = Maildrop(messages)
        self.store = store
        self.listener = listener     # for the metrics' label
        self.metrics = metrics
        self.retrieved = [0, 0]   # RETR count, octets
        self.topped = [0, 0]      # TOP count, octets
        self.deleted = 0          # messages removed at UPDATE
        self.handlers: dict[str, Callable[[str], Awaitable[bytes]]] = {
            "STAT": self._stat, "LIST": self._list, "UIDL": self._uidl, "RETR": self._retr,
            "TOP": self._top, "DELE": self._dele, "RSET": self._rset,
        }

    def _message(self, arg: str) -> tuple[int, StoredMessage]:
        """A message number argument, checked against the maildrop (RFC 1939 §5)."""
        if not _NUMBER.fullmatch(arg):
            raise Refused(R.BAD_MESSAGE_NUMBER)
        number = int(arg)
        if not 1 <= number <= len(self.maildrop.messages):
            raise Refused(R.NO_SUCH_MESSAGE)
        if number in self.maildrop.deleted:
            raise Refused(R.err(f"message {number} already deleted"))
        return number, self.maildrop.messages[number - 1]

    async def _stat(self, arg: str) -> bytes:
        no_args("STAT", arg)
        count, octets = self.maildrop.totals()
        return R.ok(f"{count} {octets}")   # RFC 1939 §5: exactly "+OK nn mm", for parsers

    async def _list(self, arg: str) -> bytes:
        def status(count: int, octets: int) -> str:
            return f"{plural(count, 'message')} ({octets} octets)"

        return self._listing(arg, "LIST", lambda m: str(m.size), status)

    async def _uidl(self, arg: str) -> bytes:
        return self._listing(arg, "UIDL", lambda m: m.uid, lambda count, octets: "unique-id listing follows")

    def _listing(self, arg: str, keyword: str, value: Callable[[StoredMessage], str],
                 status: Callable[[int, int], str]) -> bytes:
        """LIST and UIDL: one message's line, or every message not marked deleted."""
        args = arg.split()
        if len(args) > 1:
            return R.err(f"{keyword} takes at most one message number")
        if args:
            number, message = self._message(args[0])
            return R.ok(f"{number} {value(message)}")
        count, octets = self.maildrop.totals()
        return R.multiline(status(count, octets), (f"{n} {value(m)}" for n, m in self.maildrop.live()))

    async def _retr(self, arg: str) -> bytes:
        [which] = exact_args(arg, 1, "RETR needs one message number")
        number, message = self._message(which)
        data = await self._fetch(number, message)
        self.retrieved[0] += 1
        self.retrieved[1] += len(data)
        if self.metrics is not None:
            self.metrics.pop3_message_retrieved(self.listener)
        return R.ok(f"{len(data)} octets") + R.stuff(data)

    async def _top(self, arg: str) -> bytes:
        which, lines = exact_args(arg, 2, "TOP needs a message number and a number of lines")
        number, message = self._message(which)
        if not _NUMBER.fullmatch(lines):
            return R.err("invalid number of lines")
        part = top_of(await self._fetch(number, message), int(lines))
        self.topped[0] += 1
        self.topped[1] += len(part)
        return R.ok("top of message follows") + R.stuff(part)

    async def _fetch(self, number: int, message: StoredMessage) -> bytes:
        try:
            data = await self.store.read(self.user, message.id)
        except Exception:  # a read failure fails this command, not the session
            log.exception("pop3(%s): reading message %d failed", printable(self.user), number)
            raise Refused(R.err(f"[SYS/TEMP] cannot read message {number} now; try again later")) from None
        if data is None:
            # Pruned (mailboxes.max_age / max_messages) after the maildrop was snapshotted.
            raise Refused(R.err(f"message {number} is no longer available"))
        return data

    async def _dele(self, arg: str) -> bytes:
        [which] = exact_args(arg, 1, "DELE needs one message number")
        number, _ = self._message(which)
        # Only marked: the store changes at QUIT, in the UPDATE state (RFC 1939 §6).
        self.maildrop.deleted.add(number)
        return R.ok(f"message {number} deleted")

    async def _rset(self, arg: str) -> bytes:
        no_args("RSET", arg)
        self.maildrop.deleted.clear()
        count, octets = self.maildrop.totals()
        return R.ok(f"maildrop has {plural(count, 'message')} ({octets} octets)")

    async def update(self) -> str | None:
        """QUIT: remove the marked messages in one commit (RFC 1939 §6). What the
        sign-off line says about them, or None when the commit failed (and every
        message is still there)."""
        marked = [self.maildrop.messages[n - 1].id for n in sorted(self.maildrop.deleted)]
        try:
            await self.store.delete(self.user, marked)
        except Exception:  # the commit failed: every message is still there
            log.exception("pop3(%s): deleting %d messages failed", printable(self.user), len(marked))
            return None
        self.deleted = len(marked)
        if self.metrics is not None:
            self.metrics.pop3_messages_deleted(self.listener, len(marked))
        left = len(self.maildrop.messages) - len(marked)
        return f"{plural(len(marked), 'message')} deleted, {left} left"
