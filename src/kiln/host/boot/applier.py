"""settings-applier: commit the launch transaction and render every configuration file.

Runs before the services that read those files start, so nothing needs a restart here;
the one exception is a setting that changes the kernel directly (the hostname), whose
restart command is cheap and safe at any time.
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
    report = apply(store, None, restart=False)
    from kiln.host.boot import hostname

    hostname.main()
    for problem in report.errors:
        say(f"kiln: {problem}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
