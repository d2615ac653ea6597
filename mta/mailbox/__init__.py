"""Mailboxes for local_domains: local delivery into SQLite, read back over POP3."""
