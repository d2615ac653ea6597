"""The `mta` command: serve, check-config, queue …, mailbox …, passwd.

Every subcommand takes ``--config F`` anywhere on its line, else $MTA_CONFIG,
else the built-in defaults. Problems are one line on stderr and exit status 2.

``mta queue …`` works on the daemon's queue file while the daemon runs (WAL
mode: readers never wait; each change is one short write transaction). The
daemon looks at the queue at least once a second, so a flush, release or
requeue takes effect within a second. Queue commands exit 1 when the queue
file is missing or any given id names no message (the other ids are still
processed); ids are case-insensitive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import mta
from mta.config import Config, load_config
from mta.errors import RECOVERY_HINT, ConfigError, QueueDamagedError, StartupError, StoreError, damage_reason
from mta.health import Health
from mta.log import setup_logging
from mta.message import header_bounds
from mta.passwords import check_users_file, delete_user, set_password
from mta.store.api import (
    AdminResult,
    Mailboxes,
    MailboxSummary,
    MessageDetail,
    MessageSummary,
    QueueAdmin,
    QueueEntry,
    Store,
    mailbox_key,
)
from mta.store.factory import make_store

EXIT_USAGE = 2

_QUEUE_HELP = """\
actions:
  list      pending mail, like mailq: `*` after the id marks a message due or being
            delivered (active), `!` one on hold; --json prints one object per line
  show      a message's envelope, per-recipient state, history and header section
  flush     make deferred recipients due now (all messages, or those given)
  hold      keep recipients from being delivered until released
  release   take recipients off hold; they are due now
  requeue   make queued, deferred and held recipients due now as fresh work
  delete    remove messages from the queue (recipients and history with them)
  check     look for damage in the queue file (PRAGMA integrity_check); exit 0 if sound, else 2
  repair    copy what can be read of a damaged queue file into a new file (stop mta first)
"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS on both levels: `mta --config F queue list` and `mta queue list --config F` both work.
    # -c as Postfix's commands take it (postqueue -c, postfix -c).
    common.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML config file (default: $MTA_CONFIG, else built-in defaults)")
    parser = argparse.ArgumentParser(prog="mta", parents=[common],
                                     description="A store-and-forward mail transfer agent.",
                                     epilog="`mta COMMAND --help` describes each command; man mta(8).")
    parser.add_argument("--version", action="version", version=f"mta {mta.__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the daemon")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="log lines of this level and above, on stderr (default: INFO)")

    sub.add_parser("check-config", parents=[common], help="validate the config file and exit")

    # Parsed by mta/sendmail.py with sendmail(1)'s own option syntax (main() hands it over first).
    sub.add_parser("sendmail", add_help=False,
                   help="submit a message as sendmail(1) does: mta sendmail [-t] [-i] [-f sender] rcpt... "
                        "(also -bs, -bp, -q)")

    # Started by `mta serve` (mta/worker.py), not by hand: the delivery side in its own process.
    deliver = sub.add_parser("deliver", parents=[common],
                             help="the delivery process that `mta serve` starts itself (not run by hand)")
    deliver.add_argument("--channel-fd", type=int, required=True, metavar="FD",
                         help="the socket shared with `mta serve`: wake-ups in, metrics and faults out")
    deliver.add_argument("--parent-pid", type=int, default=0, metavar="PID",
                         help="the pid of `mta serve`: the delivery process stops when it is gone")
    deliver.add_argument("--own-sockets", default="[]", metavar="JSON",
                         help="the listeners' [host, port] pairs: a next hop among them is a mail loop")
    deliver.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                         help="log lines of this level and above (default: INFO)")
    # The main process's values of keys that need a restart (config.RESTART_ONLY).
    deliver.add_argument("--hostname", help="the hostname `mta serve` started with (kept until a restart)")
    deliver.add_argument("--queue-path", metavar="PATH", help="the queue file `mta serve` started with")

    queue = sub.add_parser("queue", parents=[common], help="inspect and manage the mail queue",
                           epilog=_QUEUE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")

    def action(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return qsub.add_parser(name, parents=[common], help=help, description=description or help,
                               formatter_class=argparse.RawDescriptionHelpFormatter)

    qlist = action("list", "list pending mail (like mailq)",
                   "List messages with recipients still pending, oldest first, like Postfix mailq:\n"
                   "`*` after the queue id marks an active message (due or being delivered), `!` a\n"
                   "message on hold; each pending recipient with its state and last error.")
    qlist.add_argument("--json", action="store_true",
                       help="one JSON object per message and line, like postqueue -j")

    show = action("show", "show one message: envelope, recipients, history, headers")
    show.add_argument("id", metavar="ID", help="a queue id, as `mta queue list` shows it")
    show.add_argument("--body", action="store_true",
                      help="print the whole message, not only its header section")

    flush = action("flush", "make deferred recipients due now",
                   "Make the deferred recipients of the given messages (default: of all messages)\n"
                   "due now; the daemon tries them within a second. Held recipients stay held.")
    flush.add_argument("ids", nargs="*", metavar="ID", help="queue ids (default: every message)")

    hold = action("hold", "put messages on hold",
                  "Put the pending recipients of the given messages on hold: they are not\n"
                  "delivered, retried or expired until released. A recipient being delivered\n"
                  "right now keeps the result of that attempt if it succeeds or fails for good.")
    hold.add_argument("ids", nargs="+", metavar="ID", help="queue ids, as `mta queue list` shows them")

    release = action("release", "take messages off hold",
                     "Release the held recipients of the given messages: they are due now.")
    release.add_argument("ids", nargs="+", metavar="ID", help="queue ids, as `mta queue list` shows them")

    requeue = action("requeue", "make messages due now as fresh work",
                     "Make the queued, deferred and held recipients of the given messages due now\n"
                     "as fresh work; the next hop is looked up again. Attempt counts are kept.\n"
                     "Recipients being delivered right now are left to that delivery.")
    requeue.add_argument("ids", nargs="+", metavar="ID", help="queue ids, as `mta queue list` shows them")

    delete = action("delete", "remove messages from the queue",
                    "Remove the given messages (or --all) with their recipients and history.\n"
                    "A message being delivered right now may still be delivered once by the\n"
                    "attempt in progress; it is not tried again.")
    delete.add_argument("ids", nargs="*", metavar="ID", help="queue ids (default: every message)")
    delete.add_argument("--all", action="store_true", help="delete every message in the queue")

    action("check", "check the queue file for damage",
           "Read every page of the queue file (SQLite's PRAGMA integrity_check) and print what\n"
           "is wrong; exit 0 if the file is sound, else 2. It runs beside the daemon, on the live\n"
           "file. README \"Recovering a damaged queue\" says what to do with a damaged one.")
    repair = action("repair", "copy what can be read of a damaged queue into a new file",
                    "Copy every message whose envelope, body and recipients can still be read, with its\n"
                    "history, and the lab mailboxes, from the damaged queue file into a new file\n"
                    "(default: the queue's path + .repaired); list the messages lost. The damaged file\n"
                    "is only read. Then stop mta, move the damaged file and its -wal and -shm aside and\n"
                    "put the new file in its place (README \"Recovering a damaged queue\").")
    repair.add_argument("--output", metavar="FILE", help="the new file (must not exist)")

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

    passwd = sub.add_parser("passwd", parents=[common], help="add, change or delete a user in a users file",
                            description="Set USER's password in FILE (read from stdin, or prompted for on a\n"
                                        "terminal), stored as an scrypt hash; the file is written with mode\n"
                                        "0600. The daemon reads the file again when it changes.",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    passwd.add_argument("--users-file", required=True, metavar="FILE",
                        help="auth.users_file or mailboxes.users_file; its directory must exist")
    passwd.add_argument("--delete", action="store_true", help="remove USER from the file instead")
    passwd.add_argument("user", metavar="USER", help="a user name (for mailboxes, the full address)")
    return parser


def _load(args: argparse.Namespace) -> tuple[Config, str | None]:
    path = getattr(args, "config", None) or os.environ.get("MTA_CONFIG") or None
    return load_config(path), path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sendmail"]:   # sendmail(1)'s own option syntax, not argparse's
        from mta.sendmail import main as sendmail_main
        return sendmail_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "queue" and args.queue_command == "delete" and bool(args.ids) == bool(args.all):
        parser.error("queue delete: give message ids or --all (not both)")
    try:
        if args.command == "passwd":
            return _passwd(args)
        config, path = _load(args)
        if args.command == "check-config":
            from mta.preflight import check
            check(config)   # what would keep `mta serve` from starting, not only the syntax
            # The users files' content too: one bad byte there made every mailbox unknown (issue 12).
            for key, users_file in (("mailboxes.users_file", config.mailboxes.users_file),
                                    ("auth.users_file", config.auth.users_file)):
                check_users_file(key, users_file, warn=lambda text: print(f"warning: {text}", file=sys.stderr))
            print(f"config: {config.source}: ok")
            return 0
        if args.command == "serve":
            setup_logging(args.log_level)
            from mta.app import serve  # the daemon's imports are not needed by the other commands
            return serve(config, path, args.log_level)
        if args.command == "deliver":
            setup_logging(args.log_level)
            from mta.runtime import SHUTDOWN_GRACE, event_loop_factory
            from mta.worker import child_main
            if args.hostname:
                config = dataclasses.replace(config, hostname=args.hostname)
            if args.queue_path:
                config = dataclasses.replace(config, queue=dataclasses.replace(config.queue, path=args.queue_path))
            return child_main(config, path, args.channel_fd, args.own_sockets, SHUTDOWN_GRACE,
                              event_loop_factory(quiet=True), args.parent_pid)
        if args.command == "queue" and args.queue_command == "repair":
            return _repair(str(config.queue.path), args.output)
        if args.command == "queue":
            return asyncio.run(_queue(args, config))
        if args.command == "mailbox":
            return asyncio.run(_mailbox(args, config))
    except ConfigError as exc:
        print(f"config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:   # the config is valid; the system around it is not ready
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except QueueDamagedError as exc:
        # A file that cannot be opened at all (serve, queue …, mailbox …), or a damaged page
        # met while reading (queue list, show, mailbox …): one line, no traceback.
        print(f"queue: {exc}; {RECOVERY_HINT}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"mta: queue: {exc}", file=sys.stderr)
        return 1
    except _NoQueue as exc:
        print(exc, file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `mta queue list | head`: the reader has gone; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _passwd(args: argparse.Namespace) -> int:
    if args.delete:
        try:
            found = delete_user(args.users_file, args.user)
        except (ValueError, OSError) as exc:
            print(f"mta passwd: {exc}", file=sys.stderr)
            return 1
        if not found:
            print(f"mta passwd: {args.users_file}: no user {args.user}", file=sys.stderr)
            return 1
        return 0
    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            print("mta passwd: passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("mta passwd: empty password", file=sys.stderr)
        return 1
    try:
        set_password(args.users_file, args.user, password)
    except (ValueError, OSError) as exc:
        print(f"mta passwd: {exc}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- mailbox

class _NoQueue(Exception):
    """The queue file does not exist: a one-line error and exit status 1."""


@contextlib.asynccontextmanager
async def _opened_queue(config: Config, command: str) -> AsyncIterator[Store]:
    if not os.path.exists(config.queue.path):
        raise _NoQueue(f"mta: {command}: {config.queue.path}: no queue database (has the daemon run?)")
    store = make_store(config, role="admin", health=Health())
    # A command says what is wrong in its own one line (main()); Health's log line would repeat it.
    quiet = logging.getLogger("mta.health")
    hush = logging.Filter("nothing")   # passes only records of a logger named "nothing"
    quiet.addFilter(hush)
    try:
        await store.open()
        try:
            yield store
        finally:
            await store.close()
    finally:
        quiet.removeFilter(hush)


async def _mailbox(args: argparse.Namespace, config: Config) -> int:
    async with _opened_queue(config, "mailbox") as store:
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
    lines += [f"{m.mailbox:<{width}} {m.messages:>8} {m.size:>8} {_when(m.newest)}" for m in summaries]
    return "\n".join(lines) + "\n"


def format_mailbox(name: str, messages: Sequence[MessageSummary]) -> str:
    if not messages:
        return f"{name}: no messages\n"
    lines = [f"{name}: {len(messages)} message{'s' if len(messages) != 1 else ''},"
             f" {sum(m.size for m in messages)} octets",
             f"{'#':>4}  {'UIDL':<18} {'Size':>8}  {'Received':<25}  From / Subject"]
    for n, m in enumerate(messages, 1):
        lines.append(f"{n:>4}  {m.uid:<18} {m.size:>8}  {_when(m.received):<25}  <{m.sender}> {m.subject}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- queue

async def _queue(args: argparse.Namespace, config: Config) -> int:
    async with _opened_queue(config, "queue") as store:
        command = args.queue_command
        admin = store.admin
        if command == "list":
            await _list(admin, args.json)
            return 0
        if command == "show":
            return await _show(admin, args.id, args.body)
        if command == "check":
            return await _check(admin, config.queue.path)
        return await _admin(admin, command, args)


async def _list(store: QueueAdmin, as_json: bool) -> None:
    write = sys.stdout.write
    # aclosing: if writing fails (`mta queue list | head`), the query ends before the store closes.
    async with contextlib.aclosing(store.iter_queue()) as batches:
        if as_json:
            async for entries in batches:
                write("".join([entry_json(e) + "\n" for e in entries]))
            return
        async for text in format_mailq(batches):
            write(text)


_json_str = json.encoder.encode_basestring  # type: ignore[attr-defined]  # '"…"', non-ASCII kept as is


def entry_json(e: QueueEntry) -> str:
    """One `postqueue -j`-like line: queue_name, queue_id, arrival_time, message_size,
    sender, recipients[{address, state, attempts, next_attempt, delay_reason?}].

    Built by hand (strings through json's own escaper): json.dumps of a dict per
    message would be most of the time of listing a large queue."""
    rcpts = []
    for address, state, attempts, next_attempt, last_error in e.recipients:
        reason = f', "delay_reason": {_json_str(last_error)}' if last_error else ""
        when = int(next_attempt) if next_attempt else "null"
        rcpts.append(f'{{"address": {_json_str(address)}, "state": "{state}", "attempts": {attempts},'
                     f' "next_attempt": {when}{reason}}}')
    return (f'{{"queue_name": "{e.queue_name}", "queue_id": {_json_str(e.id)},'
            f' "arrival_time": {int(e.arrival)}, "message_size": {e.size}, "sender": {_json_str(e.sender)},'
            f' "recipients": [{", ".join(rcpts)}]}}')


_MARKS = {"active": "*", "hold": "!", "deferred": ""}
MAILQ_HEADER = "-Queue ID-    --Size-- ----Arrival Time---- -Sender/Recipient-------"


async def format_mailq(batches: AsyncIterator[list[QueueEntry]]) -> AsyncIterator[str]:
    """Postfix mailq's layout, streamed: queue id (`*` active, `!` on hold), size,
    arrival, sender; then each pending recipient, after its last error if it has one."""
    total = count = 0
    pad = " " * 45
    localtime, strftime = time.localtime, time.strftime
    async for entries in batches:
        lines = [] if count else [MAILQ_HEADER]
        for e in entries:
            count += 1
            total += e.size
            arrival = strftime("%a %b %d %H:%M:%S", localtime(e.arrival))
            sender = e.sender or "MAILER-DAEMON"
            lines.append(f"{e.id + _MARKS[e.queue_name]:<13} {e.size:>8} {arrival}  {sender}")
            for address, state, _, _, last_error in e.recipients:
                if last_error:
                    lines.append(f"{pad}({last_error})")
                lines.append(f"{pad}{address} [{state}]")
            lines.append("")
        yield "\n".join(lines) + "\n"
    if not count:
        yield "Mail queue is empty\n"
    else:
        kb = (total + 1023) // 1024
        yield f"-- {kb} Kbytes in {count} Request{'s' if count != 1 else ''}.\n"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t))


async def _show(store: QueueAdmin, given: str, body: bool) -> int:
    detail = await store.message_detail(given.upper())
    if detail is None:
        print(f"mta: queue: {given}: no such message", file=sys.stderr)
        return 1
    sys.stdout.write(format_show(detail))
    sys.stdout.flush()
    data = detail.data if body else header_section(detail.data)
    sys.stdout.buffer.write(data.replace(b"\r\n", b"\n"))
    sys.stdout.buffer.flush()
    return 0


def header_section(data: bytes) -> bytes:
    """The message's header lines, up to and without the empty line that ends them."""
    end = header_bounds(data)[0]
    if end < len(data):
        return data[:end]
    return data if data.endswith(b"\n") or not data else data + b"\n"


def format_show(d: MessageDetail) -> str:
    """Everything but the message content, which follows it (header section or --body)."""
    m = d.message
    lines = [
        f"queue_id:   {m.id}",
        f"sender:     <{m.sender}>",
        f"arrival:    {_when(m.arrival)}",
        f"size:       {m.size}",
        f"client:     {m.client or '-'}",
        f"listener:   {m.listener or '-'}",
        f"helo:       {d.helo or '-'}",
        f"auth_user:  {d.auth_user or '-'}",
        "recipients:",
    ]
    for r in m.recipients:
        lines.append(f"  <{r.address}> {r.state} attempts={r.attempts} next_attempt={_when(r.next_attempt)}")
        if r.last_error:
            lines.append(f"    last_error: {r.last_error}")
    lines.append("history:")
    for h in d.history:
        detail = f" {h.detail}" if h.detail else ""
        lines.append(f"  {_when(h.time)} {f'<{h.recipient}>' if h.recipient else '-'} {h.event}{detail}")
    lines.append("message:" if d.data else "message: (empty)")
    return "\n".join(lines) + "\n"


async def _check(store: QueueAdmin, path: str) -> int:
    """`mta queue check`: SQLite's findings on stdout, the verdict in one line."""
    problems = await store.check()
    if not problems:
        print(f"queue: {path}: ok")
        return 0
    for problem in problems:
        print(problem)
    print(f"queue: {damage_reason(path, problems[0])}; {RECOVERY_HINT}", file=sys.stderr)
    return EXIT_USAGE


def _repair(path: str, output: str | None) -> int:
    """`mta queue repair`: mta/store/sqlite/repair.py does the copying (a SQLite file's own tool)."""
    from mta.store.sqlite.repair import RepairError, repair
    from mta.store.sqlite.schema import SCHEMA_VERSION, create_schema, schema_version

    target = output or f"{path}.repaired"
    if not os.path.exists(path):
        raise _NoQueue(f"mta: queue: {path}: no queue database")
    if os.path.exists(target):
        print(f"queue: {target} exists already; remove it or give --output", file=sys.stderr)
        return EXIT_USAGE
    version = schema_version(path)
    if version is None:
        version = SCHEMA_VERSION   # the header is unreadable: repair() says so
    if version != SCHEMA_VERSION:
        print(f"queue: {path} has schema version {version}, this mta has {SCHEMA_VERSION}: repair it with"
              " the mta that wrote it", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = repair(Path(path), Path(target), create_schema)
    except RepairError as exc:
        print(f"queue: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"queue: copied {report.messages} message{_s(report.messages)} ({report.recipients}"
          f" recipient{_s(report.recipients)}, {report.history} history row{_s(report.history)}) and"
          f" {report.mailbox_messages} mailbox message{_s(report.mailbox_messages)} from {path} to {target}")
    if report.lost:
        print(f"queue: lost {len(report.lost)} message{_s(len(report.lost))} (tell their senders):")
        for line in report.lost:
            print(f"  {line}")
    if report.skipped_ranges:
        print(f"queue: stepped over {report.skipped_ranges} unreadable part{_s(report.skipped_ranges)}"
              " of the file: rows there are lost")
    print(f"queue: to use it: stop mta; move {path}, {path}-wal and {path}-shm aside;"
          f" rename {target} to {path}; start mta")
    return 0


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"by {user}"


_DONE = {"hold": "held", "release": "released", "flush": "flushed", "requeue": "requeued"}


async def _admin(store: QueueAdmin, command: str, args: argparse.Namespace) -> int:
    given: list[str] = list(args.ids)
    ids: list[str] | None = [i.upper() for i in given] or None
    now = time.time()
    detail = _operator()
    result: AdminResult
    if command == "hold":
        result = await store.hold(ids or [], now, detail=detail)
    elif command == "release":
        result = await store.release(ids or [], now, detail=detail)
    elif command == "flush":
        result = await store.flush(ids, now, detail=detail)
    elif command == "requeue":
        result = await store.requeue(ids or [], now, detail=detail)
    elif command == "delete":
        result = await store.delete(None if args.all else ids)
    else:  # pragma: no cover - argparse allows nothing else
        return EXIT_USAGE
    if ids is None:  # flush of every message, delete --all
        n = len(result.found)
        if command == "delete":
            print(f"deleted {n} message{_s(n)}")
        else:
            r = sum(result.changed.values())
            print(f"flushed {r} recipient{_s(r)} in {n} message{_s(n)}")
        return 0
    return _report(command, given, result)


def _report(command: str, given: Iterable[str], result: AdminResult) -> int:
    found = set(result.found)
    status = 0
    seen: set[str] = set()
    for raw in given:
        queue_id = raw.upper()
        if queue_id in seen:
            continue
        seen.add(queue_id)
        if queue_id not in found:
            print(f"mta: queue: {raw}: no such message", file=sys.stderr)
            status = 1
        elif command == "delete":
            print(f"{queue_id}: deleted")
        else:
            n = result.changed[queue_id]
            print(f"{queue_id}: {_DONE[command]} {n} recipient{_s(n)}")
    return status


def _s(n: int) -> str:
    return "" if n == 1 else "s"

