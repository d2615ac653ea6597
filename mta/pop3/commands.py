"""What the command handlers of both states share: the -ERR a command is refused
with, checks of its arguments, and client text made fit for one log line."""

from __future__ import annotations

from mta.pop3 import replies as R


class Refused(Exception):
    """A command cannot be carried out; ``reply`` is its -ERR line."""

    def __init__(self, reply: bytes):
        super().__init__(reply)
        self.reply = reply


def no_args(keyword: str, arg: str) -> None:
    if arg.strip():
        raise Refused(R.err(f"{keyword} takes no arguments"))


def exact_args(arg: str, count: int, usage: str) -> list[str]:
    args = arg.split()
    if len(args) != count:
        raise Refused(R.err(usage))
    return args


def printable(text: str, limit: int = 128) -> str:
    """Client-supplied text made safe for one log line."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:limit])


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
