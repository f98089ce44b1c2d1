"""storewolf: make sure the datastore exists and holds this image's defaults (every boot).

Creates the datastore on first boot, drops pending transactions left from the last boot
(they do not outlive one), installs this image's definitions (metadata, services,
configuration files) and puts every default setting that is not live yet into the launch
transaction. Live values are never overwritten: what a user set stays set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.host.datastore import LAUNCH_TX, Datastore
from kiln.host.settings.keys import flatten, get_path, unflatten

DEFAULTS = Path("/usr/share/kiln/defaults.json")
DEFINITIONS = Path("/usr/share/kiln/definitions.json")


def missing_defaults(defaults: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """The default leaves with no live value at or above their path."""

    def populated(path: tuple[str, ...]) -> bool:
        for i in range(1, len(path) + 1):
            try:
                node = get_path(live, path[:i])
            except LookupError:
                return False
            if not isinstance(node, dict):
                return True
        return True

    return unflatten((p, v) for p, v in flatten(defaults) if not populated(p))


def run(store_root: Path, defaults_path: Path, version: str, definitions_path: Path | None = None) -> Datastore:
    """`definitions_path`: the image's definitions.json, made at build time (None: derive them)."""
    store = Datastore.create(store_root, version)
    store.remove_stale_temporaries()
    store.discard_all()
    doc = json.loads(defaults_path.read_bytes())
    # The services and their restart commands come from the verified image, every boot:
    # PRIVATE is writable, and what it says a service runs must not be trusted over the image.
    if definitions_path is not None and definitions_path.exists():
        store.install_definitions(definitions_path.read_bytes())  # bytes: no model import
    else:
        from kiln.host.settings import definitions

        store.set_definitions(definitions.from_defaults(doc))
    missing = missing_defaults(doc.get("settings", {}), store.live())
    if missing:
        store.patch(missing, LAUNCH_TX)
    return store


def main() -> int:
    from kiln.host.osinfo import os_release

    run(Path("/var/lib/kiln/datastore"), DEFAULTS, os_release().get("version_id", "0"), DEFINITIONS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
