"""`manifest.json`: the signed list of releases an update agent chooses from.

It is itself a TUF target, so everything in it is as trusted as the repository's keys.
Shape (Bottlerocket's, plus what Kiln checks while writing a slot):

    {"updates": [{"variant": "container-host", "arch": "amd64", "version": "1.1.0",
                  "max_version": "1.1.0", "waves": {"0": "2026-11-26T12:00:00Z", ...},
                  "images": {"boot": {"target": "...boot.img.zst", "size": N, "sha256": "..."},
                             "root": {...}, "hash": {...}},
                  "verity": {"root_hash": "...", "salt": "...", "data_blocks": N},
                  "build_id": "..."}],
     "migrations": {"(1.0.0, 1.1.0)": ["migrate_1.1.0_rename-motd"]}}

`images.*.size`/`sha256` describe the *uncompressed* partition image (the TUF target entry
covers the compressed file). Also here: version ordering, `choose` (which update a host
takes, and why it takes none) and the migration path between two versions.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kiln.host.update import waves as wavemath

IMAGE_KEYS = ("boot", "root", "hash")
# Whole text (fullmatch). At most 9 digits a part: int() refuses more than 4300 (a 500 once),
# and settings.updates.version-lock (kiln.host.settings.model) takes the same grammar.
_VERSION = re.compile(r"v?([0-9]{1,9})\.([0-9]{1,9})\.([0-9]{1,9})")
_MIGRATION_KEY = re.compile(r"\(\s*(v?\d+\.\d+\.\d+)\s*,\s*(v?\d+\.\d+\.\d+)\s*\)", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TARGET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class ManifestError(ValueError):
    """The manifest does not have the expected shape; the message names the field."""


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str, where: str = "version") -> Version:
        m = _VERSION.fullmatch(text) if isinstance(text, str) else None
        if not m:
            raise ManifestError(f"{where}: '{text}' is not MAJOR.MINOR.PATCH")
        return cls(int(m[1]), int(m[2]), int(m[3]))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class Image:
    target: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Update:
    variant: str
    arch: str
    version: Version
    max_version: Version
    waves: dict[int, datetime]
    images: dict[str, Image]
    root_hash: str
    salt: str
    data_blocks: int
    build_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "arch": self.arch,
            "version": str(self.version),
            "max_version": str(self.max_version),
            "waves": {str(s): format_time(t) for s, t in sorted(self.waves.items())},
            "images": {k: {"target": i.target, "size": i.size, "sha256": i.sha256} for k, i in self.images.items()},
            "verity": {"root_hash": self.root_hash, "salt": self.salt, "data_blocks": self.data_blocks},
            "build_id": self.build_id,
        }


@dataclass
class Manifest:
    updates: list[Update]
    migrations: dict[tuple[Version, Version], list[str]]

    @classmethod
    def empty(cls) -> Manifest:
        return cls([], {})

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"manifest.json is not JSON: {e}") from None
        return cls.from_json(doc)

    @classmethod
    def from_json(cls, doc: Any) -> Manifest:
        if not isinstance(doc, dict):
            raise ManifestError("manifest.json: expected an object")
        raw_updates = doc.get("updates", [])
        if not isinstance(raw_updates, list):
            raise ManifestError("manifest.json: updates: expected a list")
        updates = [_update(u, f"updates[{i}]") for i, u in enumerate(raw_updates)]
        raw_migrations = doc.get("migrations", {})
        if not isinstance(raw_migrations, dict):
            raise ManifestError("manifest.json: migrations: expected an object")
        migrations: dict[tuple[Version, Version], list[str]] = {}
        for key, names in raw_migrations.items():
            m = _MIGRATION_KEY.fullmatch(key)
            if not m:
                raise ManifestError(f"migrations: key '{key}' is not '(FROM, TO)'")
            pair = (Version.parse(m[1], f"migrations.{key}"), Version.parse(m[2], f"migrations.{key}"))
            if not pair[0] < pair[1]:
                raise ManifestError(f"migrations.{key}: FROM must be lower than TO")
            if not isinstance(names, list) or not all(isinstance(n, str) and _TARGET.fullmatch(n) for n in names):
                raise ManifestError(f"migrations.{key}: expected a list of target names")
            migrations[pair] = list(names)
        return cls(updates, migrations)

    def to_json(self) -> dict[str, Any]:
        return {
            "updates": [u.to_json() for u in self.updates],
            "migrations": {f"({a}, {b})": list(n) for (a, b), n in sorted(self.migrations.items())},
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()

    def migration_path(self, current: Version, target: Version) -> list[str]:
        """Migration target names to run from `current` to `target`, in order (backward:
        the forward list reversed). From each version reached, the transition with the
        highest TO not beyond the goal is taken (Bottlerocket's rule); a release that lists
        no transition from the version reached needs no migration for the rest of the way
        (`kiln repo add` records only transitions that carry migrations)."""
        low, high = min(current, target), max(current, target)
        names: list[str] = []
        at = low
        while at != high:
            hops = sorted((to for (frm, to) in self.migrations if frm == at and to <= high), reverse=True)
            if not hops:
                later = [frm for (frm, to) in self.migrations if at < frm < high]
                if not later:
                    break
                at = min(later)  # nothing from here; the next recorded transition starts later
                continue
            names += self.migrations[(at, hops[0])]
            at = hops[0]
        return names if current < target else names[::-1]


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any, where: str) -> datetime:
    try:
        t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise ManifestError(f"{where}: '{text}' is not an RFC 3339 time") from None
    if t.tzinfo is None:
        raise ManifestError(f"{where}: '{text}' has no time zone")
    return t


def _field(doc: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in doc:
        raise ManifestError(f"{where}.{key}: missing")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _update(doc: Any, where: str) -> Update:
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected an object")
    version = Version.parse(_field(doc, "version", str, where), f"{where}.version")
    max_version = Version.parse(_field(doc, "max_version", str, where), f"{where}.max_version")
    raw_waves = doc.get("waves", {})
    if not isinstance(raw_waves, dict):
        raise ManifestError(f"{where}.waves: expected an object")
    waves: dict[int, datetime] = {}
    for seed, when in raw_waves.items():
        if not (str(seed).isascii() and str(seed).isdigit()) or int(seed) > wavemath.MAX_SEED:
            raise ManifestError(f"{where}.waves: '{seed}' is not a seed in 0..{wavemath.MAX_SEED}")
        waves[int(seed)] = parse_time(when, f"{where}.waves.{seed}")
    ordered = [waves[s] for s in sorted(waves)]
    if any(a >= b for a, b in itertools.pairwise(ordered)):
        raise ManifestError(f"{where}.waves: wave times must increase with the start seed")
    raw_images = _field(doc, "images", dict, where)
    images = {}
    for key in IMAGE_KEYS:
        img = _field(raw_images, key, dict, f"{where}.images")
        w = f"{where}.images.{key}"
        target = _field(img, "target", str, w)
        if not _TARGET.fullmatch(target):
            raise ManifestError(f"{w}.target: '{target}' is not a plain file name")
        digest = _field(img, "sha256", str, w)
        if not _SHA256.fullmatch(digest):
            raise ManifestError(f"{w}.sha256: not a sha256 hex digest")
        images[key] = Image(target, _field(img, "size", int, w), digest)
    verity = _field(doc, "verity", dict, where)
    root_hash = _field(verity, "root_hash", str, f"{where}.verity")
    if not _SHA256.fullmatch(root_hash):
        raise ManifestError(f"{where}.verity.root_hash: not a sha256 hex digest")
    return Update(
        variant=_field(doc, "variant", str, where),
        arch=_field(doc, "arch", str, where),
        version=version,
        max_version=max_version,
        waves=waves,
        images=images,
        root_hash=root_hash,
        salt=_field(verity, "salt", str, f"{where}.verity"),
        data_blocks=_field(verity, "data_blocks", int, f"{where}.verity"),
        build_id=str(doc.get("build_id", "")),
    )


@dataclass(frozen=True)
class Host:
    """What the choice depends on: the running image and `settings.updates`."""

    variant: str
    arch: str
    version: Version
    seed: int
    version_lock: str = "latest"
    ignore_waves: bool = False
    failed: frozenset[Version] = frozenset()  # versions that failed here for good: not retried
    # versions whose boot did not finish here (a power cut?): retried from this time
    retry_at: Mapping[Version, datetime] = field(default_factory=dict)
    max_attempts: int = 3


@dataclass(frozen=True)
class Choice:
    update: Update | None
    available: list[Version]  # every version for this variant/arch, newest first
    reason: str  # why `update` is None (empty when it is not)
    ready_at: datetime | None = None  # when waiting for this host's wave: when it opens


def choose(manifest: Manifest, host: Host, now: datetime) -> Choice:
    """Bottlerocket's selection: this variant and arch, version <= max_version, the host's
    wave open (unless ignore-waves); newest first; with a version lock exactly that
    version, else the first newer than the host (or one the host is above the
    max_version of: a lowered max_version forces a downgrade)."""
    mine = [u for u in manifest.updates if u.variant == host.variant and u.arch == host.arch]
    mine.sort(key=lambda u: u.version, reverse=True)
    available = [u.version for u in mine]
    if not mine:
        return Choice(None, [], f"the repository has no release for variant {host.variant} ({host.arch})")
    valid = [u for u in mine if u.version <= u.max_version]

    def wanted(u: Update) -> bool:
        if host.version_lock != "latest":
            return u.version == Version.parse(host.version_lock, "settings.updates.version-lock")
        return host.version < u.version or host.version > u.max_version

    candidates = [u for u in valid if wanted(u)]
    skipped = [u for u in candidates if u.version in host.failed]
    candidates = [u for u in candidates if u.version not in host.failed]
    later = [u for u in candidates if host.retry_at.get(u.version, now) > now]
    candidates = [u for u in candidates if u not in later]
    if host.version_lock != "latest":
        lock = Version.parse(host.version_lock, "settings.updates.version-lock")
        if lock == host.version:
            return Choice(None, available, f"locked to {lock} (settings.updates.version-lock), which is running")
        if not candidates:
            return Choice(None, available, f"locked to {lock} (settings.updates.version-lock), not in the repository")
    if not candidates and later:
        retry = host.retry_at[later[0].version]
        return Choice(
            None, available,
            f"{later[0].version} did not finish booting here (a power cut, a hang?); "
            f"retried from {format_time(retry)} (at most {host.max_attempts} attempts)",
            ready_at=retry,
        )
    if not candidates and skipped:
        return Choice(
            None, available, f"{skipped[0].version} failed on this host before and is not retried (last_failure)"
        )
    if not candidates:
        return Choice(None, available, f"{host.version} is the newest release for {host.variant}")
    if host.ignore_waves:
        return Choice(candidates[0], available, "")
    waiting: list[datetime] = []
    for u in candidates:
        when = wavemath.ready_at(u.waves, host.seed)
        if when is None or now >= when:
            return Choice(u, available, "")
        waiting.append(when)
    soonest = min(waiting)
    return Choice(
        None,
        available,
        f"{candidates[0].version} is out, but this host's wave (seed {host.seed}) opens at {format_time(soonest)}",
        ready_at=soonest,
    )
