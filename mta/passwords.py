"""The users file: one ``user:hash`` per line, never a plain-text password;
and the login throttle shared by SMTP AUTH and POP3.

Hash format: ``scrypt$N$r$p$<salt b64>$<key b64>`` from hashlib.scrypt (the
standard library's memory-hard KDF, so no extra dependency). Used by submission
AUTH and written by ``mta passwd``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


def read_users(path: str | os.PathLike[str]) -> dict[str, str]:
    """user -> hash. Blank lines and '#' comments are skipped."""
    users: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if sep:
            users[user] = hashed
    return users


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
    return target.read_text(encoding="utf-8").splitlines() if target.exists() else []


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
    """Reads the users file again whenever it changes, so `mta passwd` needs no reload."""

    def __init__(self, path: str | os.PathLike[str], *, fold_case: bool = False):
        self.path = Path(path)
        # Mailbox users are addresses, looked up without regard to case.
        self.fold_case = fold_case
        self._stamp: tuple[float, int, int] | None = None
        self._users: dict[str, str] = {}

    def lookup(self, user: str) -> str | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                users = read_users(self.path)
            except (OSError, UnicodeDecodeError):
                return None
            self._users = {k.lower(): v for k, v in users.items()} if self.fold_case else users
            self._stamp = stamp
        return self._users.get(user.lower() if self.fold_case else user)

    def check(self, user: str, password: str) -> bool:
        stored = self.lookup(user)
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
