"""`kiln repo check`: look at a served repository the way a host will (Bottlerocket's
`tuftool download` / `updog --check`).

A python-tuf `Updater` in a temporary directory, trusting only the given root.json, walks
root -> timestamp -> snapshot -> targets, downloads `manifest.json`, parses it with the
host's own parser and downloads every target it names, checking length and sha256. Any
failure becomes a `KilnError` carrying the TUF error's class name and message.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.core.progress import Progress, human_size
from kiln.host.update.manifest import Manifest, ManifestError, format_time
from kiln.repo.metadata import MANIFEST_TARGET, ROLES


@dataclass(frozen=True)
class Checked:
    metadata_url: str
    targets_url: str
    roles: dict[str, tuple[int, datetime]]
    manifest: Manifest
    targets: list[tuple[str, int]]  # every target downloaded and verified, with its length

    def to_json(self) -> dict[str, Any]:
        return {
            "metadata_url": self.metadata_url,
            "targets_url": self.targets_url,
            "roles": {r: {"version": v, "expires": format_time(e)} for r, (v, e) in self.roles.items()},
            "versions": [
                {"variant": u.variant, "arch": u.arch, "version": str(u.version), "max_version": str(u.max_version)}
                for u in self.manifest.updates
            ],
            "migrations": self.manifest.to_json()["migrations"],
            "targets": [{"name": n, "length": size} for n, size in self.targets],
        }


def _urls(url: str, metadata_url: str | None, targets_url: str | None) -> tuple[str, str]:
    base = url.rstrip("/")
    return (metadata_url or f"{base}/metadata/", targets_url or f"{base}/targets/")


def _tuf_error(e: BaseException, phase: str) -> KilnError:
    message = str(e) or str(e.__cause__ or "") or "no details"
    return KilnError(f"{type(e).__name__}: {message} (while {phase})")


def check(
    url: str,
    root: Path,
    *,
    metadata_url: str | None = None,
    targets_url: str | None = None,
    progress: Progress | None = None,
) -> Checked:
    import urllib3
    from tuf.api.exceptions import DownloadError, RepositoryError
    from tuf.api.metadata import Metadata
    from tuf.ngclient import Updater

    progress = progress or Progress(quiet=True)
    md_url, tg_url = _urls(url, metadata_url, targets_url)
    try:
        bootstrap = Path(root).read_bytes()
    except OSError as e:
        raise KilnError(f"--root {root}: cannot read: {e.strerror}") from None
    with tempfile.TemporaryDirectory(prefix="kiln-repo-check-") as tmp:
        md_dir, tg_dir = Path(tmp, "metadata"), Path(tmp, "targets")
        md_dir.mkdir()
        tg_dir.mkdir()
        checked: list[tuple[str, int]] = []
        phase = f"loading --root {root}"
        try:
            updater = Updater(str(md_dir), md_url, str(tg_dir), tg_url, bootstrap=bootstrap)
            phase = f"refreshing metadata from {md_url}"
            with progress.step("metadata", md_url):
                updater.refresh()
            phase = f"downloading {MANIFEST_TARGET} from {tg_url}"
            info = updater.get_targetinfo(MANIFEST_TARGET)
            if info is None:
                raise KilnError(f"targets.json at {md_url} lists no {MANIFEST_TARGET}")
            manifest = Manifest.from_bytes(Path(updater.download_target(info)).read_bytes())
            checked.append((MANIFEST_TARGET, info.length))
            names = [i.target for u in manifest.updates for i in u.images.values()]
            names += [n for ms in manifest.migrations.values() for n in ms]
            for name in dict.fromkeys(names):
                info = updater.get_targetinfo(name)
                if info is None:
                    raise KilnError(f"{MANIFEST_TARGET} names target '{name}', which targets.json does not list")
                phase = f"downloading target {name} from {tg_url}"
                with progress.step("target", f"{name} ({human_size(info.length)})"):
                    path = Path(updater.download_target(info, str(tg_dir / "download")))
                    path.unlink()
                checked.append((name, info.length))
        except (RepositoryError, DownloadError, urllib3.exceptions.HTTPError) as e:
            raise _tuf_error(e, phase) from None
        except ManifestError as e:
            raise KilnError(f"{MANIFEST_TARGET}: {e}") from None
        roles = {}
        for role in ROLES:
            md: Metadata[Any] = Metadata.from_file(str(md_dir / f"{role}.json"))
            roles[role] = (md.signed.version, md.signed.expires)
    return Checked(md_url, tg_url, roles, manifest, checked)
