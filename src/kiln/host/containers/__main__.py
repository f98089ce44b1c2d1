"""`python3 -m kiln.host.containers run KIND:NAME | bootstrap | sync [KIND...] | boot-sync`."""

from kiln.host.containers.manager import main

raise SystemExit(main())
