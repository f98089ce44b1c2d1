"""kiln.image.verity against veritysetup: same bytes, same root hash, and it verifies."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from kiln.core.errors import KilnError
from kiln.image.verity import VerityResult, build_hash_tree, dm_table

SALT = bytes.fromhex("5eed" * 16)
UUID = uuid.UUID("0b9c2f4e-7d1a-4c3b-9e8f-a1b2c3d4e5f6")
BLOCK = 4096


def _veritysetup_format(data: Path, hash_file: Path) -> str:
    out = subprocess.run(
        [
            "veritysetup", "format", "--format=1", "--hash=sha256",
            "--data-block-size=4096", "--hash-block-size=4096",
            f"--salt={SALT.hex()}", f"--uuid={UUID}", str(data), str(hash_file),
        ],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    m = re.search(r"^Root hash:\s*([0-9a-f]{64})\s*$", out, re.MULTILINE)
    assert m, out
    return m.group(1)


def _veritysetup_verify(data: Path, hash_file: Path, root: str) -> int:
    return subprocess.run(
        ["veritysetup", "verify", str(data), str(hash_file), root], capture_output=True
    ).returncode


def _random_data(path: Path, blocks: int, *, sparse_tail: bool = False) -> None:
    """Random blocks; with `sparse_tail` only the first and last 64 blocks hold data."""
    with path.open("wb") as f:
        if not sparse_tail:
            f.write(os.urandom(blocks * BLOCK))
            return
        f.write(os.urandom(64 * BLOCK))
        f.seek((blocks - 64) * BLOCK)
        f.write(os.urandom(64 * BLOCK))


@pytest.mark.parametrize(
    "blocks",
    [1, 2, 127, 128, 129, 5000, 20 * 1024 * 1024 // BLOCK, 128 * 128 + 1],
    ids=lambda n: f"{n}blocks",
)
def test_matches_veritysetup(tmp_path: Path, blocks: int) -> None:
    data = tmp_path / "data"
    _random_data(data, blocks, sparse_tail=blocks > 128 * 128)  # last one needs 3 levels
    ours, theirs = tmp_path / "ours.hash", tmp_path / "theirs.hash"

    res = build_hash_tree(data, ours, salt=SALT, uuid=UUID)
    root = _veritysetup_format(data, theirs)

    assert res.root_hash == root
    assert ours.read_bytes() == theirs.read_bytes()
    assert res.hash_size == ours.stat().st_size
    assert res.data_blocks == blocks
    assert res.salt == SALT.hex()
    assert res.uuid == str(UUID)
    assert _veritysetup_verify(data, ours, res.root_hash) == 0


def test_corrupted_data_fails_verify(tmp_path: Path) -> None:
    data, hash_file = tmp_path / "data", tmp_path / "hash"
    _random_data(data, 300)
    res = build_hash_tree(data, hash_file, salt=SALT, uuid=UUID)
    assert _veritysetup_verify(data, hash_file, res.root_hash) == 0
    with data.open("r+b") as f:
        f.seek(200 * BLOCK + 17)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    assert _veritysetup_verify(data, hash_file, res.root_hash) != 0


def test_size_not_multiple_of_block_raises(tmp_path: Path) -> None:
    data = tmp_path / "odd.img"
    data.write_bytes(os.urandom(BLOCK * 3 + 100))
    with pytest.raises(KilnError, match=r"odd\.img"):
        build_hash_tree(data, tmp_path / "hash", salt=SALT, uuid=UUID)


def test_empty_salt_matches_veritysetup_layout(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _random_data(data, 10)
    res = build_hash_tree(data, tmp_path / "hash", salt=b"", uuid=UUID)
    assert _veritysetup_verify(data, tmp_path / "hash", res.root_hash) == 0
    assert dm_table("/dev/a", "/dev/b", res).endswith(f"{res.root_hash} - 1 restart_on_corruption")


def test_dm_table() -> None:
    res = VerityResult(
        root_hash="ab" * 32, salt="cd" * 32, data_blocks=1000, hash_size=4096 * 10, uuid=str(UUID)
    )
    assert dm_table("/dev/sda3", "/dev/sda4", res) == (
        "0 8000 verity 1 /dev/sda3 /dev/sda4 4096 4096 1000 1 sha256 "
        f"{'ab' * 32} {'cd' * 32} 1 restart_on_corruption"
    )
    assert dm_table("/dev/x", "/dev/y", res, restart_on_corruption=False).endswith("cd" * 32)
