"""The release a rollout is about, for the fleet's view: its version and when each wave opens.

`kiln fleet serve --release PATH_OR_URL` names a repository's manifest.json (a file, a
repository directory holding one, or an http(s) URL). It is read for display only — hosts
verify what they install through TUF; the server never hands anything to a host — and
re-read at most once a minute, so a new release shows up without a restart.
"""

from __future__ import annotations

import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.update import waves as wavemath
from kiln.host.update.manifest import Manifest, ManifestError, format_time

RELOAD_AFTER = 60.0
MAX_MANIFEST = 4 << 20


def read_manifest(where: str) -> Manifest:
    """The manifest at `where`; KilnError naming it when it cannot be read or parsed."""
    try:
        if where.startswith(("http://", "https://")):
            with urllib.request.urlopen(where, timeout=10) as r:  # operator-given, display only
                data = r.read(MAX_MANIFEST)
        else:
            path = Path(where)
            if path.is_dir():
                found = sorted(path.glob("manifest.json")) + sorted(path.glob("targets/*manifest.json"))
                if not found:
                    raise KilnError(f"{where}: no manifest.json in this directory or its targets/")
                path = max(found, key=lambda p: p.stat().st_mtime)
            data = path.read_bytes()
        return Manifest.from_bytes(data)
    except (OSError, ManifestError, ValueError) as e:
        raise KilnError(f"release manifest {where}: {e}",
                        hint="--release takes a manifest.json, a repository directory or its URL") from None


def waves_view(waves: dict[int, datetime]) -> list[dict[str, Any]]:
    """Each wave: its first seed, its share of the fleet and when it opens."""
    seeds = sorted(waves)
    out = []
    for i, s in enumerate(seeds):
        end = seeds[i + 1] if i + 1 < len(seeds) else wavemath.MAX_SEED
        out.append({"seed": s, "share": round((end - s) / wavemath.MAX_SEED, 4), "opens": format_time(waves[s])})
    return out


def release_view(manifest: Manifest) -> dict[str, Any] | None:
    """The newest release in `manifest`, with its waves; None for an empty manifest."""
    if not manifest.updates:
        return None
    newest = max(manifest.updates, key=lambda u: u.version)
    return {"version": str(newest.version), "variant": newest.variant, "waves": waves_view(newest.waves)}


class ReleaseSource:
    """A manifest re-read at most every RELOAD_AFTER seconds; its last good view on errors."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._view: dict[str, Any] | None = None
        self._error: str | None = None
        self._read_at = float("-inf")
        self.view()  # a wrong path fails `kiln fleet serve` at start, not silently later

    def view(self) -> dict[str, Any] | None:
        if time.monotonic() - self._read_at >= RELOAD_AFTER:
            self._read_at = time.monotonic()
            try:
                self._view, self._error = release_view(read_manifest(self.where)), None
            except KilnError as e:
                if self._view is None and self._error is None:
                    raise
                self._error = str(e)
        if self._view is None:
            return None
        return {**self._view, "source": self.where, **({"error": self._error} if self._error else {})}
