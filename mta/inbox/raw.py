"""The message an inbox entry serves, from one mailbox's copy of it."""

from __future__ import annotations

import re

# The lines mta/mailbox/local.py's delivery_headers puts at the top of each copy:
# Return-Path, then X-Original-To and Delivered-To, which name one mailbox's recipient.
_TRACE = re.compile(rb"\A(Return-Path:[^\r\n]*\r?\n)X-Original-To:[^\r\n]*\r?\nDelivered-To:[^\r\n]*\r?\n",
                    re.IGNORECASE)


def entry_raw(copy: bytes) -> bytes:
    """A mailbox copy without its per-recipient trace lines (X-Original-To and
    Delivered-To, Postfix local(8)'s), so every copy of a message serves the same
    bytes. Return-Path stays (RFC 5321 §4.4: the sender, the same in every copy).
    Lines further down, added by earlier hops, are the message's own and stay."""
    return _TRACE.sub(rb"\1", copy, count=1)
