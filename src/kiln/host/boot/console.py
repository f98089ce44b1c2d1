"""Messages for the operator on the console (the serial log), not only the journal.

A serial getty may hang up /dev/ttyS0 users; /dev/console always reaches the log.
"""

from __future__ import annotations

import sys


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    try:
        with open("/dev/console", "w") as console:
            print(message, file=console, flush=True)
    except OSError:
        pass
