"""A repository directory: its layout, settings (`repo.json`) and the signed metadata of the
four top-level TUF roles, with one way to change them: `Repo.commit`.

`commit` bumps the version and expiry of every changed role and of the roles above it
(targets -> snapshot -> timestamp), signs, verifies each result against the new root, and
only then writes, in the order a client reads backwards: `<N>.targets.json`,
`<N>.snapshot.json`, `<N>.root.json`, `root.json`, and `timestamp.json` last. Each file is
replaced atomically, so a client always sees the previous or the next repository state.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.core.errors import KilnError
from kiln.core.fs import atomic_write
from kiln.repo.keys import KeyStore

if TYPE_CHECKING:
    from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRES = {"root": 365, "targets": 90, "snapshot": 30, "timestamp": 7}
MAX_EXPIRES_DAYS = 36500
MANIFEST_TARGET = "manifest.json"
# Target names and served file names: one plain path component.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*", re.ASCII)  # used with fullmatch
_ROOT_FILE = re.compile(r"^([1-9]\d*)\.root\.json$")
SETTINGS_FORMAT = 1


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Layout:
    dir: Path

    @property
    def keys(self) -> Path:
        return self.dir / "keys"

    @property
    def metadata(self) -> Path:
        return self.dir / "metadata"

    @property
    def targets(self) -> Path:
        return self.dir / "targets"

    @property
    def settings(self) -> Path:
        return self.dir / "repo.json"

    @property
    def lock(self) -> Path:
        return self.dir / ".lock"

    def require(self) -> None:
        if not self.settings.is_file():
            raise KilnError(
                f"{self.dir} is not a Kiln update repository (no {self.settings.name})",
                hint=f"create one with: kiln repo init {self.dir}",
            )


@dataclass
class Settings:
    expires_days: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_EXPIRES))
    thresholds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 1))

    def to_bytes(self) -> bytes:
        doc = {"format": SETTINGS_FORMAT, "expires_days": self.expires_days, "thresholds": self.thresholds}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def load(cls, path: Path) -> Settings:
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise KilnError(f"{path}: cannot read the repository settings: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != SETTINGS_FORMAT:
            raise KilnError(f"{path}: format: expected {SETTINGS_FORMAT}")
        out = cls()
        for key, target in (("expires_days", out.expires_days), ("thresholds", out.thresholds)):
            section = doc.get(key, {})
            if not isinstance(section, dict):
                raise KilnError(f"{path}: {key}: expected an object of role -> number")
            for role, value in section.items():
                if role not in ROLES or not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise KilnError(f"{path}: {key}.{role}: expected a role and a positive number")
                target[role] = value
        return out


def parse_expires(items: Sequence[str]) -> dict[str, int]:
    """`--expires ROLE=DAYS` values -> {role: days}; errors name the bad value."""
    out: dict[str, int] = {}
    for item in items:
        role, sep, days = item.partition("=")
        role = role.strip()
        if not sep or role not in ROLES:
            raise KilnError(f"--expires '{item}': expected ROLE=DAYS with ROLE one of {', '.join(ROLES)}")
        if not days.strip().isdigit() or not 1 <= int(days) <= MAX_EXPIRES_DAYS:
            raise KilnError(f"--expires '{item}': DAYS must be a whole number from 1 to {MAX_EXPIRES_DAYS}")
        out[role] = int(days)
    return out


def serialize(md: Metadata[Any]) -> bytes:
    from tuf.api.serialization.json import JSONSerializer

    return md.to_bytes(JSONSerializer(compact=False)) + b"\n"


def _load(path: Path, role: str) -> Metadata[Any]:
    from tuf.api.metadata import Metadata

    try:
        md: Metadata[Any] = Metadata.from_bytes(path.read_bytes())
    except OSError as e:
        raise KilnError(f"{path}: cannot read: {e.strerror}") from None
    except Exception as e:  # DeserializationError and the payload classes' ValueError/KeyError
        raise KilnError(f"{path}: not valid TUF metadata: {e}") from None
    if md.signed.type != role:
        raise KilnError(f"{path}: expected {role} metadata, found {md.signed.type}")
    return md


class Repo:
    """An opened repository: settings, keys and the current metadata of each role."""

    def __init__(
        self,
        layout: Layout,
        settings: Settings,
        root: Metadata[Root],
        timestamp: Metadata[Timestamp],
        snapshot: Metadata[Snapshot],
        targets: Metadata[Targets],
        *,
        fresh: bool = False,
    ) -> None:
        self.layout = layout
        self.settings = settings
        self.keys = KeyStore(layout.keys)
        self.root, self.timestamp, self.snapshot, self.targets = root, timestamp, snapshot, targets
        self._fresh = fresh  # nothing on disk yet: every role starts at version 1
        # The root clients trust now: a new root must also be signed by its keys.
        self._trusted_root: Metadata[Root] | None = (
            None if fresh else _load(layout.metadata / _root_name(root), "root")
        )

    @classmethod
    def open(cls, directory: Path) -> Repo:
        """Load DIR's current metadata: the highest `<N>.root.json` (a root is public as soon
        as its versioned file exists), then timestamp -> snapshot -> targets."""
        layout = Layout(Path(directory))
        layout.require()
        settings = Settings.load(layout.settings)
        md = layout.metadata
        versions = [int(m[1]) for p in md.glob("*.root.json") if (m := _ROOT_FILE.match(p.name))]
        if not versions:
            raise KilnError(f"{md}: no <N>.root.json", hint="was this directory made by `kiln repo init`?")
        root = _load(md / f"{max(versions)}.root.json", "root")
        timestamp = _load(md / "timestamp.json", "timestamp")
        snapshot_name = f"{timestamp.signed.snapshot_meta.version}.snapshot.json"
        snapshot = _load(md / snapshot_name, "snapshot")
        targets_meta = snapshot.signed.meta.get("targets.json")
        if targets_meta is None:
            raise KilnError(f"{md / snapshot_name}: meta: no targets.json entry")
        targets = _load(md / f"{targets_meta.version}.targets.json", "targets")
        return cls(layout, settings, root, timestamp, snapshot, targets)

    # -- reading -------------------------------------------------------------------------

    def role(self, name: str) -> Metadata[Any]:
        roles: dict[str, Metadata[Any]] = {
            "root": self.root, "targets": self.targets, "snapshot": self.snapshot, "timestamp": self.timestamp
        }
        return roles[name]

    def target_path(self, name: str) -> Path:
        """Where target `name` is stored: `targets/<sha256>.<name>` (consistent snapshots)."""
        info = self.targets.signed.targets.get(name)
        if info is None:
            raise KilnError(f"targets.json (version {self.targets.signed.version}) has no target '{name}'")
        return self.layout.targets / f"{info.hashes['sha256']}.{name}"

    def read_target(self, name: str) -> bytes:
        path = self.target_path(name)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise KilnError(f"{path}: cannot read target '{name}': {e.strerror}") from None
        from tuf.api.exceptions import LengthOrHashMismatchError

        try:
            self.targets.signed.targets[name].verify_length_and_hashes(data)
        except LengthOrHashMismatchError as e:
            raise KilnError(f"{path}: does not match its entry in targets.json: {e}") from None
        return data

    # -- changing ------------------------------------------------------------------------

    def commit(self, changed: set[str], before_write: Callable[[], None] | None = None) -> list[Path]:
        """Bump, sign and write every role in `changed` and the roles that list it.

        Everything is signed and verified in memory first; then `before_write` runs (the
        caller moves new target files into place), then the metadata files are written.
        Returns the files written, in order."""
        from tuf.api.metadata import MetaFile

        unknown = changed - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}")
        now = utcnow()
        md = self.layout.metadata
        writes: list[tuple[Path, bytes]] = []
        roots: list[tuple[Path, bytes]] = []
        if "root" in changed:
            self._renew(self.root, "root", now)
            self._sign_root()
            data = serialize(self.root)
            roots = [(md / _root_name(self.root), data), (md / "root.json", data)]
        elif not self._fresh:  # repair a root.json left behind by an interrupted commit
            newest = (md / _root_name(self.root)).read_bytes()
            if not (md / "root.json").is_file() or (md / "root.json").read_bytes() != newest:
                roots = [(md / "root.json", newest)]
        if "targets" in changed:
            self._renew(self.targets, "targets", now)
            self._sign(self.targets, "targets")
            data = serialize(self.targets)
            self.snapshot.signed.meta["targets.json"] = MetaFile.from_data(
                self.targets.signed.version, data, ["sha256"]
            )
            writes.append((md / f"{self.targets.signed.version}.targets.json", data))
            changed = changed | {"snapshot"}
        if "snapshot" in changed:
            self._renew(self.snapshot, "snapshot", now)
            self._sign(self.snapshot, "snapshot")
            data = serialize(self.snapshot)
            self.timestamp.signed.snapshot_meta = MetaFile.from_data(self.snapshot.signed.version, data, ["sha256"])
            writes.append((md / f"{self.snapshot.signed.version}.snapshot.json", data))
            changed = changed | {"timestamp"}
        # Roles signed before a key change in this commit must still verify with the new root.
        for name in ("targets", "snapshot"):
            self._verify(self.role(name), name)
        if "timestamp" in changed:
            self._renew(self.timestamp, "timestamp", now)
            self._sign(self.timestamp, "timestamp")
        self._verify(self.timestamp, "timestamp")
        writes += roots
        if "timestamp" in changed:
            writes.append((md / "timestamp.json", serialize(self.timestamp)))
        if before_write is not None:
            before_write()
        md.mkdir(parents=True, exist_ok=True)
        for path, data in writes:
            atomic_write(path, data)
        if "root" in changed:
            self._trusted_root = _load(md / _root_name(self.root), "root")
        self._fresh = False
        return [p for p, _ in writes]

    def _renew(self, md: Metadata[Any], role: str, now: datetime) -> None:
        if not self._fresh:
            md.signed.version += 1
        md.signed.expires = now + timedelta(days=self.settings.expires_days[role])

    def _sign(self, md: Metadata[Any], role: str) -> None:
        spec = self.root.signed.roles[role]
        signers = self.keys.signers(spec.keyids)
        if len(signers) < spec.threshold:
            raise KilnError(
                f"{role}: {len(signers)} of the {spec.threshold} private keys its threshold needs are in "
                f"{self.layout.keys}",
                hint="the key files are <role>-<n>.pem; key ids are listed by `kiln repo status`",
            )
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def _verify(self, md: Metadata[Any], role: str) -> None:
        from tuf.api.exceptions import UnsignedMetadataError

        try:
            self.root.signed.verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError as e:
            raise KilnError(f"{role}: the signatures do not meet root's threshold: {e}") from None

    def _sign_root(self) -> None:
        """Sign with the keys of the root clients trust now and of the new one: a client
        holding version N accepts N+1 only if both thresholds are met."""
        new = self.root.signed
        old = self._trusted_root.signed if self._trusted_root is not None else None
        keyids = list(dict.fromkeys([*(old.roles["root"].keyids if old else []), *new.roles["root"].keyids]))
        self.root.signatures.clear()
        for signer in self.keys.signers(keyids):
            self.root.sign(signer, append=True)
        result = new.get_root_verification_result(old, self.root.signed_bytes, self.root.signatures)
        if not result.verified:
            need = [f"version {new.version} signed by {len(result.second.signed)}/{result.second.threshold}"]
            if old is not None:
                need.insert(0, f"version {old.version}'s keys: {len(result.first.signed)}/{result.first.threshold}")
            raise KilnError(
                f"root version {new.version} cannot be signed: not enough root keys in {self.layout.keys} "
                f"({'; '.join(need)})"
            )


def _root_name(root: Metadata[Any]) -> str:
    return f"{root.signed.version}.root.json"
