"""The render cache: the last rendered configuration files, kept on PRIVATE.

Every apply mirrors what it writes (or removes) under /var/lib/kiln/rendered/<path> and
records a digest of what the files were rendered from: the live settings and
/etc/os-release (whose BUILD_ID covers the image's templates and code). The initramfs copies
the mirrored /etc files into the new /etc before systemd starts, so services start with
their configuration; the boot's applier then compares digests and, when nothing changed,
skips rendering and restarts altogether (no Jinja2 import, no service restarts).

Only paths listed in the image's /usr/share/kiln/rendered-paths (from the variant's
configuration files, fixed at build time on the verified root) are restored by the
initramfs: a tampered PRIVATE cannot plant other files in /etc.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kiln.core.fs import atomic_write

CACHE = Path("/var/lib/kiln/rendered")
MANIFEST = "manifest.json"
PATHS_LIST = Path("/usr/share/kiln/rendered-paths")


def digest(settings: dict[str, Any], os_release: bytes) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\0" + os_release)
    return h.hexdigest()


class RenderCache:
    def __init__(self, root: Path = CACHE) -> None:
        self.root = root

    def _mirror(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def wrote(self, path: str, data: bytes, mode: int) -> None:
        target = self._mirror(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data, mode=mode)

    def removed(self, path: str) -> None:
        self._mirror(path).unlink(missing_ok=True)

    def manifest(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.root / MANIFEST).read_bytes())
            return data
        except (FileNotFoundError, ValueError):
            return {}

    def record(self, current: str, files: dict[str, str]) -> None:
        """After an apply: the digest the files now match, and each file's content hash."""
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {"digest": current, "files": files}
        atomic_write(self.root / MANIFEST, json.dumps(doc, sort_keys=True, indent=1).encode(), mode=0o640)

    def forget(self) -> None:
        """Invalidate (before a full render): a crash half-way must not look current."""
        (self.root / MANIFEST).unlink(missing_ok=True)

    def is_current(self, current: str, root: Path = Path("/")) -> bool:
        """True when the cache matches `current` and every file is in place with its content."""
        m = self.manifest()
        if m.get("digest") != current:
            return False
        for path, sha in m.get("files", {}).items():
            live = root / path.lstrip("/")
            try:
                if hashlib.sha256(live.read_bytes()).hexdigest() != sha:
                    return False
            except FileNotFoundError:
                if sha:  # "" marks a file that must be absent
                    return False
            else:
                if not sha:
                    return False
        return True


def file_hash(data: bytes | None) -> str:
    return "" if data is None else hashlib.sha256(data).hexdigest()


def os_release_bytes(root: Path = Path("/")) -> bytes:
    try:
        return (root / "etc/os-release").read_bytes()
    except FileNotFoundError:
        return b""

