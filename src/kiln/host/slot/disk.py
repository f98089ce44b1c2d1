"""Where the slots live: partitions of the running host's disk, or of a disk image file.

On a host, partitions are block devices found by their GPT names (the kernel exports them
as PARTNAME); from a workstation, the same partitions are byte ranges of an image file.
Both are a `Region` (path, offset, size), so the grubenv and image-writing code is shared.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kiln.core.errors import KilnError
from kiln.image import fat, grubenv, layout

SYS_BLOCK = Path("/sys/class/block")


@dataclass(frozen=True)
class Region:
    path: Path
    offset: int
    size: int

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > self.size:
            raise KilnError(f"read outside {self.path} region ({offset}+{size} > {self.size})")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, size, self.offset + offset)
        finally:
            os.close(fd)


class Disk:
    """The Kiln partitions of one disk, by GPT name."""

    def __init__(self, regions: dict[str, Region], description: str) -> None:
        self.regions = regions
        self.description = description

    def region(self, name: str) -> Region:
        if name not in self.regions:
            raise KilnError(f"partition {name} not found on {self.description}")
        return self.regions[name]

    @classmethod
    def from_image(cls, path: Path) -> Disk:
        from kiln.image import gpt  # not needed on the host's boot path

        size = path.stat().st_size
        with open(path, "rb") as f:
            table = gpt.read_gpt(f, size)
        regions = {p.name: Region(path, p.offset, p.size) for p in table.partitions}
        return cls(regions, str(path))

    @classmethod
    def from_host(cls, sys_block: Path = SYS_BLOCK, dev: Path = Path("/dev")) -> Disk:
        regions: dict[str, Region] = {}
        wanted = {s.name for s in layout.PARTITIONS}
        for entry in sorted(sys_block.iterdir()) if sys_block.is_dir() else []:
            try:
                uevent = (entry / "uevent").read_text()
            except OSError:
                continue
            info = dict(line.split("=", 1) for line in uevent.splitlines() if "=" in line)
            name = info.get("PARTNAME")
            if name in wanted:
                if name in regions:
                    raise KilnError(f"two partitions are named {name}; cannot tell which disk is the OS disk")
                size = int((entry / "size").read_text()) * 512
                regions[name] = Region(dev / info["DEVNAME"], 0, size)
        if not regions:
            raise KilnError("no Kiln partitions found on this machine (is this a Kiln host?)")
        return cls(regions, "this host")


class GrubenvStore:
    """The grubenv file on the ESP, read and rewritten in place (same bytes, same place).

    GRUB's save_env writes through the file's existing sectors, and so do we: the FAT
    directory is never touched. Kiln keeps its variables within the first 512-byte sector,
    so a torn 1024-byte write cannot mix old and new slot state.
    """

    def __init__(self, disk: Disk) -> None:
        self.esp = disk.region(layout.part_name("efi"))
        extent = fat.find_file(self.esp.read, layout.GRUBENV_PATH)
        if extent.length != grubenv.SIZE:
            raise KilnError(
                f"{layout.GRUBENV_PATH} on {disk.description} is {extent.length} bytes, expected {grubenv.SIZE}"
            )
        self.offset = self.esp.offset + extent.offset

    def read(self) -> dict[str, str]:
        fd = os.open(self.esp.path, os.O_RDONLY)
        try:
            return grubenv.parse(os.pread(fd, grubenv.SIZE, self.offset))
        finally:
            os.close(fd)

    def write(self, env: dict[str, str]) -> None:
        if not grubenv.fits_first_sector(env):
            raise KilnError("slot state does not fit the first sector of the grubenv")
        block = grubenv.serialize(env)
        fd = os.open(self.esp.path, os.O_WRONLY)
        try:
            if os.pwrite(fd, block, self.offset) != len(block):
                raise KilnError(f"short write to the grubenv on {self.esp.path}")
            os.fsync(fd)
        finally:
            os.close(fd)


def write_partition(region: Region, chunks: Iterable[bytes], *, digest: bool = True) -> tuple[int, str | None]:
    """Stream `chunks` into a partition from its start; returns (bytes written, sha256, or
    None with `digest=False`: for an image checked otherwise, as root by its verity tree).

    Memory stays bounded by the chunk size. Fails before writing past the partition's end.
    """
    import hashlib  # OpenSSL start-up is not free under emulation; only writers pay it

    h = hashlib.sha256() if digest else None
    written = 0
    fd = os.open(region.path, os.O_WRONLY)
    try:
        for chunk in chunks:
            if written + len(chunk) > region.size:
                raise KilnError(f"image does not fit partition {region.path} ({region.size} bytes)")
            view = memoryview(chunk)
            while view:
                try:
                    n = os.pwrite(fd, view, region.offset + written)
                except OSError as e:
                    raise KilnError(f"write to {region.path} failed after {written} bytes: {e.strerror}") from e
                if n <= 0:
                    raise KilnError(f"write to {region.path} failed after {written} bytes")
                if h:
                    h.update(view[:n])
                written += n
                view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return written, h.hexdigest() if h else None
