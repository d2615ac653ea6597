"""The users file: one ``user:hash`` per line, never a plain-text password;
and the login throttle shared by SMTP AUTH and POP3.

Hash format: ``scrypt$N$r$p$<salt b64>$<key b64>`` from hashlib.scrypt (the
standard library's memory-hard KDF, so no extra dependency). Used by submission
AUTH and written by ``mta passwd``.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mta.errors import ConfigError
from mta.health import Health

log = logging.getLogger("mta.tables")

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return "$".join(("scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(key).decode()))


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, key_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, key = base64.b64decode(salt_b64), base64.b64decode(key_b64)
        got = hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=salt, n=int(n), r=int(r),
                             p=int(p), dklen=len(key), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, key)


class UsersFileError(ValueError):
    """A users file that cannot be used; str() is one line naming the file and,
    for a bad line, its number (never the line itself: it may hold a password)."""

    def __init__(self, path: str | os.PathLike[str], problem: str, line: int | None = None):
        super().__init__(f"{path} line {line}: {problem}" if line else f"{path}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


class UsersFileUnavailable(Exception):
    """The users file cannot be read and no good copy of it is held: a lookup's
    answer is unknown, which is a temporary failure (Postfix: "451 4.3.0
    Temporary lookup failure"), never "no such user"."""


def _decoded_lines(path: str | os.PathLike[str], raw: bytes) -> list[str]:
    """The file's lines, each checked to be UTF-8. A byte-order mark that some
    editors put at the start is not part of the first user name."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    lines = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError:
            raise UsersFileError(path, "not valid UTF-8", number) from None
    if lines and not lines[-1]:
        lines.pop()   # the newline that ends the last line
    return lines


def load_users(path: str | os.PathLike[str], *, fold_case: bool = False,
               warn: Callable[[str], None] | None = None) -> dict[str, str]:
    """user -> hash, read strictly; blank lines and '#' comments are skipped.

    Raises UsersFileError naming the file and the line for anything that is not
    a ``user:hash`` line, so that one bad byte can never pass for "this user does
    not exist". A user given twice is reported through ``warn`` and the first
    entry wins, as in Postfix's tables (postmap warns "duplicate entry" and keeps
    the first) and /etc/passwd: an entry appended later cannot take over a name.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UsersFileError(path, exc.strerror or str(exc)) from None
    users: dict[str, str] = {}
    first: dict[str, int] = {}
    for number, line in enumerate(_decoded_lines(path, raw), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        user = user.strip()
        if not sep or not user:
            raise UsersFileError(path, "not a user:hash line", number)
        key = user.lower() if fold_case else user
        if key in first:
            if warn is not None:
                warn(f"{path} line {number}: duplicate entry for {user!r} ignored; "
                     f"line {first[key]} is used (the first entry wins)")
            continue
        first[key] = number
        users[key] = hashed
    return users


def read_users(path: str | os.PathLike[str]) -> dict[str, str]:
    """user -> hash (see load_users)."""
    return load_users(path)


def check_users_file(key: str, path: str | None, warn: Callable[[str], None] | None = None) -> None:
    """For `mta check-config`: ConfigError naming ``key``, the file and the line."""
    if not path:
        return
    try:
        load_users(path, fold_case=key.startswith("mailboxes."),
                   warn=None if warn is None else (lambda text: warn(f"{key}: {text}")))
    except UsersFileError as exc:
        raise ConfigError(key, str(exc)) from None


def set_password(path: str | os.PathLike[str], user: str, password: str) -> None:
    """Add or replace ``user``'s line; the file is (re)written with mode 0600."""
    if not user or ":" in user or any(c in user for c in "\r\n\x00") or user != user.strip():
        raise ValueError(f"user name {user!r} may not be empty or contain ':', spaces at the ends or control characters")
    target = Path(path)
    lines = _existing_lines(target)
    entry = f"{user}:{hash_password(password)}"
    kept = [line for line in lines if line.partition(":")[0].strip() != user]
    kept.append(entry)
    _rewrite(target, kept)


def delete_user(path: str | os.PathLike[str], user: str) -> bool:
    """Remove ``user``'s line (`mta passwd --delete`); False if there was none."""
    target = Path(path)
    lines = _existing_lines(target)
    kept = [line for line in lines if line.partition(":")[0].strip() != user]
    if len(kept) == len(lines):
        return False
    _rewrite(target, kept)
    return True


def _existing_lines(target: Path) -> list[str]:
    if not target.parent.is_dir():
        # A typo in the path would otherwise make a tree of directories nobody reads.
        raise OSError(f"{target.parent}: no such directory (create it first)")
    return _decoded_lines(target, target.read_bytes()) if target.exists() else []


def _rewrite(target: Path, lines: list[str]) -> None:
    # Write a new file beside the old and rename it over, so a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class UsersFile:
    """The users file, read again whenever it changes, so `mta passwd` needs no reload.

    A file that cannot be read is never taken for an empty one (issue 12): a
    change that leaves a bad line keeps the last good copy in use, as a failed
    postmap leaves Postfix on its old table, while a file that is gone or cannot
    be opened has no copy to serve (it may have been removed on purpose, to
    revoke every login): lookups then raise UsersFileUnavailable, and callers
    answer with a temporary failure. Either way there is an error line naming
    the file and the line, and ``health`` shows the fault until the file is good.
    Lookups must run on the event loop's thread (they may report to ``health``);
    check() reads the copy as of the last refresh(), so it may run in a thread.
    """

    def __init__(self, path: str | os.PathLike[str], *, fold_case: bool = False,
                 label: str = "auth.users_file", health: Health | None = None,
                 component: str = "auth_users_file"):
        self.path = Path(path)
        # Mailbox users are addresses, looked up without regard to case.
        self.fold_case = fold_case
        self.label = label            # the config key, for log lines and /healthz
        self.health = health
        self.component = component
        self._stamp: tuple[int, int, int, int] | None = None
        self._users: dict[str, str] | None = None   # the last good copy
        self.problem: str | None = None             # why the file is not in use, while it is not
        self.refresh()

    def refresh(self) -> None:
        """Read the file again if it changed since the last look (one stat() otherwise)."""
        try:
            st = self.path.stat()
        except OSError as exc:
            self._stamp = None
            self._users = None   # gone: nothing to serve from
            self._failed(UsersFileError(self.path, exc.strerror or str(exc)))
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            users = load_users(self.path, fold_case=self.fold_case,
                               warn=lambda text: log.warning("%s: %s", self.label, text))
        except UsersFileError as exc:
            if exc.line is None:   # cannot be opened or read at all (permissions, I/O)
                self._users = None
            self._failed(exc)
            return
        self._users = users
        if self.problem is not None:
            self.problem = None
            if self.health is not None:
                self.health.clear(self.component)
            else:
                log.warning("%s: %s is good again", self.label, self.path)

    def _failed(self, exc: UsersFileError) -> None:
        kept = "; the copy read before stays in use" if self._users is not None else ""
        problem = f"{self.label}: {exc}{kept}"
        if problem == self.problem:
            return
        self.problem = problem
        if self.health is not None:
            self.health.fail(self.component, problem)   # logs the line too
        else:
            log.error("%s", problem)

    def _current(self) -> dict[str, str]:
        if self._users is None:
            raise UsersFileUnavailable(self.problem or f"{self.label}: {self.path}: not read")
        return self._users

    def lookup(self, user: str) -> str | None:
        """The user's hash, None for no such user; UsersFileUnavailable when unknown."""
        self.refresh()
        return self._current().get(user.lower() if self.fold_case else user)

    def check(self, user: str, password: str) -> bool:
        stored = self._current().get(user.lower() if self.fold_case else user)
        if stored is None:
            # Spend the same time as for a real user, so timing does not reveal names.
            verify_password(password, _DUMMY_HASH)
            return False
        return verify_password(password, stored)


_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


@dataclass
class AuthThrottle:
    """Slows down password guessing: a growing delay per client IP after failures."""

    free_failures: int = 3
    window: float = 600.0
    max_delay: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, list[float]] = field(default_factory=dict)

    def delay(self, ip: str) -> float:
        now = self.clock()
        recent = [t for t in self._failures.get(ip, []) if now - t < self.window]
        if recent:
            self._failures[ip] = recent
        else:
            self._failures.pop(ip, None)
        excess = len(recent) - self.free_failures + 1
        return 0.0 if excess <= 0 else min(float(2 ** (excess - 1)), self.max_delay)

    def failed(self, ip: str) -> None:
        self._failures.setdefault(ip, []).append(self.clock())
        if len(self._failures) > 10000:  # bound memory under a scan from many addresses
            self._failures.pop(next(iter(self._failures)))

    def succeeded(self, ip: str) -> None:
        self._failures.pop(ip, None)
