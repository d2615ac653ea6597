"""`mta mailbox …`: list, show and purge the lab mailboxes (local_domains) in the
daemon's queue file, beside the running daemon. A missing queue file or an unknown
mailbox or message is one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from mta.cli.common import opened_queue, require_queue, when
from mta.config import Config
from mta.store.api import Mailboxes, MailboxSummary, MessageSummary, mailbox_key


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    mailbox = sub.add_parser("mailbox", parents=[common], help="inspect and empty local mailboxes")
    msub = mailbox.add_subparsers(dest="mailbox_command", required=True, metavar="ACTION")
    mlist = msub.add_parser("list", parents=[common], help="list mailboxes, or one mailbox's messages",
                            description="Without USER: each mailbox holding mail, with its message count,\n"
                                        "size and newest arrival. With USER (alice@lab.test): that mailbox's\n"
                                        "messages, oldest first, as POP3 numbers them, with UIDL, size,\n"
                                        "arrival, sender and subject.",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    mlist.add_argument("user", nargs="?", metavar="USER", help="a mailbox address, e.g. alice@lab.test")
    mlist.add_argument("--json", action="store_true", help="one JSON object per line")
    purge = msub.add_parser("purge", parents=[common], help="remove every message of a mailbox",
                            description="Remove every message of USER's mailbox (the users file is not\n"
                                        "changed). A POP3 session open on it sees the messages as gone.")
    purge.add_argument("user", metavar="USER", help="the mailbox address; exit 1 if there is no such mailbox")
    mshow = msub.add_parser("show", parents=[common], help="print one stored message, as postcat does",
                            description="Print message N of USER's mailbox (its number in `mta mailbox list\n"
                                        "USER`, as POP3 numbers it) or the message with that UIDL, as stored:\n"
                                        "the added Return-Path:, X-Original-To: and Delivered-To: first.",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    mshow.add_argument("user", metavar="USER", help="the mailbox address, e.g. alice@lab.test")
    mshow.add_argument("message", metavar="N|UIDL", help="a message number (1 = oldest) or a UIDL")


def run(args: argparse.Namespace, config: Config) -> int:
    require_queue(config, "mailbox")
    return asyncio.run(_mailbox(args, config))


async def _mailbox(args: argparse.Namespace, config: Config) -> int:
    async with opened_queue(config) as store:
        mailboxes = store.mailboxes
        if args.mailbox_command == "show":
            return await _mailbox_show(mailboxes, args.user, args.message)
        if args.mailbox_command == "purge":
            removed = await mailboxes.purge(args.user)
            if not removed and not _has_mailbox(config, args.user):
                print(f"mta mailbox purge: {mailbox_key(args.user)}: no such mailbox", file=sys.stderr)
                return 1
            print(f"{mailbox_key(args.user)}: {removed} message{'s' if removed != 1 else ''} removed")
            return 0
        if args.user is None:
            summaries = await mailboxes.summaries()
            if args.json:
                for m in summaries:
                    print(json.dumps({"mailbox": m.mailbox, "messages": m.messages, "size": m.size,
                                      "oldest": int(m.oldest), "newest": int(m.newest)}))
            else:
                print(format_mailboxes(summaries), end="")
            return 0
        messages = await mailboxes.listing(args.user)
        if args.json:
            for n, msg in enumerate(messages, 1):
                print(json.dumps({"number": n, "uidl": msg.uid, "queue_id": msg.queue_id, "size": msg.size,
                                  "received": int(msg.received), "sender": msg.sender,
                                  "subject": msg.subject}, ensure_ascii=False))
        else:
            print(format_mailbox(mailbox_key(args.user), messages), end="")
        return 0


def _has_mailbox(config: Config, user: str) -> bool:
    """Whether ``user`` has a mailbox here (users file, catch-all, mydestination, postmaster)."""
    from mta.mailbox.users import MailboxUsers
    from mta.passwords import UsersFileUnavailable
    try:
        return MailboxUsers(config).exists(user)
    except UsersFileUnavailable:
        return True   # cannot tell: an empty purge is no error then


async def _mailbox_show(mailboxes: Mailboxes, user: str, wanted: str) -> int:
    """Postfix's postcat for a mailbox message: the stored bytes, with LF line ends."""
    messages = await mailboxes.messages(mailbox_key(user))
    if wanted.isdigit():
        number = int(wanted)
        chosen = messages[number - 1] if 1 <= number <= len(messages) else None
    else:
        chosen = next((m for m in messages if m.uid == wanted), None)
    data = None if chosen is None else await mailboxes.read(mailbox_key(user), chosen.id)
    if data is None:
        print(f"mta mailbox show: {mailbox_key(user)}: no message {wanted} "
              f"({len(messages)} message{'s' if len(messages) != 1 else ''})", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(data.replace(b"\r\n", b"\n"))
    sys.stdout.flush()
    return 0


def format_mailboxes(summaries: Sequence[MailboxSummary]) -> str:
    if not summaries:
        return "No mail in any mailbox\n"
    width = max(len("Mailbox"), *(len(m.mailbox) for m in summaries))
    lines = [f"{'Mailbox':<{width}} Messages     Size Newest"]
    lines += [f"{m.mailbox:<{width}} {m.messages:>8} {m.size:>8} {when(m.newest)}" for m in summaries]
    return "\n".join(lines) + "\n"


def format_mailbox(name: str, messages: Sequence[MessageSummary]) -> str:
    if not messages:
        return f"{name}: no messages\n"
    lines = [f"{name}: {len(messages)} message{'s' if len(messages) != 1 else ''},"
             f" {sum(m.size for m in messages)} octets",
             f"{'#':>4}  {'UIDL':<18} {'Size':>8}  {'Received':<25}  From / Subject"]
    for n, m in enumerate(messages, 1):
        lines.append(f"{n:>4}  {m.uid:<18} {m.size:>8}  {when(m.received):<25}  <{m.sender}> {m.subject}")
    return "\n".join(lines) + "\n"

