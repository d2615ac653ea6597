"""Users files (``user:scrypt$...`` lines) for AUTH and mailbox tests."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

from mta import passwords


def write_users(path: Path, users: dict[str, str]) -> None:
    """The users file through mta.passwords.set_password, with scrypt made cheap
    (the cost parameters are stored in each hash), so logins take microseconds."""
    with mock.patch.object(passwords, "SCRYPT_N", 2**4), mock.patch.object(passwords, "SCRYPT_R", 1):
        for user, password in users.items():
            passwords.set_password(path, user, password)
