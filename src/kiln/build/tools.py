"""Thin wrappers over the filesystem tools the builder drives (all on plain files)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from kiln.core.run import run

# lz4 decompresses at the same speed whatever the level, so the level only trades build time
# for size. Measured on the default variant's tree (2026-12, hwdb sources already pruned): 4 KiB
# clusters (mkfs's default) at level 12 gave 115.6 MiB in 14.2 s; 64 KiB clusters with tail
# packing give 96.2 MiB in 8.6 s at level 9 (95.9 MiB in 34.9 s at 12). Debian 12's erofs-utils
# and kernel have no LZMA. Needs Linux >= 5.17 (big pclusters, ztailpacking).
EROFS_COMPRESSOR = "lz4hc,9"
EROFS_PCLUSTER = 64 * 1024


def mkfs_erofs(image: Path, tree: Path, *, mtime: int, fs_uuid: uuid.UUID) -> None:
    image.unlink(missing_ok=True)
    run([
        "mkfs.erofs", "--quiet", f"-z{EROFS_COMPRESSOR}", f"-C{EROFS_PCLUSTER}", "-Eztailpacking",
        f"-T{mtime}", f"-U{fs_uuid}", image, tree,
    ])


def mkfs_fat(image: Path, size: int, *, label: str, volume_id: int, files: Mapping[str, Path], mtime: int) -> None:
    """A FAT image of `size` bytes holding `files` (dest path inside -> source file)."""
    image.unlink(missing_ok=True)
    run(
        ["mkfs.vfat", "-C", "--invariant", "-i", f"{volume_id:08x}", "-n", label, image, str(size // 1024)],
        env={"SOURCE_DATE_EPOCH": str(mtime)},
    )
    env = {"SOURCE_DATE_EPOCH": str(mtime), "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}
    made: set[str] = set()
    for dest in files:
        parts = dest.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                run(["mmd", "-i", image, f"::/{d}"], env=env)
                made.add(d)
    for dest, src in files.items():
        os.utime(src, (mtime, mtime))
        run(["mcopy", "-m", "-i", image, src, f"::/{dest.strip('/')}"], env=env)


def zstd(src: Path, dest: Path) -> None:
    run(["zstd", "-q", "-f", "-10", "-T2", "--no-progress", src, "-o", dest])


def copy_sparse(src: Path, dest_fd: int, offset: int, chunk: int = 1 << 20) -> None:
    """Write `src` into an open disk image at `offset`, skipping all-zero chunks."""
    zero = bytes(chunk)
    with open(src, "rb") as f:
        pos = 0
        while data := f.read(chunk):
            if data != zero[: len(data)]:
                os.pwrite(dest_fd, data, offset + pos)
            pos += len(data)
