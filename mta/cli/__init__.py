"""The `mta` command: serve, check-config, queue …, mailbox …, passwd.

Every subcommand takes ``--config F`` anywhere on its line, else $MTA_CONFIG,
else the built-in defaults. Problems are one line on stderr and exit status 2.

Here: ``main()`` (the console script, ``python -m mta``, and the delivery
process that mta/daemon/delivery_process.py starts) parses the line, runs the command and turns
the errors any command can meet into their one line and exit status. Each group
of commands is a module with its options (``add_…parser``) and its code:
daemon.py (serve, check-config, deliver), queue.py (`mta queue …`), mailbox.py
(`mta mailbox …`), passwd.py; common.py is what queue and mailbox share.
`mta sendmail` is mta/sendmail.py, with sendmail(1)'s own option syntax.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import mta
from mta.cli import daemon, mailbox, passwd, queue
from mta.cli.common import EXIT_USAGE, NoQueue
from mta.config import Config, load_config
from mta.errors import RECOVERY_HINT, ConfigError, QueueDamagedError, StartupError, StoreError


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
    # In the order `mta --help` lists them.
    daemon.add_serve_parser(sub, common)
    daemon.add_check_config_parser(sub, common)
    # Parsed by mta/sendmail.py with sendmail(1)'s own option syntax (main() hands it over first).
    sub.add_parser("sendmail", add_help=False,
                   help="submit a message as sendmail(1) does: mta sendmail [-t] [-i] [-f sender] rcpt... "
                        "(also -bs, -bp, -q)")
    daemon.add_deliver_parser(sub, common)
    queue.add_parser(sub, common)
    mailbox.add_parser(sub, common)
    passwd.add_parser(sub, common)
    return parser


def _load(args: argparse.Namespace) -> tuple[Config, str | None]:
    path = getattr(args, "config", None) or os.environ.get("MTA_CONFIG") or None
    return load_config(path), path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "queue" and args.queue_command == "delete" and bool(args.ids) == bool(args.all):
        parser.error("queue delete: give message ids or --all (not both)")
    try:
        if args.command == "passwd":
            return passwd.run(args)
        config, path = _load(args)
        return _run(args, config, path)
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
    except NoQueue as exc:
        print(exc, file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `mta queue list | head`: the reader has gone; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, config: Config, path: str | None) -> int:
    if args.command == "check-config":
        return daemon.check_config(config)
    if args.command == "serve":
        return daemon.serve(config, path, args.log_level)
    if args.command == "deliver":
        return daemon.deliver(args, config, path)
    if args.command == "queue":
        return queue.run(args, config)
    if args.command == "mailbox":
        return mailbox.run(args, config)
    return EXIT_USAGE   # `mta -c F sendmail …`: sendmail is handed over only as the first word
