"""settings-applier: commit the launch transaction, render every file, restart what reads them.

The settings pipeline runs beside the rest of the boot rather than in front of it (a cold
Python start under emulation would otherwise hold up every unit), so a service may already
be running with its packaged configuration: the restart commands use try-restart (a unit
not started yet is left to start with the rendered file) or apply the change directly.

On most boots nothing changed: the initramfs restored the files rendered last time (the
render cache), and when their digest matches the live settings and this image, there is
nothing to render or restart.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.host.boot.console import say
from kiln.host.datastore import LAUNCH_TX, Datastore, NothingPending
from kiln.host.render.cache import RenderCache, digest, os_release_bytes

if TYPE_CHECKING:
    from kiln.host.render.apply import ApplyReport, Restart
    from kiln.host.render.templates import Templates


def run(
    store: Datastore,
    *,
    root: Path = Path("/"),
    cache: RenderCache | None = None,
    templates: Templates | None = None,
    restart: Restart = True,
) -> ApplyReport | None:
    """Commit and render; None when the restored files are already current."""
    cache = cache or RenderCache()
    with contextlib.suppress(NothingPending):
        store.commit(LAUNCH_TX)
    if cache.is_current(digest(store.live(), os_release_bytes(root)), root):
        return None
    from kiln.host.render.apply import apply  # Jinja2 and the subprocess gateway: only now

    return apply(store, None, root=root, cache=cache, templates=templates, restart=restart, only_changed=True)


def main() -> int:
    report = run(Datastore())
    for problem in [*report.errors, *report.failed_restarts] if report else []:
        say(f"kiln: {problem}")
    return 1 if report and report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
