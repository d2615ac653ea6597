"""Who has a mailbox: the mailboxes users file, anyone at a local domain with
``mailboxes.catch_all``, anyone at a ``mydestination`` domain, and the
postmaster. Postfix's local_recipient_maps, in one object.

While the users file cannot be read (and no good copy of it is held),
exists() and check_password() raise mta.passwords.UsersFileUnavailable: the
answer is unknown, so RCPT gets 451, local delivery is deferred and POP3 login
gets [SYS/TEMP] -- never "no such user", which would bounce mail (issue 12).
"""

from __future__ import annotations

from pathlib import Path

from mta.config import Config
from mta.health import Health
from mta.model import domain_of
from mta.passwords import UsersFile


class MailboxUsers:
    def __init__(self, config: Config, *, health: Health | None = None,
                 previous: MailboxUsers | None = None):
        self.local_domains = config.local_domains + config.mydestination
        self.catch_all = config.mailboxes.catch_all
        # mydestination domains keep mail for any address; the postmaster's mailbox always exists.
        self.catch_all_domains = frozenset(config.mydestination)
        self.postmaster = config.postmaster.lower()
        path = config.mailboxes.users_file
        self.users: UsersFile | None = None
        if path and previous is not None and previous.users is not None and previous.users.path == Path(path):
            # A reload (SIGHUP) keeps the file's last good copy: the file itself has not moved.
            self.users = previous.users
        elif path:
            # The same hashed format as submission AUTH, keyed by full address (USER alice@lab.test).
            self.users = UsersFile(path, fold_case=True, label="mailboxes.users_file", health=health,
                                   component="mailboxes_users_file")

    def is_local(self, address: str) -> bool:
        return "@" in address and (domain_of(address).rstrip(".") in self.local_domains
                                   or address.lower() == self.postmaster)

    def refresh(self) -> None:
        """Read the users file again if it changed (on the event loop; see UsersFile)."""
        if self.users is not None:
            self.users.refresh()

    def exists(self, address: str) -> bool:
        """Whether mail for ``address`` (at a local domain) has a mailbox to go to."""
        if not self.is_local(address):
            return False
        if self.catch_all or address.lower() == self.postmaster \
                or domain_of(address).rstrip(".") in self.catch_all_domains:
            return True
        return self.users is not None and self.users.lookup(address) is not None

    def check_password(self, address: str, password: str) -> bool:
        """POP3 login; scrypt is slow, so callers run this in a thread after refresh()."""
        if self.users is None or any(c in address for c in "\r\n\x00") or "\x00" in password:
            return False
        return self.users.check(address, password)
