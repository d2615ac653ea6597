"""POP3 (RFC 1939) access to the local mailboxes: one listener, one session per connection."""

from mta.pop3.server import POP3Listener

__all__ = ["POP3Listener"]
