"""`python3 -m kiln.host.cli` is the host's `kiln` command."""

from kiln.host.cli import main

raise SystemExit(main())
