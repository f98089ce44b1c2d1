"""`python3 -m kiln.host.containers supervise | bootstrap`."""

import signal
import sys

if sys.argv[1:] == ["supervise"]:
    # A reload (SIGHUP) while the imports run would end the process (the default action):
    # ignore it until the supervisor's own handler is in place. It loses nothing: the
    # supervisor reads the settings after that, and the change was committed before the reload.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from kiln.host.containers.supervise import main
else:
    from kiln.host.containers.manager import main

raise SystemExit(main())
