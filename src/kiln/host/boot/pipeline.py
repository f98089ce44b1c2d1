"""The boot's settings pipeline, in order, first thing in the host agent (kiln-agent.service):

    migrate       the datastore follows the OS version (after an update or a rollback)
    storewolf     datastore exists, this image's definitions, defaults into the launch tx
    user data     first boot only: DATA-partition file, then config drive (later wins)
    sundog        generated settings (seed, hostname) for keys still unset
    applier       commit the launch tx, render every file, restart what already runs
                  (not the agent's own parts: they start after this and read the files)

One process rather than a unit per step: each Python start costs 0.7 s under emulation,
more while the rest of the boot competes for the CPU, and the steps are strictly
sequential anyway. Each step is still its own module (`python3 -m kiln.host.boot.<step>`)
and its time is logged and kept in /run/kiln/boot-settings.json.
"""

from __future__ import annotations

import json
import shlex
import time
import traceback
from pathlib import Path
from typing import Any

from kiln.core.fs import atomic_write
from kiln.host.boot import applier, storewolf, sundog
from kiln.host.boot.console import say
from kiln.host.datastore import DEFAULT_ROOT, Datastore
from kiln.host.osinfo import os_release
from kiln.host.update.status import Paths

USER_DATA_MARKER = Path("/var/lib/kiln/user-data/early.json")  # kiln.host.boot.userdata.STATE

TIMINGS = Path("/run/kiln/boot-settings.json")
AGENT_UNIT = "kiln-agent.service"  # the unit this pipeline runs in


def run(store_root: Path = DEFAULT_ROOT, defaults: Path = storewolf.DEFAULTS) -> dict[str, Any]:
    """Run every step; a step that raises stops the pipeline (the host does not become ready)."""
    record: dict[str, Any] = {"steps": {}}
    start = time.monotonic()

    def timed(name: str, t0: float) -> None:
        record["steps"][name] = round(time.monotonic() - t0, 3)

    version = os_release().get("version_id", "0")
    t0 = time.monotonic()
    record["migrations"] = migrate_datastore(store_root, version)
    timed("migrate", t0)
    t0 = time.monotonic()
    store: Datastore = storewolf.run(store_root, defaults, version, storewolf.DEFINITIONS)
    timed("storewolf", t0)
    t0 = time.monotonic()
    if not USER_DATA_MARKER.exists():  # first boot: only then import the providers
        from kiln.host.boot import userdata

        record["user-data"] = userdata.run_phase("early", store)
    timed("user-data", t0)
    t0 = time.monotonic()
    record["generators"] = sundog.run(store)
    timed("sundog", t0)
    t0 = time.monotonic()
    report = applier.run(store, restart=not_the_agents)
    record["apply"] = report.to_json() if report else "current: files restored by the initramfs"
    timed("applier", t0)
    if record.get("user-data") is not None:  # committed now: first-boot user data is done
        from kiln.host.boot import userdata

        userdata.mark_done("early", record["user-data"])
    record["total"] = round(time.monotonic() - start, 3)
    return record


def not_the_agents(command: str) -> bool:
    """Restart commands the boot runs: not those that signal the agent. The agent runs this
    pipeline before it starts the parts they poke (the mTLS listener, the update daemon, the
    container supervisor), which read their rendered files when they start: a reload now
    would only make the agent do that twice, with a `systemctl` process each on the
    critical path."""
    return AGENT_UNIT not in shlex.split(command)


def migrate_datastore(store_root: Path, version: str, paths: Paths | None = None) -> list[str]:
    """Run the migrations between the datastore's version and this OS's (Bottlerocket's
    migrator, before storewolf). A failure raises: the boot must not become healthy."""
    from kiln.host.update import migrate
    from kiln.host.update.manifest import ManifestError, Version

    paths = paths or Paths()
    try:
        target = Version.parse(version, "os-release VERSION_ID")
    except ManifestError:
        return []  # not a Kiln release (a development host): datastores are not versioned
    try:
        root = paths.root.read_bytes()
    except FileNotFoundError:
        root = b""  # an image without a repository: nothing can have been cached
    plan = migrate.plan(store_root, target, paths.migrations, root)
    if plan is None:
        return []
    ran = migrate.apply(store_root, plan)
    say(f"kiln: datastore {plan.source} -> {plan.target}" + (f": ran {', '.join(ran)}" if ran else ""))
    return ran


def boot(timings: Path = TIMINGS) -> str | None:
    """The boot's run: every step, its record in `timings`, problems on the console.
    Returns why the host cannot be healthy (the gate fails with it), or None."""
    try:
        record = run()
    except Exception as e:  # whatever broke, the gate must say it, not a traceback
        traceback.print_exc()
        return f"the settings pipeline failed: {e}"
    timings.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(timings, json.dumps(record, indent=1).encode() + b"\n")
    steps = " ".join(f"{k}={v:.2f}s" for k, v in record["steps"].items())
    print(f"kiln: settings pipeline {record['total']:.2f}s ({steps})", flush=True)
    applied = record["apply"] if isinstance(record["apply"], dict) else {}
    for failed in applied.get("failed_restarts", []):  # a bad value must not block every boot
        say(f"kiln: settings applied, but {failed}")
    for error in applied.get("errors", []):  # an image whose files do not render is not healthy
        say(f"kiln: {error}")
    return problem(record)


def problem(record: dict[str, Any]) -> str | None:
    """Why a recorded run leaves the host unhealthy (a file that did not render), or None."""
    applied = record.get("apply")
    errors = (applied.get("errors") if isinstance(applied, dict) else None) or []
    return f"settings did not render: {errors[0]}" if errors else None


def main() -> int:
    return 1 if boot() else 0


if __name__ == "__main__":
    raise SystemExit(main())
