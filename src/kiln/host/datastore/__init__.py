"""The datastore: live settings, pending transactions and definitions, on PRIVATE.

Layout (Bottlerocket keeps one file per key; Kiln keeps one JSON document per state so
that a commit is a single rename and a reader can never see half of one):

    /var/lib/kiln/datastore/
      lock                      writers hold an exclusive flock on it
      current -> v1.0.0         the datastore version in use (migrations copy, then swap)
      v1.0.0/live/settings.json       committed settings (nested JSON)
      v1.0.0/live/definitions.json    metadata, services, configuration files (from the image)
      v1.0.0/pending/<tx>.json        uncommitted settings of transaction <tx>

Every write is temp file + fsync + rename + directory fsync. Every change is validated
against the settings model before anything is written, so a rejected request leaves the
store as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.core.fs import atomic_write, exclusive_lock, fsync_dir
from kiln.host.settings.keys import Tree, changed_keys, merge

if TYPE_CHECKING:
    from kiln.host.settings import definitions as defs

# The model (msgspec) is imported by the methods that validate: a boot where nothing changed
# never needs it, and under emulation the import costs seconds while the boot is busy.

DEFAULT_ROOT = Path("/var/lib/kiln/datastore")
DEFAULT_TX = "default"
# Maps of user-named entries: an entry can be removed as a whole (DELETE /settings).
REMOVABLE: tuple[tuple[str, ...], ...] = (
    ("containers",), ("host-containers",), ("bootstrap-containers",), ("kernel", "sysctl"),
    ("container-registry", "mirrors"), ("container-registry", "credentials"),
)
LAUNCH_TX = "kiln-launch"
# Pending transactions live on PRIVATE (16 MiB, shared with the live settings and migrations):
# an admin's forgotten or hostile transactions must not fill it.
MAX_TRANSACTIONS = 32
MAX_PENDING_BYTES = 4 << 20  # all pending documents together, as stored
_TX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_VERSION = re.compile(r"^v[0-9A-Za-z.+_-]{1,64}$")


class DatastoreError(Exception):
    """The datastore refused an operation; `status` is the HTTP code the API maps it to."""

    status = 400

    def __init__(self, detail: str, path: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.path = path


class NotFound(DatastoreError):
    status = 404


class NothingPending(DatastoreError):
    status = 409


class TooManyTransactions(DatastoreError):
    status = 409


class PendingTooLarge(DatastoreError):
    status = 413


def encode_definitions(tree: Tree) -> bytes:
    """The one byte form of every stored document, so the image's copy of the definitions
    and the store's compare equal."""
    return json.dumps(tree, sort_keys=True, indent=1).encode() + b"\n"


_encode = encode_definitions


class Datastore:
    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        self._shared: tuple[tuple[int, int, int, int], Tree] | None = None

    # -- layout ------------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, version: str) -> Datastore:
        """Open the datastore at `root`, making an empty one for `version` if there is none."""
        store = cls(root)
        root.mkdir(parents=True, exist_ok=True, mode=0o750)
        if not (root / "current").exists():
            name = f"v{version.removeprefix('v')}"
            if not _VERSION.fullmatch(name):
                raise DatastoreError(f"invalid datastore version '{version}'")
            with store._writing():
                (root / name / "live").mkdir(parents=True, exist_ok=True)
                (root / name / "pending").mkdir(exist_ok=True)
                for doc in ("settings.json", "definitions.json"):
                    if not (root / name / "live" / doc).exists():
                        atomic_write(root / name / "live" / doc, b"{}\n", mode=0o640)
                tmp = root / ".current.new"
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                tmp.symlink_to(name)
                os.replace(tmp, root / "current")
                fsync_dir(root)
        return store

    @property
    def version_dir(self) -> Path:
        cur = self.root / "current"
        if not cur.is_dir():
            raise DatastoreError(f"no datastore at {self.root} (the host agent creates it at boot)")
        return cur

    def _writing(self) -> contextlib.AbstractContextManager[None]:
        """One writer at a time, across threads and processes."""
        return exclusive_lock(self.root / "lock")

    def _read(self, path: Path) -> Tree:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise DatastoreError(f"{path} is corrupt: {e}") from None
        if not isinstance(data, dict):
            raise DatastoreError(f"{path} is corrupt: not a JSON object")
        return data

    def _write(self, path: Path, tree: Tree | bytes) -> None:
        data = tree if isinstance(tree, bytes) else _encode(tree)
        atomic_write(path, data, mode=0o640)

    def _pending_path(self, tx: str) -> Path:
        if not _TX.fullmatch(tx):
            raise DatastoreError(f"invalid transaction name '{tx}' (letters, digits, '-', '_'; at most 64)", "tx")
        return self.version_dir / "pending" / f"{tx}.json"

    # -- reads (no lock: every document is replaced by rename) ---------------------------

    def live(self) -> Tree:
        return self._read(self.version_dir / "live" / "settings.json")

    def live_shared(self) -> Tree:
        """The live settings as a tree shared between readers: never modify it.

        For the API's GETs: one stat() instead of open, read and parse when nothing changed.
        A commit replaces the file by rename: (inode, size, mtime, ctime) tells a new version.
        """
        path = self.root / "current" / "live" / "settings.json"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return self.live()  # no datastore (a clear error) or no settings yet
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._shared
        if cached is not None and cached[0] == key:
            return cached[1]
        tree = self._read(path)
        self._shared = (key, tree)
        return tree

    def pending(self, tx: str = DEFAULT_TX) -> Tree:
        return self._read(self._pending_path(tx))

    def transactions(self) -> list[str]:
        return sorted(p.stem for p in (self.version_dir / "pending").glob("*.json"))

    def raw_definitions(self) -> Tree:
        """The definitions document as stored (no model import: for the boot's fast checks)."""
        return self._read(self.version_dir / "live" / "definitions.json")

    def definitions(self) -> defs.Definitions:
        import msgspec

        from kiln.host.settings import definitions as defs

        raw = self.raw_definitions()
        try:
            return msgspec.convert(raw, defs.Definitions, strict=True)
        except msgspec.ValidationError as e:
            raise DatastoreError(f"definitions are corrupt: {e}") from None

    # -- writes ----------------------------------------------------------------------------

    def patch(self, tree: Any, tx: str = DEFAULT_TX) -> None:
        """Add `tree` to transaction `tx`; the result (live + pending) must be valid settings."""
        from kiln.host.settings.model import check_remote_tls, validate

        validate(tree)  # the patch alone: its own errors name its own keys
        with self._writing():
            pending = merge(self.pending(tx), tree)
            result = merge(self.live(), pending)
            validate(result)
            if isinstance(tree, dict) and "remote" in (tree.get("api") or {}):
                check_remote_tls(result)
            path = self._pending_path(tx)
            path.parent.mkdir(exist_ok=True)
            data = _encode(pending)
            self._check_room(path, len(data))
            self._write(path, data)

    def _check_room(self, path: Path, size: int) -> None:
        """Refuse a pending document that would pass the count or the total size allowed."""
        others = [p for p in path.parent.glob("*.json") if p != path]
        if not path.exists() and len(others) >= MAX_TRANSACTIONS:
            raise TooManyTransactions(
                f"{len(others)} transactions are pending already (at most {MAX_TRANSACTIONS}): "
                "commit or discard one first", "tx")
        total = size + sum(p.stat().st_size for p in others)
        if total > MAX_PENDING_BYTES:
            raise PendingTooLarge(
                f"pending transactions would hold {total} bytes (at most {MAX_PENDING_BYTES}): "
                "commit or discard some first", "tx")

    def discard(self, tx: str = DEFAULT_TX) -> bool:
        with self._writing():
            path = self._pending_path(tx)
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            fsync_dir(path.parent)
            return True

    def remove_stale_temporaries(self) -> int:
        """Delete temp files a writer killed mid-write left behind (storewolf, at boot)."""
        with self._writing():
            stale = [p for d in ("live", "pending") for p in (self.version_dir / d).glob(".*.json.*")]
            for p in stale:
                p.unlink(missing_ok=True)
            return len(stale)

    def discard_all(self) -> list[str]:
        """Drop every pending transaction (storewolf does this at boot: they do not outlive one)."""
        return [tx for tx in self.transactions() if self.discard(tx)]

    def commit(self, tx: str = DEFAULT_TX) -> list[tuple[str, ...]]:
        """Make `tx` live in one rename; returns the changed keys (empty if values were equal)."""
        with self._writing():
            path = self._pending_path(tx)
            if not path.exists():
                raise NothingPending(f"transaction '{tx}' has nothing pending", "tx")
            from kiln.host.settings.model import validate

            old = self.live()
            new = merge(old, self.pending(tx))
            validate(new)
            self._write(self.version_dir / "live" / "settings.json", new)
            # A crash here leaves the pending file: committing it again changes nothing.
            path.unlink()
            fsync_dir(path.parent)
            return [("settings", *k) for k in changed_keys(old, new)]

    def remove(self, paths: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        """Remove whole named entries (`containers.web`) from the live settings in one commit.

        Only entries of the name-keyed maps can go: every other key has a default the next
        boot would restore. Returns the changed keys, for the renderer.
        """
        for path in paths:
            if not any(len(path) == len(root) + 1 and path[: len(root)] == root for root in REMOVABLE):
                roots = ", ".join(".".join(r) + ".NAME" for r in REMOVABLE)
                raise DatastoreError(f"'{'.'.join(path)}' cannot be removed (only {roots})", "keys")
        with self._writing():
            from kiln.host.settings.model import validate

            old = self.live()
            new = json.loads(json.dumps(old))
            for path in paths:
                chain = [new]  # the tables from the root down to the entry's map
                for seg in path[:-1]:
                    chain.append(chain[-1].get(seg) or {})
                if path[-1] not in chain[-1]:
                    raise NotFound(f"settings.{'.'.join(path)} is not set", "keys")
                del chain[-1][path[-1]]
                for depth in range(len(path) - 1, 0, -1):  # no empty tables left behind
                    if not chain[depth]:
                        del chain[depth - 1][path[depth - 1]]
            validate(new)
            self._write(self.version_dir / "live" / "settings.json", new)
            return [("settings", *k) for k in changed_keys(old, new)]

    def set_definitions(self, value: defs.Definitions) -> None:
        import msgspec

        self.install_definitions(encode_definitions(msgspec.to_builtins(value)))

    def install_definitions(self, data: bytes) -> None:
        """Replace the definitions with `data` (the image's definitions.json) unless identical."""
        path = self.version_dir / "live" / "definitions.json"
        with self._writing():
            try:
                if path.read_bytes() == data:
                    return
            except FileNotFoundError:
                pass
            atomic_write(path, data, mode=0o640)
