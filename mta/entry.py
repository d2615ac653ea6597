"""The `mta` command's entry point: `mta sendmail …` goes to sendmail(1)'s own
option parser (mta/sendmail.py), everything else to the argparse CLI (mta/cli/).

Kept apart from both so that neither imports the other for this dispatch:
sendmail's -bp and -q run `mta queue list|flush` through mta.cli, one way only.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["sendmail"]:
        from mta.sendmail import main as sendmail_main
        return sendmail_main(args[1:])
    from mta.cli import main as cli_main
    return cli_main(args)
