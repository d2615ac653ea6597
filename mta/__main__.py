"""`python -m mta` works like the `mta` command."""

from mta.cli import main

raise SystemExit(main())
