"""Who has a mailbox: the mailboxes users file, or anyone at a local domain
with ``mailboxes.catch_all``. Postfix's local_recipient_maps, in one object."""

from __future__ import annotations

from mta.config import Config
from mta.model import domain_of
from mta.passwords import UsersFile


class MailboxUsers:
    def __init__(self, config: Config):
        self.local_domains = config.local_domains
        self.catch_all = config.mailboxes.catch_all
        path = config.mailboxes.users_file
        # The same hashed format as submission AUTH, keyed by full address (USER alice@lab.test).
        self.users = UsersFile(path, fold_case=True) if path else None

    def is_local(self, address: str) -> bool:
        return "@" in address and domain_of(address).rstrip(".") in self.local_domains

    def exists(self, address: str) -> bool:
        """Whether mail for ``address`` (at a local domain) has a mailbox to go to."""
        if not self.is_local(address):
            return False
        if self.catch_all:
            return True
        return self.users is not None and self.users.lookup(address) is not None

    def check_password(self, address: str, password: str) -> bool:
        """POP3 login; scrypt is slow, so callers run this in a thread."""
        if self.users is None or any(c in address for c in "\r\n\x00") or "\x00" in password:
            return False
        return self.users.check(address, password)
