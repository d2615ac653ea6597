"""`mta passwd`: add, change or delete one user of a users file (auth.users_file or
mailboxes.users_file); mta/passwords.py reads and writes the file. Needs no config."""

from __future__ import annotations

import argparse
import getpass
import sys

from mta.passwords import delete_user, set_password


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    passwd = sub.add_parser("passwd", parents=[common], help="add, change or delete a user in a users file",
                            description="Set USER's password in FILE (read from stdin, or prompted for on a\n"
                                        "terminal), stored as an scrypt hash; the file is written with mode\n"
                                        "0600. The daemon reads the file again when it changes.",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    passwd.add_argument("--users-file", required=True, metavar="FILE",
                        help="auth.users_file or mailboxes.users_file; its directory must exist")
    passwd.add_argument("--delete", action="store_true", help="remove USER from the file instead")
    passwd.add_argument("user", metavar="USER", help="a user name (for mailboxes, the full address)")


def run(args: argparse.Namespace) -> int:
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

