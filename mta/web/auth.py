"""HTTP basic auth (RFC 7617) for an http listener with ``users_file``: the same
``user:scrypt`` lines ``mta passwd`` writes and submission AUTH checks.

scrypt is slow on purpose (tens of milliseconds), and Mailpit clients poll with
the same credentials many times a second, so a successful check is remembered:
keyed by the user, a SHA-256 of the password and the stored hash, so that a
changed or removed line in the file ends it at once. Failures are not
remembered; they are slowed down by the same throttle as SMTP AUTH and POP3.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging

from mta.passwords import AuthThrottle, UsersFile, UsersFileUnavailable

log = logging.getLogger("mta.web")

CACHE_SIZE = 256     # remembered successful logins (user, password digest, stored hash)


class BasicAuth:
    def __init__(self, users: UsersFile, throttle: AuthThrottle | None = None):
        self.users = users
        self.throttle = throttle or AuthThrottle()
        self._verified: dict[tuple[str, bytes, str], None] = {}

    async def authenticate(self, header: str | None, ip: str) -> str | None:
        """The user name for a good ``Authorization: Basic ...`` header, else None."""
        credentials = parse_basic(header)
        if credentials is None:
            return None
        user, password = credentials
        try:
            stored = self.users.lookup(user)   # refreshes the file (on the loop: it may report to Health)
        except UsersFileUnavailable as exc:
            log.warning("basic auth from %s unavailable: %s", ip, exc)
            return None
        key = (user, hashlib.sha256(password.encode("utf-8", "surrogateescape")).digest(), stored or "")
        if stored is not None and key in self._verified:
            return user
        delay = self.throttle.delay(ip)
        if delay:
            await asyncio.sleep(delay)
        ok = await asyncio.to_thread(self.users.check, user, password)   # scrypt: off the loop
        if not ok:
            self.throttle.failed(ip)
            log.warning("basic auth from %s failed: authentication failure, user=%s", ip,
                        user if user.isprintable() else repr(user))
            return None
        self.throttle.succeeded(ip)
        if len(self._verified) >= CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))
        self._verified[key] = None
        return user


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) of an RFC 7617 ``Basic`` credential, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user or any(c in user for c in "\r\n\x00") or "\x00" in password:
        return None
    return user, password
