"""`mta queue …`: list, show, hold, release, flush, requeue and delete queued mail,
and check or repair a damaged queue file.

They work on the daemon's queue file while the daemon runs (WAL mode: readers
never wait; each change is one short write transaction). The daemon looks at
the queue at least once a second, so a flush, release or requeue takes effect
within a second. Queue commands exit 1 when the queue file is missing or any
given id names no message (the other ids are still processed); ids are
case-insensitive. Listings are in Postfix's mailq and postqueue -j shapes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Protocol

from mta.cli import transfer
from mta.cli.common import EXIT_USAGE, NoQueue, opened_queue, require_queue, when
from mta.config import Config
from mta.errors import RECOVERY_HINT, damage_reason
from mta.message import header_bounds
from mta.store.api import AdminResult, MessageDetail, QueueAdmin, QueueEntry

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
  export    write the whole queue and the lab mailboxes to a file (stop mta first)
  import    add the queue and mailboxes of an exported file to this queue
"""


class _AddAction(Protocol):
    def __call__(self, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser: ...


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    queue = sub.add_parser("queue", parents=[common], help="inspect and manage the mail queue",
                           epilog=_QUEUE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")

    def action(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return qsub.add_parser(name, parents=[common], help=help, description=description or help,
                               formatter_class=argparse.RawDescriptionHelpFormatter)

    # In the order `mta queue --help` lists them.
    _add_reading_actions(action)
    _add_changing_actions(action)
    _add_file_actions(action)


def _add_reading_actions(action: _AddAction) -> None:
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


def _add_changing_actions(action: _AddAction) -> None:
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


def _add_file_actions(action: _AddAction) -> None:
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
    export = action("export", "write the queue and the lab mailboxes to a file (stop mta first)",
                    "Write every queued message (envelope, each recipient's state, attempts and next\n"
                    "attempt, history, bytes) and every lab mailbox copy (with its inbox read flag and\n"
                    "tags) of the configured queue (queue.backend) to FILE, one JSON object a line;\n"
                    "FILE is replaced only once whole; - is standard output. Refused while a daemon\n"
                    "serves the SQLite file or a node is connected to the PostgreSQL database: stop it\n"
                    "first. Recipients that were being delivered are written as due again. To move a\n"
                    "relay between backends: export with the old config, import with the new.")
    export.add_argument("file", metavar="FILE", help="the file to write (- for standard output)")
    imp = action("import", "add an exported queue and its mailboxes to this queue",
                 "Add the messages and mailbox copies of FILE (written by `mta queue export`, from\n"
                 "either backend) to the configured queue, a batch per transaction, beside a running\n"
                 "daemon or nodes, which deliver the mail as its recipients fall due. What is there\n"
                 "already (same queue id and arrival; same mailbox, queue id and arrival) is skipped,\n"
                 "so an interrupted import may be run again. A damaged or truncated FILE is refused at\n"
                 "its first bad line, after the whole messages before it. - is standard input.")
    imp.add_argument("file", metavar="FILE", help="a file written by `mta queue export` (- for standard input)")


def run(args: argparse.Namespace, config: Config) -> int:
    if args.queue_command == "repair":
        if config.queue.backend != "sqlite":
            print("mta: queue repair: only for a SQLite queue file (the database server keeps its own "
                  "files sound)", file=sys.stderr)
            return EXIT_USAGE
        return _repair(str(config.queue.path), args.output)
    if args.queue_command == "export":
        return transfer.export(config, args.file)
    if args.queue_command == "import":
        return transfer.import_(config, args.file)
    require_queue(config, "queue")
    return asyncio.run(_queue(args, config))


async def _queue(args: argparse.Namespace, config: Config) -> int:
    async with opened_queue(config) as store:
        command = args.queue_command
        admin = store.admin
        if command == "list":
            await _list(admin, args.json)
            return 0
        if command == "show":
            return await _show(admin, args.id, args.body)
        if command == "check":
            return await _check(admin, config.queue.location, config.queue.backend)
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


_json_str = json.encoder.encode_basestring  # '"…"', non-ASCII kept as is


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
        f"arrival:    {when(m.arrival)}",
        f"size:       {m.size}",
        f"client:     {m.client or '-'}",
        f"listener:   {m.listener or '-'}",
        f"helo:       {d.helo or '-'}",
        f"auth_user:  {d.auth_user or '-'}",
        "recipients:",
    ]
    for r in m.recipients:
        lines.append(f"  <{r.address}> {r.state} attempts={r.attempts} next_attempt={when(r.next_attempt)}")
        if r.last_error:
            lines.append(f"    last_error: {r.last_error}")
    lines.append("history:")
    for h in d.history:
        detail = f" {h.detail}" if h.detail else ""
        lines.append(f"  {when(h.time)} {f'<{h.recipient}>' if h.recipient else '-'} {h.event}{detail}")
    lines.append("message:" if d.data else "message: (empty)")
    return "\n".join(lines) + "\n"


async def _check(store: QueueAdmin, path: str, backend: str) -> int:
    """`mta queue check`: the store's findings on stdout, the verdict in one line."""
    problems = await store.check()
    if not problems:
        print(f"queue: {path}: ok")
        return 0
    for problem in problems:
        print(problem)
    if backend == "sqlite":
        print(f"queue: {damage_reason(path, problems[0])}; {RECOVERY_HINT}", file=sys.stderr)
    else:
        # The server keeps its files sound: rows that break mta's rules were written by
        # hand or by a bug, and there is no file to repair.
        print(f"queue: {path} has rows that break mta's rules: {problems[0]}", file=sys.stderr)
    return EXIT_USAGE


def _repair(path: str, output: str | None) -> int:
    """`mta queue repair`: mta/store/sqlite/repair.py does the copying (a SQLite file's own tool)."""
    from mta.store.sqlite.repair import RepairError, repair
    from mta.store.sqlite.schema import SCHEMA_VERSION, create_schema, schema_version

    target = output or f"{path}.repaired"
    if not os.path.exists(path):
        raise NoQueue(f"mta: queue: {path}: no queue database")
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

