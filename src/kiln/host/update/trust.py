"""The TUF client: trusted metadata from the repository, targets streamed and verified.

python-tuf's ngclient does the verification state machine (root rotation, rollback and
freeze protection, expiry, snapshot/targets consistency). Kiln adds what ngclient leaves
to the application: targets are streamed (never a whole temporary copy of a root image)
with their signed length and sha256 checked as the bytes go by, and every library error
is translated into `RepositoryUnreachable` or `UntrustedUpdate` with a readable message.

Imported only by update commands: tuf costs ~0.7 s to import under emulation.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuf.api import exceptions
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from kiln.host.update.errors import MetadataExpired, RepositoryUnreachable, UntrustedUpdate
from kiln.host.update.fetch import HttpFetcher
from kiln.host.update.manifest import Manifest, ManifestError

if TYPE_CHECKING:
    from tuf.api.metadata import TargetFile

MANIFEST = "manifest.json"
MANIFEST_MAX = 4 << 20


@dataclass(frozen=True)
class Source:
    """Where the repository is and what to trust: the root baked into the image."""

    metadata_url: str
    targets_url: str
    root: bytes


@contextlib.contextmanager
def translated(what: str, fetched: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Turn python-tuf's exceptions into Kiln's two families, naming what was being done
    and, where python-tuf's message does not, the file (`fetched()`: the last one asked
    for, or "")."""

    def file() -> str:
        name = fetched().rsplit("/", 1)[-1]
        return f"{name}: " if name else ""

    try:
        yield
    except exceptions.ExpiredMetadataError as e:
        raise MetadataExpired(f"{what}: {e}", hint="the repository must be refreshed (kiln repo refresh)") from None
    except exceptions.RepositoryError as e:
        raise UntrustedUpdate(f"{what}: {file()}{type(e).__name__}: {e}") from None
    except exceptions.DownloadLengthMismatchError as e:  # more bytes than signed (or than a role may have)
        raise UntrustedUpdate(f"{what}: {file()}{e}") from None
    except exceptions.DownloadError as e:
        raise RepositoryUnreachable(f"{what}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:  # malformed metadata that fails to parse
        raise UntrustedUpdate(f"{what}: {file()}malformed metadata: {e}") from None


class _Recording(FetcherInterface):
    """A fetcher that remembers the last URL asked for, so errors can name the file."""

    def __init__(self, inner: FetcherInterface) -> None:
        self.inner = inner
        self.last = ""

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.last = url
        return self.inner.fetch(url)

    def fetched(self) -> str:
        return self.last


class TrustedRepo:
    def __init__(self, source: Source, metadata_dir: Path, fetcher: FetcherInterface | None = None) -> None:
        self.source = source
        self.metadata_dir = metadata_dir
        self.fetcher = _Recording(fetcher or HttpFetcher())
        metadata_dir.mkdir(parents=True, exist_ok=True)
        with translated("loading the trusted root"):
            self.updater = Updater(
                metadata_dir=str(metadata_dir),
                metadata_base_url=source.metadata_url,
                target_base_url=source.targets_url,
                fetcher=self.fetcher,
                config=UpdaterConfig(app_user_agent="kiln-update"),
                bootstrap=source.root,
            )

    def refresh(self) -> Manifest:
        """Refresh the top-level metadata and return the verified manifest."""
        with translated(f"refreshing metadata from {self.source.metadata_url}", self.fetcher.fetched):
            self.updater.refresh()
        data = b"".join(self.stream(MANIFEST, max_length=MANIFEST_MAX))
        try:
            return Manifest.from_bytes(data)
        except ManifestError as e:
            raise UntrustedUpdate(f"signed {MANIFEST} is malformed: {e}") from None

    def info(self, name: str) -> TargetFile:
        with translated(f"looking up target {name}"):
            info = self.updater.get_targetinfo(name)
        if info is None:
            raise UntrustedUpdate(f"target {name} is not in the signed targets metadata")
        if "sha256" not in info.hashes:
            raise UntrustedUpdate(f"target {name} has no sha256 in the signed targets metadata")
        return info

    def stream(self, name: str, max_length: int | None = None) -> Iterator[bytes]:
        """The target's bytes as they arrive. Raises before yielding a byte beyond the
        signed length, and after the last chunk if the length or sha256 do not match:
        callers must treat everything they wrote as garbage until the iterator ends."""
        info = self.info(name)
        if max_length is not None and info.length > max_length:
            raise UntrustedUpdate(f"target {name} is {info.length} bytes; at most {max_length} are accepted")
        expected = info.hashes["sha256"]
        url = f"{self.source.targets_url.rstrip('/')}/{expected}.{name}"
        digest = hashlib.sha256()
        read = 0
        with translated(f"downloading {name}"):
            for chunk in self.fetcher.fetch(url):
                read += len(chunk)
                if read > info.length:
                    raise UntrustedUpdate(f"target {name}: the server sent more than the signed {info.length} bytes")
                digest.update(chunk)
                yield chunk
        if read != info.length:
            raise RepositoryUnreachable(f"target {name}: got {read} of {info.length} bytes")
        if digest.hexdigest() != expected:
            raise UntrustedUpdate(f"target {name}: sha256 {digest.hexdigest()} does not match the signed {expected}")

    def save(self, name: str, dest: Path, max_length: int) -> None:
        """Download a (small) target to `dest`, verified before it appears there."""
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            with open(tmp, "wb") as f:
                for chunk in self.stream(name, max_length=max_length):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)

    def snapshot_metadata(self, dest: Path) -> None:
        """Copy the verified metadata (root history, timestamp, snapshot, targets) so the
        boot-time migrator can check cached migrations offline."""
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(self.metadata_dir, dest, symlinks=True)


def offline_targets(root: bytes, metadata: Path, at: float) -> dict[str, TargetFile]:
    """The signed targets of cached metadata, checked without a network as of time `at`
    (when they were downloaded): every signature from `root` on, root rotations included.
    Raises UntrustedUpdate when the cache does not verify."""
    from datetime import UTC, datetime

    from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet  # no public offline mode
    from tuf.ngclient.config import EnvelopeType

    with translated(f"verifying cached metadata in {metadata}"):
        try:
            trusted = TrustedMetadataSet(root, EnvelopeType.METADATA)
            trusted.reference_time = datetime.fromtimestamp(at, UTC)
            version = trusted.root.version + 1
            while (metadata / "root_history" / f"{version}.root.json").exists():
                trusted.update_root((metadata / "root_history" / f"{version}.root.json").read_bytes())
                version += 1
            trusted.update_timestamp((metadata / "timestamp.json").read_bytes())
            trusted.update_snapshot((metadata / "snapshot.json").read_bytes())
            trusted.update_targets((metadata / "targets.json").read_bytes())
        except OSError as e:
            raise UntrustedUpdate(f"cached metadata incomplete: {e}") from None
        return dict(trusted.targets.targets)


def check_bytes(targets: dict[str, TargetFile], name: str, data: bytes) -> None:
    """`data` is exactly the signed target `name`, or UntrustedUpdate."""
    info = targets.get(name)
    if info is None:
        raise UntrustedUpdate(f"{name} is not in the signed targets")
    try:
        info.verify_length_and_hashes(data)
    except exceptions.LengthOrHashMismatchError as e:
        raise UntrustedUpdate(f"{name} does not match its signed length/hash: {e}") from None
