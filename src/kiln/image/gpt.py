"""GUID Partition Table writer and reader (UEFI spec 2.10 §5.3).

Kiln lays out its disk image itself so building needs no root, no loop devices and no
sgdisk; the tests check the result with sgdisk and sfdisk. The same code grows the last
partition on first boot when the image was written to a bigger disk.
"""

from __future__ import annotations

import itertools
import os
import struct
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO

from kiln.core.errors import KilnError

SECTOR = 512
MiB = 1 << 20
NUM_ENTRIES = 128
ENTRY_SIZE = 128
ENTRY_SECTORS = NUM_ENTRIES * ENTRY_SIZE // SECTOR  # 32
FIRST_USABLE = 2 + ENTRY_SECTORS  # 34
MAX_NAME = 36  # UTF-16 code units in the 72-byte name field

_SIGNATURE = b"EFI PART"
_REVISION = 0x00010000
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # 92 bytes
_ENTRY = struct.Struct("<16s16sQQQ72s")  # 128 bytes
_MBR_ENTRY = struct.Struct("<B3sB3sII")


@dataclass(frozen=True)
class Partition:
    """One GPT entry; `last_lba` is inclusive, as on disk."""

    name: str
    type_guid: uuid.UUID
    guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int = 0

    @property
    def offset(self) -> int:
        return self.first_lba * SECTOR

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * SECTOR


@dataclass(frozen=True)
class Table:
    """A whole partition table; partitions are in slot order (slot 1 first)."""

    disk_guid: uuid.UUID
    partitions: tuple[Partition, ...]
    disk_size: int


@dataclass(frozen=True)
class _Header:
    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: uuid.UUID
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int


def _last_sector(disk_size: int) -> int:
    if disk_size % SECTOR:
        raise KilnError(f"disk size {disk_size} is not a multiple of {SECTOR} bytes")
    last = disk_size // SECTOR - 1
    if last - ENTRY_SECTORS - 1 < FIRST_USABLE:
        raise KilnError(f"disk size {disk_size} is too small for a GPT")
    return last


def _encode_name(name: str) -> bytes:
    if "\0" in name:
        raise KilnError(f"partition name {name!r} contains a NUL character")
    raw = name.encode("utf-16-le")
    if len(raw) > MAX_NAME * 2:
        raise KilnError(f"partition name {name!r} is longer than {MAX_NAME} UTF-16 characters")
    return raw.ljust(MAX_NAME * 2, b"\0")


def _decode_name(raw: bytes) -> str:
    units = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    end = units.index(b"\0\0") if b"\0\0" in units else len(units)
    return b"".join(units[:end]).decode("utf-16-le", errors="replace")


def _validate(table: Table) -> int:
    """Check `table` fits its disk and has no overlaps; returns the last sector's LBA."""
    last = _last_sector(table.disk_size)
    last_usable = last - ENTRY_SECTORS - 1
    if len(table.partitions) > NUM_ENTRIES:
        raise KilnError(f"{len(table.partitions)} partitions; a GPT holds at most {NUM_ENTRIES}")
    for p in table.partitions:
        _encode_name(p.name)
        if p.type_guid.int == 0:
            raise KilnError(f"partition {p.name!r} has the all-zero (unused) type GUID")
        if not FIRST_USABLE <= p.first_lba <= p.last_lba <= last_usable:
            raise KilnError(
                f"partition {p.name!r} spans LBA {p.first_lba}..{p.last_lba}, outside the "
                f"usable LBA range {FIRST_USABLE}..{last_usable}"
            )
        if not 0 <= p.attributes < 1 << 64:
            raise KilnError(f"partition {p.name!r} has invalid attributes {p.attributes:#x}")
    ordered = sorted(table.partitions, key=lambda p: p.first_lba)
    for a, b in itertools.pairwise(ordered):
        if b.first_lba <= a.last_lba:
            raise KilnError(f"partitions {a.name!r} and {b.name!r} overlap")
    return last


def _entries(partitions: Sequence[Partition]) -> bytes:
    out = bytearray()
    for p in partitions:
        out += _ENTRY.pack(
            p.type_guid.bytes_le,
            p.guid.bytes_le,
            p.first_lba,
            p.last_lba,
            p.attributes,
            _encode_name(p.name),
        )
    return bytes(out.ljust(NUM_ENTRIES * ENTRY_SIZE, b"\0"))


def _header(h: _Header) -> bytes:
    fields = (
        _SIGNATURE,
        _REVISION,
        _HEADER.size,
        0,  # header CRC, computed over the header with this field zero
        0,
        h.my_lba,
        h.alternate_lba,
        h.first_usable,
        h.last_usable,
        h.disk_guid.bytes_le,
        h.entries_lba,
        h.num_entries,
        h.entry_size,
        h.entries_crc,
    )
    raw = bytearray(_HEADER.pack(*fields))
    struct.pack_into("<I", raw, 16, zlib.crc32(raw))
    return bytes(raw.ljust(SECTOR, b"\0"))


def _protective_mbr(last: int) -> bytes:
    mbr = bytearray(SECTOR)
    # One partition of type 0xEE covering the disk (capped at 2^32-1 sectors); CHS fields
    # are the conventional "start 0/0/2, end maxed out" values every tool writes.
    mbr[446:462] = _MBR_ENTRY.pack(
        0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, min(last, 0xFFFFFFFF)
    )
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def _pwrite(f: BinaryIO, lba: int, data: bytes) -> None:
    f.seek(lba * SECTOR)
    f.write(data)


def _device_size(f: BinaryIO) -> int:
    pos = f.tell()
    size = f.seek(0, os.SEEK_END)
    f.seek(pos)
    return size


def _check_size(f: BinaryIO, disk_size: int) -> None:
    actual = _device_size(f)
    if actual != disk_size:
        raise KilnError(f"disk is {actual} bytes but the partition table is for {disk_size} bytes")


def _write_copy(f: BinaryIO, header: _Header, entries: bytes) -> None:
    _pwrite(f, header.entries_lba, entries)
    _pwrite(f, header.my_lba, _header(header))


def _headers(table: Table, last: int, entries: bytes) -> tuple[_Header, _Header]:
    crc = zlib.crc32(entries)
    primary = _Header(
        my_lba=1,
        alternate_lba=last,
        first_usable=FIRST_USABLE,
        last_usable=last - ENTRY_SECTORS - 1,
        disk_guid=table.disk_guid,
        entries_lba=2,
        num_entries=NUM_ENTRIES,
        entry_size=ENTRY_SIZE,
        entries_crc=crc,
    )
    backup = replace(primary, my_lba=last, alternate_lba=1, entries_lba=last - ENTRY_SECTORS)
    return primary, backup


def write_gpt(f: BinaryIO, table: Table) -> None:
    """Write protective MBR, primary and backup GPT to `f`, a file already `disk_size` long."""
    last = _validate(table)
    _check_size(f, table.disk_size)
    entries = _entries(table.partitions)
    primary, backup = _headers(table, last, entries)
    _pwrite(f, 0, _protective_mbr(last))
    _write_copy(f, backup, entries)
    _write_copy(f, primary, entries)
    f.flush()


def _read_exact(f: BinaryIO, offset: int, size: int, what: str) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise KilnError(f"GPT {what} at byte {offset} is truncated")
    return data


def _read_primary(f: BinaryIO) -> tuple[_Header, bytes]:
    """The primary header and raw entry array, both CRC-checked."""
    raw = _read_exact(f, SECTOR, SECTOR, "primary header")
    (sig, _rev, hsize, hcrc, _res, my_lba, alt, first_usable, last_usable, guid, entries_lba,
     num, esize, ecrc) = _HEADER.unpack_from(raw)  # fmt: skip
    if sig != _SIGNATURE:
        raise KilnError(f"no GPT: primary header signature is {sig!r}, not {_SIGNATURE!r}")
    if not _HEADER.size <= hsize <= SECTOR:
        raise KilnError(f"GPT primary header size {hsize} is invalid")
    check = bytearray(raw[:hsize])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != hcrc:
        raise KilnError("GPT primary header CRC32 mismatch: the header is corrupt")
    if my_lba != 1:
        raise KilnError(f"GPT primary header claims to be at LBA {my_lba}, not 1")
    if esize < ENTRY_SIZE or esize % 8 or not 0 < num <= 1024:
        raise KilnError(f"GPT primary header has invalid entry geometry {num} x {esize}")
    entries = _read_exact(f, entries_lba * SECTOR, num * esize, "partition entries")
    if zlib.crc32(entries) != ecrc:
        raise KilnError("GPT primary partition entries CRC32 mismatch: the entries are corrupt")
    header = _Header(
        my_lba=my_lba,
        alternate_lba=alt,
        first_usable=first_usable,
        last_usable=last_usable,
        disk_guid=uuid.UUID(bytes_le=guid),
        entries_lba=entries_lba,
        num_entries=num,
        entry_size=esize,
        entries_crc=ecrc,
    )
    return header, entries


def read_gpt(f: BinaryIO, disk_size: int) -> Table:
    """Read the primary GPT, checking signature and both CRCs; empty slots are skipped."""
    header, raw = _read_primary(f)
    parts = _parse_entries(raw, header.num_entries, header.entry_size)
    return Table(disk_guid=header.disk_guid, partitions=parts, disk_size=disk_size)


def grow_last_partition(f: BinaryIO, new_disk_size: int) -> Table | None:
    """Move the backup GPT to the end of an enlarged disk and extend the last partition.

    The backup copy is written first and the primary last, so a crash in between leaves
    the old primary (which still points at the intact old backup) as the valid table.
    Returns the new table, or None if the disk already ends where the table says.
    """
    _check_size(f, new_disk_size)
    header, raw = _read_primary(f)
    if header.num_entries * header.entry_size > ENTRY_SECTORS * SECTOR:
        raise KilnError(
            f"GPT has {header.num_entries} entries of {header.entry_size} bytes; "
            f"more than {ENTRY_SECTORS} sectors cannot be relocated"
        )
    last = _last_sector(new_disk_size)
    if last < header.alternate_lba:
        raise KilnError(
            f"disk shrank: {new_disk_size} bytes, but the GPT backup header is at "
            f"LBA {header.alternate_lba}"
        )
    new_last_usable = last - ENTRY_SECTORS - 1
    # The partition that ends last, by slot, so the slot numbering stays as it was.
    ends = {
        i: struct.unpack_from("<Q", raw, i * header.entry_size + 40)[0]
        for i in range(header.num_entries)
        if raw[i * header.entry_size : i * header.entry_size + 16] != bytes(16)
    }
    if not ends:
        raise KilnError("GPT has no partitions to grow")
    tail = max(ends, key=lambda i: ends[i])
    if last == header.alternate_lba and ends[tail] == new_last_usable:
        return None
    entries = bytearray(raw)
    struct.pack_into("<Q", entries, tail * header.entry_size + 40, new_last_usable)
    parts = _parse_entries(bytes(entries), header.num_entries, header.entry_size)
    table = Table(disk_guid=header.disk_guid, partitions=parts, disk_size=new_disk_size)
    _validate(table)

    primary = replace(
        header, alternate_lba=last, last_usable=new_last_usable, entries_crc=zlib.crc32(entries)
    )
    backup = replace(primary, my_lba=last, alternate_lba=1, entries_lba=last - ENTRY_SECTORS)
    _write_copy(f, backup, bytes(entries))
    _sync(f)
    _pwrite(f, 0, _protective_mbr(last))
    _write_copy(f, primary, bytes(entries))
    _sync(f)
    if header.alternate_lba != last:
        # The old backup header now lies inside the grown partition; a stale "EFI PART"
        # there could be mistaken for a table by tools that scan for one.
        _pwrite(f, header.alternate_lba, bytes(SECTOR))
        _sync(f)
    return table


def _sync(f: BinaryIO) -> None:
    """Order the writes on disk: the backup must be durable before the primary changes."""
    f.flush()
    os.fsync(f.fileno())


def _parse_entries(
    raw: bytes, num: int = NUM_ENTRIES, esize: int = ENTRY_SIZE
) -> tuple[Partition, ...]:
    """Non-empty entries in slot order."""
    parts = []
    for i in range(num):
        tguid, pguid, first, last, attrs, name = _ENTRY.unpack_from(raw, i * esize)
        if tguid == bytes(16):
            continue
        parts.append(
            Partition(
                name=_decode_name(name),
                type_guid=uuid.UUID(bytes_le=tguid),
                guid=uuid.UUID(bytes_le=pguid),
                first_lba=first,
                last_lba=last,
                attributes=attrs,
            )
        )
    return tuple(parts)


PartSpec = tuple[str, uuid.UUID, uuid.UUID, int | None]


def plan(
    disk_guid: uuid.UUID,
    disk_size: int,
    specs: Sequence[PartSpec],
    *,
    align: int = MiB,
) -> Table:
    """Lay `specs` (name, type, guid, size or None) out in order from 1 MiB, each aligned.

    Sizes are rounded up to `align`; a size of None, allowed only for the last partition,
    fills the disk to the last usable LBA.
    """
    if align <= 0 or align % SECTOR:
        raise KilnError(f"partition alignment {align} is not a positive multiple of {SECTOR}")
    last = _last_sector(disk_size)
    last_usable = last - ENTRY_SECTORS - 1
    a = align // SECTOR
    pos = -(-max(MiB // SECTOR, FIRST_USABLE) // a) * a
    parts = []
    for i, (name, type_guid, guid, size) in enumerate(specs):
        if size is None:
            if i != len(specs) - 1:
                raise KilnError(f"partition {name!r} has no size but is not the last one")
            end = last_usable
            if end < pos:
                raise KilnError(
                    f"partition {name!r} does not fit: it would start at byte {pos * SECTOR} "
                    f"but the disk ({disk_size} bytes) has no room left"
                )
        else:
            if size <= 0:
                raise KilnError(f"partition {name!r} has invalid size {size}")
            sectors = -(-size // align) * a
            end = pos + sectors - 1
            if end > last_usable:
                raise KilnError(
                    f"partition {name!r} does not fit: {sectors * SECTOR} bytes at byte "
                    f"{pos * SECTOR} would run past the end of usable space at byte "
                    f"{(last_usable + 1) * SECTOR} of a {disk_size}-byte disk",
                    hint="make the disk bigger or the partitions smaller",
                )
        parts.append(Partition(name, type_guid, guid, pos, end))
        pos = -(-(end + 1) // a) * a
    table = Table(disk_guid=disk_guid, partitions=tuple(parts), disk_size=disk_size)
    _validate(table)
    return table
