"""Messages for the operator on the console (the serial log), not only the journal.

A serial getty may hang up /dev/ttyS0 users; /dev/console always reaches the log.
"""

from __future__ import annotations

import os
import sys


def say(message: str) -> None:
    """To stderr (the journal), and to the console when running as a systemd unit."""
    print(message, file=sys.stderr, flush=True)
    if "INVOCATION_ID" not in os.environ:  # a test or a shell: not this machine's console
        return
    try:
        with open("/dev/console", "w") as console:
            print(message, file=console, flush=True)
    except OSError:
        pass
