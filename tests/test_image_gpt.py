"""kiln.image.gpt against sgdisk (verification) and sfdisk (reading it back)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from kiln.core.errors import KilnError
from kiln.image.gpt import (
    SECTOR,
    Partition,
    Table,
    grow_last_partition,
    plan,
    read_gpt,
    write_gpt,
)

MiB = 1 << 20
ESP = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
LINUX = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
DISK = uuid.UUID("6d1a4a3c-27d0-4b53-9b8a-1f7e6b0c2d11")

SPECS: list[tuple[str, uuid.UUID, uuid.UUID, int | None]] = [
    ("KILN-EFI", ESP, uuid.uuid5(DISK, "efi"), 16 * MiB),
    ("KILN-BOOT-A", LINUX, uuid.uuid5(DISK, "boot-a"), 20 * MiB),
    ("KILN-ROOT-A", LINUX, uuid.uuid5(DISK, "root-a"), 60 * MiB),
    ("KILN-HASH-A", LINUX, uuid.uuid5(DISK, "hash-a"), 1 * MiB + 1),  # rounds up to 2 MiB
    ("KILN-BOOT-B", LINUX, uuid.uuid5(DISK, "boot-b"), 20 * MiB),
    ("KILN-ROOT-B", LINUX, uuid.uuid5(DISK, "root-b"), 60 * MiB),
    ("KILN-HASH-B", LINUX, uuid.uuid5(DISK, "hash-b"), 2 * MiB),
    ("KILN-PRIVATE", LINUX, uuid.uuid5(DISK, "private"), 4 * MiB),
    ("KILN-DATA", LINUX, uuid.uuid5(DISK, "data"), None),
]


def _sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


def _sgdisk_verify(path: Path) -> str:
    out = subprocess.run(
        ["sgdisk", "-v", str(path)], check=True, capture_output=True, text=True
    ).stdout
    assert "No problems found" in out, out
    return out


def _sfdisk(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["sfdisk", "--json", str(path)], check=True, capture_output=True, text=True
    ).stdout
    table: dict[str, Any] = json.loads(out)["partitiontable"]
    return table


def _assert_sfdisk_matches(path: Path, table: Table) -> None:
    sf = _sfdisk(path)
    assert sf["label"] == "gpt"
    assert uuid.UUID(sf["id"]) == table.disk_guid
    assert sf["firstlba"] == 34
    assert sf["lastlba"] == table.disk_size // SECTOR - 34
    got = [
        (p["name"], uuid.UUID(p["type"]), uuid.UUID(p["uuid"]), p["start"], p["size"])
        for p in sf["partitions"]
    ]
    want = [(p.name, p.type_guid, p.guid, p.first_lba, p.size // SECTOR) for p in table.partitions]
    assert got == want


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, Table]:
    path = tmp_path / "disk.img"
    _sparse(path, 300 * MiB)
    table = plan(DISK, 300 * MiB, SPECS)
    with path.open("r+b") as f:
        write_gpt(f, table)
    return path, table


def test_plan_layout() -> None:
    table = plan(DISK, 300 * MiB, SPECS)
    parts = table.partitions
    assert [p.name for p in parts] == [s[0] for s in SPECS]
    assert parts[0].offset == MiB
    assert parts[3].size == 2 * MiB
    for a, b in itertools.pairwise(parts):
        assert b.offset % MiB == 0
        assert b.first_lba == a.last_lba + 1
    assert parts[-1].last_lba == 300 * MiB // SECTOR - 34


def test_write_is_valid_for_sgdisk_and_sfdisk(disk: tuple[Path, Table]) -> None:
    path, table = disk
    _sgdisk_verify(path)
    _assert_sfdisk_matches(path, table)
    mbr = path.read_bytes()[:SECTOR]
    assert mbr[510:512] == b"\x55\xaa"
    assert mbr[446 + 4] == 0xEE


def test_read_round_trips(disk: tuple[Path, Table]) -> None:
    path, table = disk
    with path.open("rb") as f:
        assert read_gpt(f, table.disk_size) == table


def test_attributes_and_unicode_names_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    _sparse(path, 8 * MiB)
    parts = (
        Partition("grüße-€", LINUX, uuid.uuid4(), 2048, 4095, attributes=(1 << 60) | 1),
        Partition("x" * 36, ESP, uuid.uuid4(), 4096, 6143),
    )
    table = Table(uuid.uuid4(), parts, 8 * MiB)
    with path.open("r+b") as f:
        write_gpt(f, table)
        assert read_gpt(f, 8 * MiB) == table
    _sgdisk_verify(path)
    _assert_sfdisk_matches(path, table)


@pytest.mark.parametrize("lba", [1, 2, 5], ids=["header", "entries", "entries-later"])
def test_corruption_is_detected(disk: tuple[Path, Table], lba: int) -> None:
    path, table = disk
    with path.open("r+b") as f:
        f.seek(lba * SECTOR + 40)
        b = f.read(1)
        f.seek(lba * SECTOR + 40)
        f.write(bytes([b[0] ^ 0xFF]))
    what = "header" if lba == 1 else "entries"
    with path.open("rb") as f, pytest.raises(KilnError, match=f"CRC32 .*{what}"):
        read_gpt(f, table.disk_size)


def test_missing_signature(tmp_path: Path) -> None:
    path = tmp_path / "blank.img"
    _sparse(path, 4 * MiB)
    with path.open("rb") as f, pytest.raises(KilnError, match="signature"):
        read_gpt(f, 4 * MiB)


def test_grow_last_partition(disk: tuple[Path, Table]) -> None:
    path, table = disk
    os.truncate(path, 500 * MiB)
    with path.open("r+b") as f:
        grown = grow_last_partition(f, 500 * MiB)
    assert grown is not None
    assert grown.partitions[:-1] == table.partitions[:-1]
    assert grown.partitions[-1].first_lba == table.partitions[-1].first_lba
    assert grown.partitions[-1].last_lba == 500 * MiB // SECTOR - 34
    _sgdisk_verify(path)
    _assert_sfdisk_matches(path, grown)
    with path.open("r+b") as f:
        assert read_gpt(f, 500 * MiB) == grown
        assert grow_last_partition(f, 500 * MiB) is None  # idempotent
    # The stale backup header inside the grown partition is gone.
    with path.open("rb") as f:
        f.seek(300 * MiB - SECTOR)
        assert f.read(SECTOR) == bytes(SECTOR)


def test_grow_on_unchanged_disk_is_noop(disk: tuple[Path, Table]) -> None:
    path, table = disk
    before = path.read_bytes()
    with path.open("r+b") as f:
        assert grow_last_partition(f, table.disk_size) is None
    assert path.read_bytes() == before


def test_plan_that_does_not_fit_names_partition() -> None:
    specs = [*SPECS[:-1], ("KILN-HUGE", LINUX, uuid.uuid4(), 200 * MiB)]
    with pytest.raises(KilnError, match=r"KILN-HUGE.*does not fit"):
        plan(DISK, 300 * MiB, specs)


def test_plan_rejects_fill_not_last() -> None:
    specs = [SPECS[-1], SPECS[0]]
    with pytest.raises(KilnError, match="KILN-DATA"):
        plan(DISK, 300 * MiB, specs)


def test_long_name_rejected() -> None:
    with pytest.raises(KilnError, match="longer than 36"):
        plan(DISK, 300 * MiB, [("N" * 37, LINUX, uuid.uuid4(), MiB)])


def test_overlap_rejected(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    _sparse(path, 8 * MiB)
    parts = (
        Partition("A", LINUX, uuid.uuid4(), 2048, 4095),
        Partition("B", LINUX, uuid.uuid4(), 4000, 6000),
    )
    with path.open("r+b") as f, pytest.raises(KilnError, match="overlap"):
        write_gpt(f, Table(uuid.uuid4(), parts, 8 * MiB))


def test_file_size_must_match(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    _sparse(path, 8 * MiB)
    with path.open("r+b") as f, pytest.raises(KilnError, match="partition table is for"):
        write_gpt(f, plan(DISK, 16 * MiB, [("A", LINUX, uuid.uuid4(), None)]))
