"""One simulated host as its own process, to be SIGKILLed while it holds a reboot slot.

    python -m tests.fleet_agent URL GROUP ID STATE_FILE

Runs the update daemon's state machine against the FleetLock server at URL; its reboot
never returns (the host is "mid-reboot"), and it prints `rebooting` once it got there.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from tests.fleet_helpers import SimHost, updater


class HangingHost(SimHost):
    def reboot(self) -> None:
        print("rebooting", flush=True)
        threading.Event().wait()  # until SIGKILL


def main() -> int:
    url, group, ident, state = sys.argv[1:5]
    host = HangingHost(updates={"strategy": "fleet-lock", "check-interval": "1s",
                                "fleet-lock": {"url": url, "group": group}})
    u = updater(host, Path(state), ident, url)
    u.start()
    for _ in range(600):
        u.step()
        threading.Event().wait(0.2)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
