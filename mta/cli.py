"""The `mta` command: serve, check-config, queue …, passwd.

Every subcommand takes ``--config F`` anywhere on its line, else $MTA_CONFIG,
else the built-in defaults. Problems are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence

from mta.config import Config, load_config
from mta.errors import ConfigError, StoreError
from mta.log import setup_logging
from mta.model import QueuedMessage
from mta.passwords import set_password
from mta.queue.store import QueueStore

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS on both levels: `mta --config F queue list` and `mta queue list --config F` both work.
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML config file (default: $MTA_CONFIG, else built-in defaults)")
    parser = argparse.ArgumentParser(prog="mta", parents=[common],
                                     description="A store-and-forward mail transfer agent.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the daemon")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    sub.add_parser("check-config", parents=[common], help="validate the config file and exit")

    queue = sub.add_parser("queue", parents=[common], help="inspect the mail queue")
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    qlist = qsub.add_parser("list", parents=[common], help="list queued mail (like mailq)")
    qlist.add_argument("--json", action="store_true", help="one JSON object per line, like postqueue -j")

    passwd = sub.add_parser("passwd", parents=[common], help="add or change a user in a users file")
    passwd.add_argument("--users-file", required=True, metavar="FILE")
    passwd.add_argument("user")
    return parser


def _load(args: argparse.Namespace) -> tuple[Config, str | None]:
    path = getattr(args, "config", None) or os.environ.get("MTA_CONFIG") or None
    return load_config(path), path


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "passwd":
            return _passwd(args)
        config, path = _load(args)
        if args.command == "check-config":
            print(f"config: {config.source}: ok")
            return 0
        if args.command == "serve":
            setup_logging(args.log_level)
            from mta.app import serve  # the daemon's imports are not needed by the other commands
            return serve(config, path)
        if args.command == "queue":
            return asyncio.run(_queue(args, config))
    except ConfigError as exc:
        print(f"config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"mta: queue: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _passwd(args: argparse.Namespace) -> int:
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


async def _queue(args: argparse.Namespace, config: Config) -> int:
    if not os.path.exists(config.queue.path):
        print(f"mta: queue: {config.queue.path}: no queue database (has the daemon run?)", file=sys.stderr)
        return 1
    store = QueueStore(config.queue.path)
    await store.open()
    try:
        messages = await store.list_messages()
    finally:
        await store.close()
    if args.json:
        for m in messages:
            print(json.dumps(_message_json(m), ensure_ascii=False))
    else:
        print(format_mailq(messages))
    return 0


def _message_json(m: QueuedMessage) -> dict[str, object]:
    # Field names follow `postqueue -j` where they mean the same thing.
    return {
        "queue_id": m.id,
        "arrival_time": int(m.arrival),
        "message_size": m.size,
        "sender": m.sender,
        "recipients": [
            {"address": r.address, "state": str(r.state), "attempts": r.attempts,
             "next_attempt": int(r.next_attempt) if r.next_attempt else None,
             **({"delay_reason": r.last_error} if r.last_error else {})}
            for r in m.recipients
        ],
    }


def format_mailq(messages: Sequence[QueuedMessage]) -> str:
    """Postfix mailq's layout: id, size, arrival, sender; then recipients with reasons."""
    if not messages:
        return "Mail queue is empty"
    lines = ["-Queue ID-    --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    total = 0
    for m in messages:
        total += m.size
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(m.arrival))
        lines.append(f"{m.id:<13} {m.size:>8} {arrival}  {m.sender or 'MAILER-DAEMON'}")
        for r in m.recipients:
            if r.last_error:
                lines.append(f"{'':<45}({r.last_error})")
            lines.append(f"{'':<45}{r.address} [{r.state}]")
        lines.append("")
    kb = (total + 1023) // 1024
    lines.append(f"-- {kb} Kbytes in {len(messages)} Request{'s' if len(messages) != 1 else ''}.")
    return "\n".join(lines)
