"""`mta serve`, `mta check-config` and `mta deliver`: run the daemon, check what it
would start with, and the delivery process that `mta serve` starts itself.

The daemon's own modules are imported only when one of these runs: the other
commands do not need them."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mta.config import Config
from mta.log import setup_logging
from mta.passwords import check_users_file

_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                     common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser("serve", parents=[common], help="run the daemon")
    serve.add_argument("--log-level", default="INFO", choices=_LOG_LEVELS,
                       help="log lines of this level and above, on stderr (default: INFO)")


def add_check_config_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                            common: argparse.ArgumentParser) -> None:
    sub.add_parser("check-config", parents=[common], help="validate the config file and exit")


def add_deliver_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                       common: argparse.ArgumentParser) -> None:
    # Started by `mta serve` (mta/daemon/delivery_process.py), not by hand: the delivery side in its own process.
    deliver = sub.add_parser("deliver", parents=[common],
                             help="the delivery process that `mta serve` starts itself (not run by hand)")
    deliver.add_argument("--channel-fd", type=int, required=True, metavar="FD",
                         help="the socket shared with `mta serve`: wake-ups in, metrics and faults out")
    deliver.add_argument("--parent-pid", type=int, default=0, metavar="PID",
                         help="the pid of `mta serve`: the delivery process stops when it is gone")
    deliver.add_argument("--own-sockets", default="[]", metavar="JSON",
                         help="the listeners' [host, port] pairs: a next hop among them is a mail loop")
    deliver.add_argument("--log-level", default="INFO", choices=_LOG_LEVELS,
                         help="log lines of this level and above (default: INFO)")
    # The main process's values of keys that need a restart (config.RESTART_ONLY).
    deliver.add_argument("--hostname", help="the hostname `mta serve` started with (kept until a restart)")
    deliver.add_argument("--queue-path", metavar="PATH", help="the queue file `mta serve` started with")


def check_config(config: Config) -> int:
    from mta.preflight import check, users_files
    check(config)   # what would keep `mta serve` from starting, not only the syntax
    # The users files' content too: one bad byte there made every mailbox unknown (issue 12).
    for key, users_file in users_files(config):
        check_users_file(key, users_file, warn=lambda text: print(f"warning: {text}", file=sys.stderr))
    if config.queue.backend == "postgresql":
        problem = _database_unreachable(config)
        if problem is not None:   # the file is still right: the database may be down for now
            print(f"warning: queue.dsn: {config.queue.location}: {problem}", file=sys.stderr)
    print(f"config: {config.source}: ok")
    return 0


def _database_unreachable(config: Config) -> str | None:
    """Why the shared database cannot be reached now (a quick connect), or None."""
    import asyncio

    import asyncpg  # preflight.check found the driver

    async def connect() -> None:
        conn = await asyncpg.connect(config.queue.dsn, timeout=3.0)
        await conn.close()

    try:
        asyncio.run(connect())
    except Exception as exc:   # anything the driver or the network says is the answer
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def serve(config: Config, path: str | None, log_level: str) -> int:
    setup_logging(log_level)
    from mta.daemon.main_process import serve as run_daemon
    return run_daemon(config, path, log_level)


def deliver(args: argparse.Namespace, config: Config, path: str | None) -> int:
    setup_logging(args.log_level)
    from mta.daemon.delivery_process import child_main
    from mta.daemon.runtime import SHUTDOWN_GRACE, event_loop_factory
    if args.hostname:
        config = dataclasses.replace(config, hostname=args.hostname)
    if args.queue_path:
        config = dataclasses.replace(config, queue=dataclasses.replace(config.queue, path=args.queue_path))
    return child_main(config, path, args.channel_fd, args.own_sockets, SHUTDOWN_GRACE,
                      event_loop_factory(quiet=True), args.parent_pid)
