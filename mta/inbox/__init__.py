"""The lab inbox: one entry per accepted message that reached a lab mailbox, as
the Mailpit-compatible HTTP API and the web UI show it (issue 15)."""
