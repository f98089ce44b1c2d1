"""The TUF client: trusted metadata from the repository, targets streamed and verified.

python-tuf's ngclient does the verification state machine (root rotation, rollback and
freeze protection, expiry, snapshot/targets consistency, the walk through delegated
roles). Kiln adds what ngclient leaves to the application: targets are streamed (never a
whole temporary copy of a root image) with their signed length and hashes checked as the
bytes go by, and every library error is translated into `RepositoryUnreachable` or
`UntrustedUpdate` with a readable message.

A target is fetched as the specification says (5.7.3, as ngclient's `download_target`
does): from `TARGETS/dir/HASH.name` when the trusted root has `consistent_snapshot`, from
`TARGETS/dir/name` when it has not, HASH being the first hash listed for the target.
Every listed hash hashlib knows is checked; at least one must be a strong one.

Imported only by update commands: tuf costs ~0.7 s to import under emulation.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import quote

from tuf.api import exceptions
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from kiln.host.update.errors import MetadataExpired, RepositoryUnreachable, UntrustedUpdate
from kiln.host.update.fetch import HttpFetcher
from kiln.host.update.manifest import Manifest, ManifestError

if TYPE_CHECKING:
    from tuf.api.metadata import TargetFile, Targets
    from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet

MANIFEST = "manifest.json"
MANIFEST_MAX = 4 << 20
# Hashes that vouch for a target on their own (hashlib's names; all always available).
# md5 and sha1 are still checked when listed, but a target signed only with them is refused.
STRONG = frozenset({
    "sha224", "sha256", "sha384", "sha512", "sha3_224", "sha3_256", "sha3_384", "sha3_512", "blake2b", "blake2s",
})
# Left as they are in a URL path segment (RFC 3986 pchar): a target name that needs no
# escaping is fetched at exactly the URL ngclient would use; `?`, `#`, `%`, spaces and
# non-ASCII are escaped, so a name means the file of that name on a static server.
_PCHAR = "!$&'()*+,;=:@~"


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
        """The signed entry of target `name`, found by ngclient in the top-level targets or
        the delegated role that the delegation tree assigns it to."""
        with translated(f"looking up target {name}", self.fetcher.fetched):
            info = self.updater.get_targetinfo(name)
        if info is None:
            raise UntrustedUpdate(f"target {name} is not in the signed targets metadata")
        return info

    def consistent_snapshot(self) -> bool:
        """The trusted root's flag (after a refresh: the newest root). ngclient keeps it in its
        trusted set and offers no public accessor; its own `download_target` reads it there."""
        return bool(self.updater._trusted_set.root.consistent_snapshot)

    def url(self, info: TargetFile) -> str:
        """Where target `info` is served: the hash prefix goes on the file name only."""
        return target_url(self.source.targets_url, info, consistent_snapshot=self.consistent_snapshot())

    def stream(self, name: str, max_length: int | None = None) -> Iterator[bytes]:
        """The target's bytes as they arrive. Raises before yielding a byte beyond the
        signed length, and after the last chunk if the length or a hash do not match:
        callers must treat everything they wrote as garbage until the iterator ends."""
        info = self.info(name)
        if max_length is not None and info.length > max_length:
            raise UntrustedUpdate(f"target {name} is {info.length} bytes; at most {max_length} are accepted")
        hashers = verifiers(name, info.hashes)
        url = self.url(info)
        read = 0
        with translated(f"downloading {name}"):
            for chunk in self.fetcher.fetch(url):
                read += len(chunk)
                if read > info.length:
                    raise UntrustedUpdate(f"target {name}: the server sent more than the signed {info.length} bytes")
                for h in hashers.values():
                    h.update(chunk)
                yield chunk
        # A connection cut short is RepositoryUnreachable from the fetcher; a whole response
        # of the wrong length is a different file than the one signed.
        if read != info.length:
            raise UntrustedUpdate(f"target {name}: the server sent {read} bytes, not the signed {info.length}")
        for algo, h in hashers.items():
            if h.hexdigest() != info.hashes[algo]:
                raise UntrustedUpdate(
                    f"target {name}: {algo} {h.hexdigest()} does not match the signed {info.hashes[algo]}"
                )

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


def verifiers(name: str, hashes: Mapping[str, str]) -> dict[str, hashlib._Hash]:
    """A fresh hasher for every listed algorithm hashlib knows (so sha512-only targets work),
    or UntrustedUpdate when none of them is strong: then nothing vouches for the bytes."""
    out = {}
    for algo in hashes:
        try:
            h = hashlib.new(algo)
        except (ValueError, TypeError):
            continue  # unknown here: another listed hash has to vouch for the target
        if h.digest_size:  # shake_*: no fixed digest, not a TUF hash
            out[algo] = h
    if not any(h.name in STRONG for h in out.values()):
        raise UntrustedUpdate(
            f"target {name} lists no hash Kiln can verify ({', '.join(hashes) or 'none'}); "
            f"needs one of {', '.join(sorted(STRONG))}"
        )
    return out


def target_url(base: str, info: TargetFile, *, consistent_snapshot: bool) -> str:
    """The URL of target `info` under `base`: `dir/HASH.name` (consistent snapshots, HASH
    the first listed, as ngclient picks it) or `dir/name`. Each segment is escaped on its
    own; a path with an empty, `.` or `..` segment would leave the targets directory and is
    refused."""
    *dirs, name = info.path.split("/")
    if any(part in ("", ".", "..") for part in (*dirs, name)):
        raise UntrustedUpdate(f"target {info.path!r}: not a relative path inside the targets directory")
    if consistent_snapshot:
        name = f"{next(iter(info.hashes.values()))}.{name}"
    return "/".join([base.rstrip("/"), *(quote(part, safe=_PCHAR) for part in (*dirs, name))])


class CachedTargets:
    """The signed targets of cached, verified metadata: the top-level role and the delegated
    roles ngclient cached (`<quoted role>.json`), searched in the specification's order
    (5.6.7: pre-order, depth first, stopping at terminating delegations)."""

    def __init__(self, trusted: TrustedMetadataSet, metadata: Path, max_delegations: int = 32) -> None:
        self.trusted = trusted
        self.metadata = metadata
        self.max_delegations = max_delegations  # ngclient's default

    def get(self, name: str) -> TargetFile | None:
        todo = [("targets", "root")]
        seen: set[str] = set()
        while todo and len(seen) <= self.max_delegations:
            role, parent = todo.pop()
            if role in seen:
                continue
            targets = self._role(role, parent)
            if name in targets.targets:
                return targets.targets[name]
            seen.add(role)
            if targets.delegations is None:
                continue
            children = []
            for child, terminating in targets.delegations.get_roles_for_target(name):
                children.append((child, role))
                if terminating:
                    todo = []
                    break
            todo.extend(reversed(children))
        return None

    def _role(self, role: str, parent: str) -> Targets:
        if role == "targets":
            return self.trusted.targets
        if self.trusted.contains(role, parent):  # looked up before, from the same parent
            return cast("Targets", self.trusted[role])
        path = self.metadata / f"{quote(role, safe='')}.json"
        with translated(f"verifying cached metadata of delegated role {role}"):
            try:
                data = path.read_bytes()
            except OSError as e:
                raise UntrustedUpdate(f"cached metadata incomplete: {e}") from None
            return self.trusted.update_delegated_targets(data, role, parent)


def offline_targets(root: bytes, metadata: Path, at: float) -> CachedTargets:
    """The signed targets of cached metadata, checked without a network as of time `at`
    (when they were downloaded): every signature from `root` on, root rotations included;
    delegated roles as they are looked up. Raises UntrustedUpdate when the cache does not
    verify."""
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
    return CachedTargets(trusted, metadata)


def check_bytes(targets: CachedTargets, name: str, data: bytes) -> None:
    """`data` is exactly the signed target `name` (its length, every hash `stream` checks),
    or UntrustedUpdate."""
    info = targets.get(name)
    if info is None:
        raise UntrustedUpdate(f"{name} is not in the signed targets")
    if len(data) != info.length:
        raise UntrustedUpdate(f"{name} does not match its signed length/hash: {len(data)} bytes, not {info.length}")
    for algo, h in verifiers(name, info.hashes).items():
        h.update(data)
        if h.hexdigest() != info.hashes[algo]:
            raise UntrustedUpdate(
                f"{name} does not match its signed length/hash: {algo} {h.hexdigest()}, not {info.hashes[algo]}"
            )
