"""settings-applier: commit the launch transaction, render every file, restart what reads them.

The settings pipeline runs beside the rest of the boot rather than in front of it (a cold
Python start under emulation would otherwise hold up every unit), so a service may already
be running with its packaged configuration: the restart commands use try-restart (a unit
not started yet is left to start with the rendered file) or apply the change directly.
"""

from __future__ import annotations

import contextlib

from kiln.host.boot.console import say
from kiln.host.datastore import LAUNCH_TX, Datastore, NothingPending
from kiln.host.render.apply import apply


def main() -> int:
    store = Datastore()
    with contextlib.suppress(NothingPending):
        store.commit(LAUNCH_TX)
    report = apply(store, None)
    for problem in report.errors:
        say(f"kiln: {problem}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
