"""storewolf: make sure the datastore exists and holds this image's defaults (every boot).

Creates the datastore on first boot, drops pending transactions left from the last boot
(they do not outlive one), installs this image's definitions (metadata, services,
configuration files) and puts every default setting that is not live yet into the launch
transaction. Live values are never overwritten: what a user set stays set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kiln.core.fs import atomic_write
from kiln.host.datastore import LAUNCH_TX, Datastore
from kiln.host.settings.keys import flatten, get_path, unflatten

DEFAULTS = Path("/usr/share/kiln/defaults.json")


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


def run(store_root: Path, defaults_path: Path, version: str) -> Datastore:
    store = Datastore.create(store_root, version)
    store.remove_stale_temporaries()
    store.discard_all()
    raw = defaults_path.read_bytes()
    doc = json.loads(raw)
    # Definitions change only with the image: skip the model (msgspec) when they are current.
    marker = store.version_dir / "live" / "definitions.source"
    digest = hashlib.sha256(raw).hexdigest()
    if not marker.exists() or marker.read_text() != digest:
        from kiln.host.settings import definitions

        store.set_definitions(definitions.from_defaults(doc))
        atomic_write(marker, digest.encode(), mode=0o640)
    missing = missing_defaults(doc.get("settings", {}), store.live())
    if missing:
        store.patch(missing, LAUNCH_TX)
    return store


def main() -> int:
    from kiln.host.osinfo import os_release

    run(Path("/var/lib/kiln/datastore"), DEFAULTS, os_release().get("version_id", "0"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
