"""sundog: settings that are computed on the host (a random update seed, the hostname).

Each generator is a command in the metadata (`setting-generator`). It prints the value as
JSON; exit 2 means "nothing to set", any other failure or a timeout is reported and that
setting stays unset. A key that already has a value (live, or pending from defaults or
user data) is never generated again, so user choices and earlier generations win.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.boot.console import say
from kiln.host.datastore import LAUNCH_TX, Datastore
from kiln.host.settings.keys import has_path, merge, parse_key, set_path

TIMEOUT = 60.0


def generate(command: str, timeout: float = TIMEOUT) -> Any:
    """Run one generator; its JSON value, or None when it says skip (exit 2). Raises on failure."""
    from kiln.core import run as gateway

    proc = gateway.run(shlex.split(command), timeout=timeout, check=False)
    if proc.returncode == 2:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    return json.loads(proc.stdout)


def run(store: Datastore, timeout: float = TIMEOUT) -> dict[str, str]:
    report: dict[str, str] = {}
    current = merge(store.live(), store.pending(LAUNCH_TX))
    generators: dict[str, str] = store.raw_definitions().get("setting-generators", {})
    for key, command in sorted(generators.items()):
        path = parse_key(key)[1:]  # drop the leading `settings`
        if has_path(current, path):
            report[key] = "populated"
            continue
        try:
            value = generate(command, timeout)
            if value is None:
                report[key] = "skipped"
                continue
            patch: dict[str, Any] = {}
            set_path(patch, path, value)
            store.patch(patch, LAUNCH_TX)
            report[key] = "generated"
        except (ValueError, RuntimeError, KilnError) as e:  # ValueError covers InvalidSettings
            report[key] = f"failed: {e}"
            say(f"kiln: setting generator for {key} failed: {e}")
    return report


def main() -> int:
    run(Datastore())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
