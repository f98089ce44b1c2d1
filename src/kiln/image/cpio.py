"""A deterministic `newc` cpio writer for the initramfs.

Written here rather than with cpio(1) so entries, owners, modes and mtimes are exactly what
we say (reproducible builds) and device nodes such as /dev/console need no privileges.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO


@dataclass(frozen=True)
class Entry:
    path: str  # relative, no leading slash
    mode: int  # full st_mode including the file type bits
    data: bytes = b""  # file content, or the target for a symlink
    rdev: tuple[int, int] = (0, 0)


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _header(ino: int, e: Entry, namesize: int, mtime: int) -> bytes:
    fields = (
        ino, e.mode, 0, 0, 2 if stat.S_ISDIR(e.mode) else 1, mtime, len(e.data),
        0, 0, e.rdev[0], e.rdev[1], namesize, 0,
    )
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def write(out: BinaryIO, entries: list[Entry], mtime: int = 0) -> None:
    """Write `entries` (parents must precede children; sorted by the caller) and the trailer."""
    pos = 0
    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = e.path.encode() + b"\0"
        hdr = _header(0 if e.path == "TRAILER!!!" else ino, e, len(name), mtime)
        chunk = hdr + name
        chunk += _pad(len(chunk))
        chunk += e.data + _pad(len(e.data))
        out.write(chunk)
        pos += len(chunk)
    out.write(b"\0" * ((512 - pos % 512) % 512))
