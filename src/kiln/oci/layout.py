"""OCI image layouts: deterministic layers, config, manifest and index, and reading them back.

Everything written here is a function of its inputs only: tar entries are sorted, owned by
0:0 with empty user and group names, stamped with one mtime and carry no atime/ctime; gzip
headers have mtime 0 and no file name; JSON has sorted keys and compact separators. So
the same tree and config give the same blobs, byte for byte, and the same manifest digest.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from kiln.core.errors import KilnError

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
IMAGE_NAME = "io.kiln.image.name"  # the repository a layout's image is meant for (kiln/admin)
LAYOUT_VERSION = "1.0.0"
GZIP_LEVEL = 6

# The distribution spec's grammar for repository names and tags.
NAME_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def dumps(doc: Any) -> bytes:
    """The one JSON encoding of every blob and index.json: sorted keys, no spaces."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest or index says about a blob."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        if self.platform:
            doc["platform"] = dict(self.platform)
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Descriptor:
        if not isinstance(doc, dict):
            raise KilnError(f"{where}: expected a descriptor object")
        media, digest, size = doc.get("mediaType"), doc.get("digest"), doc.get("size")
        if not isinstance(media, str) or not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise KilnError(f"{where}: descriptor needs a mediaType and a sha256 digest, got {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise KilnError(f"{where}: descriptor size must be a non-negative integer")
        annotations = doc.get("annotations") or {}
        platform = doc.get("platform")
        return cls(media, digest, size, dict(annotations), dict(platform) if isinstance(platform, dict) else None)

    @property
    def ref_name(self) -> str | None:
        return self.annotations.get(REF_NAME)


@dataclass(frozen=True)
class Layer:
    descriptor: Descriptor  # the compressed blob
    diff_id: str  # sha256 of the uncompressed tar (the config's rootfs.diff_ids)
    entries: int


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an image config (`config` in the OCI config JSON)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # "KEY=VALUE", in order
    workdir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    exposed_ports: tuple[str, ...] = ()  # "8080/tcp"
    stop_signal: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.entrypoint:
            doc["Entrypoint"] = list(self.entrypoint)
        if self.cmd:
            doc["Cmd"] = list(self.cmd)
        if self.env:
            doc["Env"] = list(self.env)
        if self.workdir:
            doc["WorkingDir"] = self.workdir
        if self.user:
            doc["User"] = self.user
        if self.labels:
            doc["Labels"] = dict(self.labels)
        if self.exposed_ports:
            doc["ExposedPorts"] = {p: {} for p in self.exposed_ports}
        if self.stop_signal:
            doc["StopSignal"] = self.stop_signal
        return doc


# --- writing ----------------------------------------------------------------------------


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _Digester:
    """A write-only stream that hashes and counts what passes through to `out`."""

    def __init__(self, out: Writable) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        pass  # the file below is flushed when closed

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _walk(tree: Path) -> list[tuple[str, Path]]:
    """(archive name, path) for everything below `tree`, sorted by name (so a directory
    comes before what it holds)."""
    found = []
    for dirpath, dirs, files in os.walk(tree):
        base = Path(dirpath)
        rel = base.relative_to(tree).as_posix()
        prefix = "" if rel == "." else rel + "/"
        # os.walk lists symlinks to directories among `dirs` but does not descend into them.
        found += [(prefix + name, base / name) for name in [*dirs, *files]]
    return sorted(found, key=lambda entry: entry[0].encode())


def write_tar(tree: Path, out: Writable, mtime: int) -> int:
    """Write `tree` as a reproducible tar stream; returns the number of entries.

    Hardlinks inside the tree stay hardlinks (to the first name in sorted order); device
    files, FIFOs and sockets are refused since an image layer cannot carry them usefully.
    """
    seen: dict[tuple[int, int], str] = {}
    count = 0
    # typeshed wants a seekable file; a stream ("w|") only ever calls write().
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for name, path in _walk(tree):
            st = path.lstat()
            info = tarfile.TarInfo(name)
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = mtime
            if stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen:
                    info.type = tarfile.LNKTYPE
                    info.linkname = seen[key]
                else:
                    seen[key] = name
                    info.size = st.st_size
                    with path.open("rb") as f:
                        tar.addfile(info, f)
                    count += 1
                    continue
            else:
                raise KilnError(f"{path}: special files (devices, FIFOs, sockets) cannot go into an image layer")
            tar.addfile(info)
            count += 1
    return count


class LayoutWriter:
    """Writes blobs into an OCI image layout at `root`; `finish` writes the index last."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._tmp = 0

    def _temp(self) -> Path:
        self._tmp += 1
        return self.blobs / f".partial-{self._tmp}"

    def blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        (self.blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return Descriptor(media_type, digest, len(data))

    def layer(self, tree: Path, mtime: int) -> Layer:
        """Add `tree` as one gzip-compressed layer."""
        tmp = self._temp()
        with tmp.open("wb") as f:
            compressed = _Digester(f)
            with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=GZIP_LEVEL) as gz:
                plain = _Digester(gz)
                entries = write_tar(tree, plain, mtime)
        os.replace(tmp, self.blobs / compressed.digest.removeprefix("sha256:"))
        return Layer(Descriptor(MEDIA_LAYER_GZIP, compressed.digest, compressed.size), plain.digest, entries)

    def image(
        self,
        config: ImageConfig,
        layers: Sequence[Layer],
        *,
        created: int,
        arch: str = "amd64",
        history: Sequence[Mapping[str, str]] = (),
    ) -> tuple[Descriptor, Descriptor]:
        """Write the config and manifest blobs; returns (manifest, config) descriptors."""
        doc = {
            "architecture": arch,
            "os": "linux",
            "created": rfc3339(created),
            "config": config.to_json(),
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created": rfc3339(created), **h} for h in history],
        }
        cfg = self.blob(dumps(doc), MEDIA_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": cfg.to_json(),
            "layers": [layer.descriptor.to_json() for layer in layers],
        }
        m = self.blob(dumps(manifest), MEDIA_MANIFEST)
        return Descriptor(m.media_type, m.digest, m.size, platform={"architecture": arch, "os": "linux"}), cfg

    def finish(self, manifests: Sequence[Descriptor]) -> None:
        (self.root / "oci-layout").write_bytes(dumps({"imageLayoutVersion": LAYOUT_VERSION}))
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [m.to_json() for m in manifests]}
        (self.root / "index.json").write_bytes(dumps(index))


def tagged(manifest: Descriptor, tag: str, name: str = "") -> Descriptor:
    """`manifest` as index.json lists it: with its ref name (the tag) and image name."""
    annotations = {REF_NAME: tag, **({IMAGE_NAME: name} if name else {})}
    return Descriptor(manifest.media_type, manifest.digest, manifest.size, annotations, manifest.platform)


# --- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """One image manifest of a layout, parsed."""

    descriptor: Descriptor
    manifest: Mapping[str, Any]
    config_descriptor: Descriptor
    config: Mapping[str, Any]
    layers: tuple[Descriptor, ...]

    @property
    def tag(self) -> str | None:
        return self.descriptor.ref_name

    @property
    def name(self) -> str | None:
        return self.descriptor.annotations.get(IMAGE_NAME)


class Layout:
    """A read-only view of an OCI image layout directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        marker = self.root / "oci-layout"
        if not marker.is_file():
            raise KilnError(f"{self.root}: not an OCI image layout (no oci-layout file)")
        try:
            version = json.loads(marker.read_bytes()).get("imageLayoutVersion")
            index = json.loads((self.root / "index.json").read_bytes())
        except (OSError, ValueError, AttributeError) as e:
            raise KilnError(f"{self.root}: unreadable oci-layout or index.json: {e}") from None
        if version != LAYOUT_VERSION:
            raise KilnError(f"{marker}: imageLayoutVersion {version!r} is not {LAYOUT_VERSION}")
        entries = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(entries, list):
            raise KilnError(f"{self.root}/index.json: 'manifests' must be a list")
        self.manifests = tuple(
            Descriptor.from_json(d, f"{self.root}/index.json: manifests[{i}]") for i, d in enumerate(entries)
        )

    def blob_path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise KilnError(f"{self.root}: unsupported digest {digest!r}")
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def read_blob(self, desc: Descriptor) -> bytes:
        """A small blob, checked against its descriptor's size and digest."""
        path = self.blob_path(desc.digest)
        try:
            data = path.read_bytes()
        except OSError:
            raise KilnError(f"{self.root}: blob {desc.digest} is missing") from None
        if len(data) != desc.size or sha256_digest(data) != desc.digest:
            raise KilnError(f"{path}: content does not match its digest and size")
        return data

    def verify_blob(self, desc: Descriptor) -> None:
        """Stream a (large) blob through sha256 and compare with its descriptor."""
        path = self.blob_path(desc.digest)
        h, size = hashlib.sha256(), 0
        try:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
        except OSError:
            raise KilnError(f"{self.root}: blob {desc.digest} is missing") from None
        if size != desc.size or "sha256:" + h.hexdigest() != desc.digest:
            raise KilnError(f"{path}: content does not match its digest and size")

    def _json(self, desc: Descriptor) -> dict[str, Any]:
        doc = json.loads(self.read_blob(desc))
        if not isinstance(doc, dict):
            raise KilnError(f"{self.blob_path(desc.digest)}: expected a JSON object")
        return doc

    def image(self, desc: Descriptor) -> Image:
        if desc.media_type != MEDIA_MANIFEST:
            raise KilnError(
                f"{self.root}: {desc.digest} is a {desc.media_type}, not a single-platform image manifest"
            )
        manifest = self._json(desc)
        where = f"{self.blob_path(desc.digest)}"
        cfg = Descriptor.from_json(manifest.get("config"), f"{where}: config")
        layers = tuple(
            Descriptor.from_json(d, f"{where}: layers[{i}]") for i, d in enumerate(manifest.get("layers") or [])
        )
        return Image(desc, manifest, cfg, self._json(cfg), layers)

    def select(self, tag: str | None = None) -> Image:
        """The image whose ref name is `tag`, or with `tag` None the only image there is."""
        for d in self.manifests:
            if tag is not None and d.ref_name == tag:
                return self.image(d)
        if tag is None and len(self.manifests) == 1:
            return self.image(self.manifests[0])
        names = ", ".join(sorted(d.ref_name or d.digest for d in self.manifests)) or "none"
        what = f"no image tagged '{tag}'" if tag is not None else "more than one image; name a tag"
        raise KilnError(f"{self.root}: {what} (images: {names})")
