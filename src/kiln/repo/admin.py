"""Repository lifecycle: `init`, `refresh`, `rotate-key` and `status` (Bottlerocket's
`tuftool create`, `tuftool update` for re-signing, `tuftool root` for keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.core.fs import atomic_dir, atomic_write, exclusive_lock
from kiln.host.update.manifest import Manifest, format_time
from kiln.repo.keys import KeyFile, KeyStore
from kiln.repo.metadata import (
    MANIFEST_TARGET,
    ROLES,
    Layout,
    Repo,
    Settings,
    utcnow,
)
from kiln.repo.store import Staging, target_file

MAX_ROOT_KEYS = 16


@dataclass(frozen=True)
class Changed:
    """What a command wrote: metadata files, role versions, keys made and removed."""

    dir: Path
    versions: dict[str, int]
    files: list[Path]
    new_keys: list[Path] = field(default_factory=list)
    removed_keys: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "versions": self.versions,
            "written": [str(p) for p in self.files],
            "new_keys": [str(p) for p in self.new_keys],
            "removed_keys": [str(p) for p in self.removed_keys],
        }


def _versions(repo: Repo) -> dict[str, int]:
    return {r: repo.role(r).signed.version for r in ROLES}


def init(
    directory: Path, *, root_keys: int = 1, root_threshold: int = 1, expires: dict[str, int] | None = None
) -> Changed:
    """A new repository: keys for the four roles, version 1 of each, an empty manifest.json.
    Built in a temporary sibling directory that becomes DIR only when complete."""
    from tuf.api.metadata import Metadata, Role, Root, Snapshot, Targets, Timestamp

    final = Path(directory)
    if not 1 <= root_keys <= MAX_ROOT_KEYS:
        raise KilnError(f"--root-keys {root_keys}: expected 1 to {MAX_ROOT_KEYS}")
    if not 1 <= root_threshold <= root_keys:
        raise KilnError(f"--root-threshold {root_threshold}: expected 1 to --root-keys ({root_keys})")
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise KilnError(
            f"{final} already exists and is not empty",
            hint="kiln repo init makes a new repository; `kiln repo status` shows an existing one",
        )
    settings = Settings()
    settings.expires_days.update(expires or {})
    settings.thresholds["root"] = root_threshold
    with atomic_dir(final) as tmp:
        layout = Layout(tmp)
        store = KeyStore(layout.keys)
        made: list[KeyFile] = []
        root = Root(consistent_snapshot=True, roles={r: Role([], settings.thresholds[r]) for r in ROLES})
        for role in ROLES:
            for _ in range(root_keys if role == "root" else 1):
                kf = store.generate(role)
                made.append(kf)
                root.add_key(kf.signer.public_key, role)
        with Staging(layout.targets) as staging:
            item = staging.add_bytes(MANIFEST_TARGET, Manifest.empty().to_bytes())
            targets = Targets(targets={MANIFEST_TARGET: target_file(item)})
            repo = Repo(
                layout, settings, Metadata(root), Metadata(Timestamp()), Metadata(Snapshot()), Metadata(targets),
                fresh=True,
            )
            repo.keys = store
            files = repo.commit(set(ROLES), before_write=staging.commit)
        atomic_write(layout.settings, settings.to_bytes())
    return Changed(
        final,
        _versions(repo),
        [final / p.relative_to(tmp) for p in files],
        [final / kf.path.relative_to(tmp) for kf in made],
    )


def refresh(directory: Path, *, expires: dict[str, int] | None = None) -> Changed:
    """Re-sign snapshot and timestamp with new versions and expiry dates (run it from cron:
    timestamps expire within days). A role named in `expires` gets that expiry from now on
    and is re-signed too."""
    layout = Layout(Path(directory))
    layout.require()
    expires = expires or {}
    with exclusive_lock(layout.lock):
        repo = Repo.open(layout.dir)
        repo.settings.expires_days.update(expires)
        files = repo.commit({"snapshot", "timestamp"} | set(expires))
        if expires:
            atomic_write(layout.settings, repo.settings.to_bytes())
        return Changed(layout.dir, _versions(repo), files)


def rotate_key(directory: Path, role: str, *, keyid: str | None = None) -> Changed:
    """Replace ROLE's keys (or the one key whose id starts with `keyid`) with new ones.

    A new root version lists the new keys, signed by the current root keys and (for root)
    the new ones too, so a client holding the current root accepts it; a rotated role is
    re-signed with its new key (and snapshot/timestamp above it). The old private keys are
    deleted only once all of that is written."""
    if role not in ROLES:
        raise KilnError(f"role '{role}': expected one of {', '.join(ROLES)}")
    layout = Layout(Path(directory))
    layout.require()
    with exclusive_lock(layout.lock):
        repo = Repo.open(layout.dir)
        root = repo.root.signed
        old = list(root.roles[role].keyids)
        if keyid is not None:
            old = [k for k in old if k.startswith(keyid)]
            if len(old) != 1:
                raise KilnError(
                    f"{role}: {'no key' if not old else 'more than one key'} has an id starting with '{keyid}'",
                    hint="`kiln repo status` lists the key ids",
                )
        made: list[KeyFile] = []
        try:
            for keyid_old in old:
                kf = repo.keys.generate(role)
                made.append(kf)
                root.revoke_key(keyid_old, role)
                root.add_key(kf.signer.public_key, role)
            files = repo.commit({"root", role})
        except BaseException:
            repo.keys.remove([kf.keyid for kf in made])
            raise
        still_used = {k for r in root.roles.values() for k in r.keyids}
        removed = repo.keys.remove([k for k in old if k not in still_used])
        return Changed(layout.dir, _versions(repo), files, [kf.path for kf in made], removed)


@dataclass(frozen=True)
class RoleStatus:
    name: str
    version: int
    expires: datetime
    threshold: int
    keyids: list[str]
    missing_keys: list[str]  # listed in root, no private key in keys/

    def expiry(self, now: datetime) -> str:
        left = self.expires - now
        if left.total_seconds() <= 0:
            return "expired"
        days = round(left.total_seconds() / 86400)
        if left.days >= 1:
            return f"expires in {days} day{'s' if days != 1 else ''}"
        hours = int(left.total_seconds() // 3600)
        return f"expires in {hours} hour{'s' if hours != 1 else ''}" if hours else "expires within the hour"

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "version": self.version,
            "expires": format_time(self.expires),
            "expiry": self.expiry(now),
            "expired": self.expires <= now,
            "threshold": self.threshold,
            "keyids": self.keyids,
            "missing_private_keys": self.missing_keys,
        }


@dataclass(frozen=True)
class Status:
    dir: Path
    now: datetime
    roles: list[RoleStatus]
    expires_days: dict[str, int]
    manifest: Manifest
    targets: int

    def to_json(self) -> dict[str, Any]:
        doc = self.manifest.to_json()
        return {
            "dir": str(self.dir),
            "now": format_time(self.now),
            "roles": {r.name: r.to_json(self.now) for r in self.roles},
            "expires_days": self.expires_days,
            "targets": self.targets,
            "updates": doc["updates"],
            "migrations": doc["migrations"],
        }


def status(directory: Path) -> Status:
    from kiln.repo.publish import current_manifest

    repo = Repo.open(Path(directory))
    roles = []
    for name in ROLES:
        spec = repo.root.signed.roles[name]
        md = repo.role(name)
        missing = [k for k in spec.keyids if repo.keys.get(k) is None]
        roles.append(RoleStatus(name, md.signed.version, md.signed.expires, spec.threshold, list(spec.keyids), missing))
    return Status(
        repo.layout.dir,
        utcnow(),
        roles,
        dict(repo.settings.expires_days),
        current_manifest(repo),
        len(repo.targets.signed.targets),
    )
