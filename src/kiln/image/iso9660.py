"""Read a file from an ISO 9660 volume in place (the config drive clouds attach as a CD).

Enough of ECMA-119 for user data: the primary volume descriptor (label, root directory),
directory records, and Rock Ridge `NM` names (what `genisoimage -r` / cloud-localds write,
so `user-data` keeps its real name). Without Rock Ridge the ISO name is matched with its
`;1` version and a trailing dot removed, case-blind.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from kiln.core.errors import KilnError

ReadAt = Callable[[int, int], bytes]
SECTOR = 2048
_PVD_OFFSET = 16 * SECTOR


def volume_label(read_at: ReadAt) -> str | None:
    """The volume identifier of an ISO 9660 volume, or None if this is not one."""
    pvd = read_at(_PVD_OFFSET, SECTOR)
    if len(pvd) < SECTOR or pvd[0] != 1 or pvd[1:6] != b"CD001":
        return None
    return pvd[40:72].decode("ascii", errors="replace").strip() or None


def _records(data: bytes) -> Iterator[tuple[str, int, int, bool]]:
    """(name, extent sector, size, is_dir) for each record of a directory's bytes."""
    pos = 0
    while pos < len(data):
        length = data[pos]
        if length == 0:  # records do not cross sectors: skip to the next one
            pos = (pos // SECTOR + 1) * SECTOR
            continue
        rec = data[pos : pos + length]
        if len(rec) < 34:
            raise KilnError("ISO 9660: truncated directory record")
        extent, size = struct.unpack_from("<I", rec, 2)[0], struct.unpack_from("<I", rec, 10)[0]
        is_dir = bool(rec[25] & 0x02)
        name_len = rec[32]
        raw_name = rec[33 : 33 + name_len]
        pos += length
        if raw_name in (b"\x00", b"\x01"):  # . and ..
            continue
        name = _rock_ridge_name(rec[33 + name_len + (1 - name_len % 2) :])
        if name is None:
            name = raw_name.decode("ascii", errors="replace").split(";")[0].rstrip(".")
        yield name, extent, size, is_dir


def _rock_ridge_name(su: bytes) -> str | None:
    """The NM (alternate name) entry in a record's system use area, if any."""
    parts: list[bytes] = []
    pos = 0
    while pos + 4 <= len(su):
        sig, length = su[pos : pos + 2], su[pos + 2]
        if length < 4:
            break
        if sig == b"NM" and length >= 5:
            parts.append(su[pos + 5 : pos + length])
        pos += length
    return b"".join(parts).decode(errors="replace") if parts else None


def read_file(read_at: ReadAt, path: str, limit: int = 1 << 20) -> bytes:
    """The content of the file at `path` (names case-blind), at most `limit` bytes."""
    pvd = read_at(_PVD_OFFSET, SECTOR)
    if volume_label(read_at) is None:
        raise KilnError("not an ISO 9660 volume")
    root = pvd[156:190]
    extent, size = struct.unpack_from("<I", root, 2)[0], struct.unpack_from("<I", root, 10)[0]
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise KilnError(f"ISO 9660 path {path!r} names no file")
    for i, part in enumerate(parts):
        if size > limit:
            raise KilnError(f"ISO 9660: directory of {path!r} is too large")
        found = next((r for r in _records(read_at(extent * SECTOR, size)) if r[0].casefold() == part.casefold()), None)
        if found is None:
            raise KilnError(f"ISO 9660 path {path!r}: {'/'.join(parts[: i + 1])!r} not found")
        _, extent, size, is_dir = found
        if is_dir != (i < len(parts) - 1):
            raise KilnError(f"ISO 9660 path {path!r}: {'/'.join(parts[: i + 1])!r} has the wrong type")
    if size > limit:
        raise KilnError(f"ISO 9660 file {path!r} is {size} bytes; at most {limit} are read")
    data = read_at(extent * SECTOR, size)
    if len(data) < size:
        raise KilnError(f"ISO 9660 file {path!r} is truncated")
    return data
