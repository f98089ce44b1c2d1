"""Find a file's bytes inside a FAT12/16/32 filesystem without mounting it.

The running system rewrites the grubenv on the raw ESP partition in place (one aligned
write, no mount, no FAT metadata change), so it needs the file's byte extent. That is
only safe when the file's clusters are contiguous, which `find_file` insists on.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kiln.core.errors import KilnError

ReadAt = Callable[[int, int], bytes]

_ATTR_VOLUME = 0x08
_ATTR_DIR = 0x10
_ATTR_LFN = 0x0F
_DIRENT = 32


@dataclass(frozen=True)
class Extent:
    """`length` bytes of file content starting `offset` bytes into the filesystem."""

    offset: int
    length: int


@dataclass(frozen=True)
class _Entry:
    short: str
    long: str | None
    attr: int
    cluster: int
    size: int


@dataclass(frozen=True)
class _Fs:
    read_at: ReadAt
    bits: int  # 12, 16 or 32
    bytes_per_sector: int
    cluster_size: int
    fat_offset: int
    root_offset: int  # FAT12/16 fixed root directory
    root_size: int
    root_cluster: int  # FAT32 root directory chain
    data_offset: int
    clusters: int

    def cluster_offset(self, cluster: int) -> int:
        return self.data_offset + (cluster - 2) * self.cluster_size

    def next_cluster(self, cluster: int) -> int | None:
        """The FAT entry for `cluster`: the next one in the chain, or None at its end."""
        v: int
        if self.bits == 12:
            raw = self.read_at(self.fat_offset + cluster + cluster // 2, 2)
            (v,) = struct.unpack("<H", raw)
            v = v >> 4 if cluster & 1 else v & 0xFFF
            eoc, bad = 0xFF8, 0xFF7
        elif self.bits == 16:
            (v,) = struct.unpack("<H", self.read_at(self.fat_offset + 2 * cluster, 2))
            eoc, bad = 0xFFF8, 0xFFF7
        else:
            (v,) = struct.unpack("<I", self.read_at(self.fat_offset + 4 * cluster, 4))
            v &= 0x0FFFFFFF
            eoc, bad = 0x0FFFFFF8, 0x0FFFFFF7
        if v >= eoc:
            return None
        if v == bad or not 2 <= v < self.clusters + 2:
            raise KilnError(f"FAT entry for cluster {cluster} is invalid ({v:#x})")
        return v

    def chain(self, first: int) -> list[int]:
        if not 2 <= first < self.clusters + 2:
            raise KilnError(f"FAT cluster chain starts at invalid cluster {first}")
        out = [first]
        while (nxt := self.next_cluster(out[-1])) is not None:
            out.append(nxt)
            if len(out) > self.clusters:
                raise KilnError(f"FAT cluster chain from cluster {first} loops")
        return out


def _read(read_at: ReadAt, offset: int, size: int) -> bytes:
    data = read_at(offset, size)
    if len(data) != size:
        raise KilnError(f"FAT filesystem is truncated: short read of {size} bytes at {offset}")
    return data


def _open(read_at: ReadAt) -> _Fs:
    def checked(offset: int, size: int) -> bytes:
        return _read(read_at, offset, size)

    bs = checked(0, 512)
    if bs[510:512] != b"\x55\xaa":
        raise KilnError("not a FAT filesystem: boot sector signature 55AA missing")
    (bps, spc, reserved, nfats, root_entries, total16, _media, fat16) = struct.unpack_from(
        "<HBHBHHBH", bs, 11
    )
    (total32, fat32, ext_flags, _ver, root_cluster) = struct.unpack_from("<IIHHI", bs, 32)
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or nfats == 0:
        raise KilnError(f"not a FAT filesystem: bad BPB (sector {bps}, cluster {spc} sectors)")
    fat_sectors = fat16 or fat32
    total = total16 or total32
    root_sectors = (root_entries * _DIRENT + bps - 1) // bps
    first_data = reserved + nfats * fat_sectors + root_sectors
    if fat_sectors == 0 or total <= first_data:
        raise KilnError("not a FAT filesystem: FAT or data area is empty")
    clusters = (total - first_data) // spc
    bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    active = 0
    if bits == 32 and ext_flags & 0x80:  # FAT mirroring off: only the active FAT is current
        active = ext_flags & 0x0F
    return _Fs(
        read_at=checked,
        bits=bits,
        bytes_per_sector=bps,
        cluster_size=bps * spc,
        fat_offset=(reserved + active * fat_sectors) * bps,
        root_offset=(reserved + nfats * fat_sectors) * bps,
        root_size=root_sectors * bps,
        root_cluster=root_cluster,
        data_offset=first_data * bps,
        clusters=clusters,
    )


def _short_name(raw: bytes) -> str:
    base, ext = raw[:8], raw[8:11]
    if base[0] == 0x05:  # a real leading 0xE5, escaped because 0xE5 marks deleted entries
        base = b"\xe5" + base[1:]
    name = base.rstrip(b" ").decode("cp437")
    ext_s = ext.rstrip(b" ").decode("cp437")
    return f"{name}.{ext_s}" if ext_s else name


def _lfn_checksum(raw: bytes) -> int:
    s = 0
    for b in raw[:11]:
        s = (((s & 1) << 7) + (s >> 1) + b) & 0xFF
    return s


def _lfn_chars(ent: bytes) -> bytes:
    return ent[1:11] + ent[14:26] + ent[28:32]


def _entries(data: bytes) -> Iterator[_Entry]:
    """Live entries of a directory's raw bytes, with their long names when intact."""
    lfn: dict[int, bytes] = {}
    lfn_sum = -1
    for pos in range(0, len(data) - _DIRENT + 1, _DIRENT):
        ent = data[pos : pos + _DIRENT]
        if ent[0] == 0x00:
            return
        if ent[0] == 0xE5:
            lfn = {}
            continue
        attr = ent[11]
        if attr & 0x3F == _ATTR_LFN:
            seq = ent[0] & 0x1F
            if ent[0] & 0x40:  # last (first-stored) fragment starts a new long name
                lfn, lfn_sum = {}, ent[13]
            if ent[13] == lfn_sum and seq:
                lfn[seq] = _lfn_chars(ent)
            continue
        long_name = None
        if lfn and lfn_sum == _lfn_checksum(ent) and sorted(lfn) == list(range(1, len(lfn) + 1)):
            raw = b"".join(lfn[i] for i in sorted(lfn))
            text = raw.decode("utf-16-le", errors="replace")
            long_name = text.split("\0", 1)[0]
        lfn = {}
        if attr & _ATTR_VOLUME:
            continue
        hi, lo = struct.unpack_from("<H", ent, 20)[0], struct.unpack_from("<H", ent, 26)[0]
        (size,) = struct.unpack_from("<I", ent, 28)
        yield _Entry(_short_name(ent), long_name, attr, (hi << 16) | lo, size)


def _dir_bytes(fs: _Fs, cluster: int) -> bytes:
    if cluster == 0:  # the root directory (".." of a top-level directory points here too)
        if fs.bits != 32:
            return fs.read_at(fs.root_offset, fs.root_size)
        cluster = fs.root_cluster
    return b"".join(fs.read_at(fs.cluster_offset(c), fs.cluster_size) for c in fs.chain(cluster))


def _lookup(fs: _Fs, path: str) -> _Entry:
    """The directory entry of the regular file at `path`, names case-blind."""
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    if not parts:
        raise KilnError(f"FAT path {path!r} names no file")
    cluster = 0
    entry: _Entry | None = None
    for i, part in enumerate(parts):
        want = part.casefold()
        entry = next(
            (
                e
                for e in _entries(_dir_bytes(fs, cluster))
                if e.short.casefold() == want or (e.long is not None and e.long.casefold() == want)
            ),
            None,
        )
        shown = "/" + "/".join(parts[: i + 1])
        if entry is None:
            raise KilnError(f"FAT path {path!r}: {shown!r} not found")
        is_last = i == len(parts) - 1
        if not is_last and not entry.attr & _ATTR_DIR:
            raise KilnError(f"FAT path {path!r}: {shown!r} is not a directory")
        if is_last and entry.attr & _ATTR_DIR:
            raise KilnError(f"FAT path {path!r} is a directory, not a file")
        cluster = entry.cluster
    assert entry is not None
    return entry


def read_file(read_at: ReadAt, path: str, limit: int = 1 << 20) -> bytes:
    """The content of the file at `path` (fragmented or not), at most `limit` bytes."""
    fs = _open(read_at)
    entry = _lookup(fs, path)
    if entry.size > limit:
        raise KilnError(f"FAT file {path!r} is {entry.size} bytes; at most {limit} are read")
    if entry.size == 0:
        return b""
    data = b"".join(fs.read_at(fs.cluster_offset(c), fs.cluster_size) for c in fs.chain(entry.cluster))
    if len(data) < entry.size:
        raise KilnError(f"FAT file {path!r}: cluster chain is shorter than its size")
    return data[: entry.size]


def volume_label(boot_sector: bytes) -> str | None:
    """The label in a FAT boot sector (None if the sector is not FAT's)."""
    if len(boot_sector) < 512 or boot_sector[510:512] != b"\x55\xaa":
        return None
    if boot_sector[82:87] == b"FAT32":
        raw = boot_sector[71:82]
    elif boot_sector[54:59] in (b"FAT12", b"FAT16"):
        raw = boot_sector[43:54]
    else:
        return None
    return raw.decode("ascii", errors="replace").strip() or None


def find_file(read_at: Callable[[int, int], bytes], path: str) -> Extent:
    """Byte extent of the regular file at `path` ('/EFI/BOOT/grubenv'), names case-blind."""
    fs = _open(read_at)
    entry = _lookup(fs, path)
    if entry.size == 0 or entry.cluster == 0:
        raise KilnError(f"FAT file {path!r} is empty: it has no clusters to rewrite in place")
    chain = fs.chain(entry.cluster)
    if len(chain) * fs.cluster_size < entry.size:
        raise KilnError(f"FAT file {path!r}: cluster chain is shorter than its size")
    if chain != list(range(chain[0], chain[0] + len(chain))):
        raise KilnError(
            f"FAT file {path!r} is fragmented (clusters not contiguous)",
            hint="rewrite the file on a filesystem with contiguous free space",
        )
    return Extent(offset=fs.cluster_offset(chain[0]), length=entry.size)
