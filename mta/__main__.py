"""`python -m mta` works like the `mta` command."""

from mta.entry import main

raise SystemExit(main())
