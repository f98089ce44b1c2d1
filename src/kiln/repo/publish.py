"""Publishing releases: `kiln repo add` and `kiln repo waves` (Bottlerocket's `updata`).

`add` takes a build's `artifacts/` directory (written by `kiln.build.pipeline.write_artifacts`),
checks every file against the build's own manifest, publishes the compressed images (and
any migrations) as TUF targets and records the release in the `manifest.json` target.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.core.fs import exclusive_lock
from kiln.host.update.manifest import (
    IMAGE_KEYS,
    Image,
    Manifest,
    ManifestError,
    Update,
    Version,
    parse_time,
)
from kiln.repo import schedule
from kiln.repo.metadata import MANIFEST_TARGET, NAME, Layout, Repo, utcnow
from kiln.repo.store import Staging, target_file

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ArtifactImage:
    path: Path
    size: int  # the compressed file: the TUF target
    sha256: str
    uncompressed_size: int  # the partition image: what the manifest entry records
    uncompressed_sha256: str


@dataclass(frozen=True)
class Artifacts:
    manifest: Path
    variant: str
    arch: str
    version: Version
    build_id: str
    root_hash: str
    salt: str
    data_blocks: int
    images: dict[str, ArtifactImage]


@dataclass(frozen=True)
class Migration:
    from_version: Version
    path: Path
    target: str


@dataclass(frozen=True)
class Result:
    """What `add`/`waves` changed: the manifest entries touched and the new role versions."""

    updates: list[Update]
    targets: list[str]
    versions: dict[str, int]
    files: list[Path]

    def to_json(self) -> dict[str, Any]:
        return {
            "updates": [u.to_json() for u in self.updates],
            "targets": self.targets,
            "versions": self.versions,
            "written": [str(p) for p in self.files],
        }


def read_artifacts(path: Path) -> Artifacts:
    """A build's artifacts directory (or the build output holding `artifacts/`), checked for
    shape; the files' contents are checked while they are copied in."""
    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.is_file() and (path / "artifacts" / "manifest.json").is_file():
        manifest = path / "artifacts" / "manifest.json"
    if not manifest.is_file():
        raise KilnError(f"{path}: no manifest.json (expected a build's artifacts/ directory)")
    try:
        doc = json.loads(manifest.read_bytes())
    except (OSError, ValueError) as e:
        raise KilnError(f"{manifest}: cannot read: {e}") from None

    def field(d: Any, key: str, kind: type, where: str) -> Any:
        value = d.get(key) if isinstance(d, dict) else None
        if not isinstance(value, kind) or (isinstance(value, int) and (isinstance(value, bool) or value < 0)):
            raise KilnError(f"{manifest}: {where}{key}: expected {kind.__name__}")
        return value

    try:
        version = Version.parse(field(doc, "version", str, ""), f"{manifest}: version")
    except ManifestError as e:
        raise KilnError(str(e)) from None
    verity = field(doc, "verity", dict, "")
    images: dict[str, ArtifactImage] = {}
    raw = field(doc, "images", dict, "")
    for key in IMAGE_KEYS:
        entry = field(raw, key, dict, "images.")
        where = f"images.{key}."
        name = field(entry, "file", str, where)
        if not NAME.fullmatch(name):
            raise KilnError(f"{manifest}: {where}file: '{name}' is not a plain file name")
        file = manifest.parent / name
        if not file.is_file():
            raise KilnError(f"{file}: missing (listed in {manifest} as images.{key})")
        for digest in ("sha256", "uncompressed_sha256"):
            if not _SHA256.match(field(entry, digest, str, where)):
                raise KilnError(f"{manifest}: {where}{digest}: not a sha256 hex digest")
        images[key] = ArtifactImage(
            file,
            field(entry, "size", int, where),
            entry["sha256"],
            field(entry, "uncompressed_size", int, where),
            entry["uncompressed_sha256"],
        )
    return Artifacts(
        manifest=manifest,
        variant=field(doc, "variant", str, ""),
        arch=field(doc, "arch", str, ""),
        version=version,
        build_id=str(doc.get("build_id", "")),
        root_hash=field(verity, "root_hash", str, "verity."),
        salt=field(verity, "salt", str, "verity."),
        data_blocks=field(verity, "data_blocks", int, "verity."),
        images=images,
    )


def parse_migration(spec: str, to: Version) -> Migration:
    """`FROM_VERSION:PATH` -> a migration published as `migrate_<to>_<basename>`."""
    frm, sep, path = spec.partition(":")
    if not sep or not path:
        raise KilnError(f"--migration '{spec}': expected FROM_VERSION:PATH")
    try:
        from_version = Version.parse(frm, f"--migration '{spec}': FROM_VERSION")
    except ManifestError as e:
        raise KilnError(str(e)) from None
    if not from_version < to:
        raise KilnError(f"--migration '{spec}': FROM_VERSION must be lower than the release's {to}")
    file = Path(path)
    if not file.is_file():
        raise KilnError(f"--migration '{spec}': {file} is not a file")
    target = f"migrate_{to}_{file.name}"
    if not NAME.fullmatch(file.name):
        raise KilnError(f"--migration '{spec}': '{file.name}' is not a plain file name (letters, digits, . _ + -)")
    return Migration(from_version, file, target)


def parse_start(text: str | None) -> datetime:
    if text is None:
        return utcnow()
    try:
        return parse_time(text, "--start-at")
    except ManifestError as e:
        raise KilnError(f"{e} (expected e.g. 2026-05-01T09:00:00Z)") from None


def current_manifest(repo: Repo) -> Manifest:
    try:
        return Manifest.from_bytes(repo.read_target(MANIFEST_TARGET))
    except ManifestError as e:
        raise KilnError(f"{repo.target_path(MANIFEST_TARGET)}: {e}") from None


def merge(manifest: Manifest, update: Update, max_version: Version | None, migrations: Sequence[Migration]) -> Manifest:
    """The manifest with `update` added (replacing its variant/arch/version) and every update of
    that variant/arch given the same max_version: `max_version`, or the highest of this
    version and the current max_version (Bottlerocket's rule)."""

    def mine(u: Update) -> bool:
        return u.variant == update.variant and u.arch == update.arch

    kept = [u for u in manifest.updates if not (mine(u) and u.version == update.version)]
    top = max_version or max([update.version, *(u.max_version for u in kept if mine(u))])
    updates = [replace(u, max_version=top) if mine(u) else u for u in [*kept, update]]
    updates.sort(key=lambda u: (u.variant, u.arch, u.version))
    result = Manifest(updates, {k: list(v) for k, v in manifest.migrations.items()})
    for m in migrations:
        names = result.migrations.setdefault((m.from_version, update.version), [])
        if m.target not in names:
            names.append(m.target)
    return result


def _save(repo: Repo, manifest: Manifest, staging: Staging) -> None:
    data = manifest.to_bytes()
    try:
        Manifest.from_bytes(data)  # what clients will parse
    except ManifestError as e:
        raise KilnError(f"the new manifest.json would not load: {e}") from None
    repo.targets.signed.targets[MANIFEST_TARGET] = target_file(staging.add_bytes(MANIFEST_TARGET, data))


def _versions(repo: Repo) -> dict[str, int]:
    return {r: repo.role(r).signed.version for r in ("root", "targets", "snapshot", "timestamp")}


def add(
    directory: Path,
    artifacts_dir: Path,
    *,
    waves: str = "default",
    start_at: str | None = None,
    max_version: str | None = None,
    migrations: Sequence[str] = (),
) -> Result:
    """Publish a build: its images (and migrations) as targets, its entry in manifest.json."""
    layout = Layout(Path(directory))
    layout.require()
    art = read_artifacts(artifacts_dir)
    plan = schedule.load(waves)
    start = parse_start(start_at)
    try:
        top = Version.parse(max_version, "--max-version") if max_version is not None else None
    except ManifestError as e:
        raise KilnError(str(e)) from None
    migs = [parse_migration(m, art.version) for m in migrations]
    if len({m.target for m in migs}) != len(migs):
        raise KilnError("--migration: two migrations have the same file name")
    with exclusive_lock(layout.lock):
        repo = Repo.open(layout.dir)
        manifest = current_manifest(repo)
        with Staging(layout.targets) as staging:
            images: dict[str, Image] = {}
            for key, img in art.images.items():
                item = staging.add_file(img.path.name, img.path, size=img.size, sha256=img.sha256)
                repo.targets.signed.targets[item.name] = target_file(item)
                images[key] = Image(item.name, img.uncompressed_size, img.uncompressed_sha256)
            for m in migs:
                repo.targets.signed.targets[m.target] = target_file(staging.add_file(m.target, m.path))
            update = Update(
                variant=art.variant,
                arch=art.arch,
                version=art.version,
                max_version=art.version,
                waves=plan.at(start),
                images=images,
                root_hash=art.root_hash,
                salt=art.salt,
                data_blocks=art.data_blocks,
                build_id=art.build_id,
            )
            new = merge(manifest, update, top, migs)
            _save(repo, new, staging)
            names = [s.name for s in staging.staged]
            files = repo.commit({"targets"}, before_write=staging.commit)
        entry = next(u for u in new.updates if u.variant == art.variant and u.arch == art.arch
                     and u.version == art.version)
        return Result([entry], names, _versions(repo), files)


def set_waves(
    directory: Path,
    version: str,
    waves: str,
    *,
    start_at: str | None = None,
    variant: str | None = None,
    arch: str | None = None,
) -> Result:
    """Re-set the waves of a published version (every variant/arch publishing it, unless
    narrowed); `none` clears them."""
    layout = Layout(Path(directory))
    layout.require()
    try:
        wanted = Version.parse(version, "VERSION")
    except ManifestError as e:
        raise KilnError(str(e)) from None
    plan = schedule.load(waves)
    start = parse_start(start_at)
    with exclusive_lock(layout.lock):
        repo = Repo.open(layout.dir)
        manifest = current_manifest(repo)

        def match(u: Update) -> bool:
            return u.version == wanted and variant in (None, u.variant) and arch in (None, u.arch)

        if not any(match(u) for u in manifest.updates):
            have = sorted({f"{u.variant}/{u.arch} {u.version}" for u in manifest.updates})
            raise KilnError(
                f"manifest.json has no release {wanted}"
                + (f" for variant {variant}" if variant else "")
                + (f" ({arch})" if arch else ""),
                hint="published: " + (", ".join(have) or "nothing yet"),
            )
        new = Manifest(
            [replace(u, waves=plan.at(start)) if match(u) else u for u in manifest.updates], manifest.migrations
        )
        with Staging(layout.targets) as staging:
            _save(repo, new, staging)
            files = repo.commit({"targets"}, before_write=staging.commit)
        return Result([u for u in new.updates if match(u)], [MANIFEST_TARGET], _versions(repo), files)

