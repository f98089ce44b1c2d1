"""dm-verity hash tree and superblock, byte-identical to `veritysetup format --format=1`.

Written in Python so the image build needs no root, no loop devices and no cryptsetup;
the tests pin every byte against veritysetup itself.

Hash file layout (as veritysetup lays it out): block 0 is the superblock (512 bytes of
header, zero-padded to a hash block); the tree follows from block 1, *top level first*:
the level nearest the root sits at the lowest offset and the level hashing the data blocks
comes last. Each hash block holds `block_size // 32` SHA-256 digests, zero-padded. A data
area of a single block has no tree at all: the root hash is that block's salted digest and
the hash file is just the superblock.
"""

from __future__ import annotations

import hashlib
import struct
import uuid as uuid_mod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kiln.core.errors import KilnError

_SIGNATURE = b"verity\0\0"
_HASH_TYPE = 1  # "format 1": salt is hashed *before* the block; digests padded to 2^n
_ALGORITHM = "sha256"
_DIGEST = 32
_MAX_SALT = 256
_SB_SIZE = 512
# struct verity_sb (cryptsetup lib/verity/verity.c), little-endian, 512 bytes in total.
_SB = struct.Struct("<8sII16s32sIIQH6x256s168x")
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class VerityResult:
    """What the kernel needs to open the verity device (see `dm_table`)."""

    root_hash: str
    salt: str
    data_blocks: int
    hash_size: int
    uuid: str
    block_size: int = 4096


def _level_sizes(data_blocks: int, per_block_bits: int) -> list[int]:
    """Hash blocks per level, bottom (data-hashing) level first; cryptsetup's level count."""
    levels = 0
    while per_block_bits * levels < 64 and (data_blocks - 1) >> (per_block_bits * levels):
        levels += 1
    return [
        (data_blocks + (1 << ((i + 1) * per_block_bits)) - 1) >> ((i + 1) * per_block_bits)
        for i in range(levels)
    ]


def _superblock(salt: bytes, disk_uuid: uuid_mod.UUID, block_size: int, data_blocks: int) -> bytes:
    sb = _SB.pack(
        _SIGNATURE,
        1,  # superblock version
        _HASH_TYPE,
        disk_uuid.bytes,
        _ALGORITHM.encode(),
        block_size,
        block_size,
        data_blocks,
        len(salt),
        salt,
    )
    assert len(sb) == _SB_SIZE
    return sb.ljust(block_size, b"\0")


def _hash_blocks(data: bytes | bytearray, salted: hashlib._Hash, block_size: int) -> bytearray:
    """Concatenated salted digests of each `block_size` block of `data`."""
    out = bytearray()
    view = memoryview(data)
    for pos in range(0, len(view), block_size):
        h = salted.copy()
        h.update(view[pos : pos + block_size])
        out += h.digest()
    return out


def _pad(digests: bytearray, block_size: int) -> bytearray:
    rem = len(digests) % block_size
    if rem:
        digests += bytes(block_size - rem)
    return digests


def _tree(
    chunks: Iterable[bytes], data_blocks: int, salt: bytes, block_size: int, where: str
) -> tuple[list[bytearray], str]:
    """Hash levels (bottom first, each zero-padded to whole blocks) and the root hash of
    the data given as `chunks` (whole blocks, `data_blocks` of them). Streams the data;
    only the levels (1/128 of the data) are held in memory."""
    per_block_bits = (block_size // _DIGEST).bit_length() - 1
    salted = hashlib.sha256(salt)
    level = bytearray()
    first_block = b""
    for buf in chunks:
        if len(buf) % block_size:
            raise KilnError(f"verity data {where} is not a whole number of {block_size}-byte blocks")
        if not first_block:
            first_block = bytes(buf[:block_size])
        level += _hash_blocks(buf, salted, block_size)
    if len(level) != data_blocks * _DIGEST:
        raise KilnError(f"verity data {where} has {len(level) // _DIGEST} blocks, expected {data_blocks}")
    sizes = _level_sizes(data_blocks, per_block_bits)
    levels: list[bytearray] = []  # bottom first
    if sizes:
        levels.append(_pad(level, block_size))
        for _ in sizes[1:]:
            levels.append(_pad(_hash_blocks(levels[-1], salted, block_size), block_size))
        top = levels[-1]
    else:
        top = bytearray(first_block)  # one data block: its digest is the root
    assert [len(lv) // block_size for lv in levels] == sizes
    root = salted.copy()
    root.update(top)
    return levels, root.hexdigest()


def _read_blocks(f: BinaryIO, length: int, chunk: int) -> Iterator[bytes]:
    left = length
    while left:
        buf = f.read(min(chunk, left))
        if not buf:
            return
        left -= len(buf)
        yield buf


def build_hash_tree(
    data_path: Path,
    hash_path: Path,
    *,
    salt: bytes,
    uuid: uuid_mod.UUID,
    block_size: int = 4096,
) -> VerityResult:
    """Write `hash_path` (superblock + tree) for `data_path` and return the root hash."""
    data_path, hash_path = Path(data_path), Path(hash_path)
    if block_size < 512 or block_size > 65536 or block_size & (block_size - 1):
        raise KilnError(f"verity block_size {block_size} is not a power of two in 512..65536")
    if len(salt) > _MAX_SALT:
        raise KilnError(f"verity salt is {len(salt)} bytes; at most {_MAX_SALT} are allowed")
    size = data_path.stat().st_size
    if size == 0 or size % block_size:
        raise KilnError(
            f"verity data file {data_path} is {size} bytes, "
            f"not a non-zero multiple of the block size {block_size}",
            hint="pad the filesystem image to a whole number of blocks",
        )
    data_blocks = size // block_size
    chunk = max(block_size, _READ_CHUNK - _READ_CHUNK % block_size)
    with data_path.open("rb") as f:
        levels, root_hash = _tree(_read_blocks(f, size + 1, chunk), data_blocks, salt, block_size, str(data_path))

    with hash_path.open("wb") as out:
        out.write(_superblock(salt, uuid, block_size, data_blocks))
        for lv in reversed(levels):
            out.write(lv)
        hash_size = out.tell()

    return VerityResult(
        root_hash=root_hash,
        salt=salt.hex(),
        data_blocks=data_blocks,
        hash_size=hash_size,
        uuid=str(uuid),
        block_size=block_size,
    )


def verify(
    data: BinaryIO, hash_area: BinaryIO, *, root_hash: str, salt: str, data_blocks: int, block_size: int = 4096
) -> None:
    """Check that `data` (positioned at its first block) and `hash_area` (positioned at
    the superblock) form the verity device `root_hash` names, as the kernel will read
    them: the superblock's salt and size, every stored hash block, and the root.
    Raises KilnError saying what differs."""
    sb = hash_area.read(block_size)
    if len(sb) < _SB_SIZE:
        raise KilnError("verity hash area: too short for a superblock")
    sig, _ver, _htype, _uuid, alg, dbs, hbs, blocks, salt_len, salt_raw = _SB.unpack(sb[:_SB_SIZE])
    if sig != _SIGNATURE or alg.rstrip(b"\0") != _ALGORITHM.encode():
        raise KilnError("verity hash area: no sha256 verity superblock")
    if (dbs, hbs, blocks) != (block_size, block_size, data_blocks):
        raise KilnError(
            f"verity superblock: {blocks} blocks of {dbs}/{hbs} bytes, expected {data_blocks} of {block_size}"
        )
    if salt_raw[:salt_len].hex() != salt:
        raise KilnError("verity superblock: the salt differs from the expected one")
    chunk = _READ_CHUNK - _READ_CHUNK % block_size
    levels, computed = _tree(_read_blocks(data, data_blocks * block_size, chunk), data_blocks,
                             bytes.fromhex(salt), block_size, "area")
    if computed != root_hash:
        raise KilnError(f"verity: the data's root hash is {computed}, expected {root_hash}")
    for n, lv in enumerate(reversed(levels)):
        if hash_area.read(len(lv)) != lv:
            raise KilnError(f"verity hash area: stored level {n} (from the top) differs from the data's hashes")


def dm_table(
    data_dev: str, hash_dev: str, res: VerityResult, *, restart_on_corruption: bool = True
) -> str:
    """The device-mapper table line for `res` (hash_start is block 1: past the superblock)."""
    sectors = res.data_blocks * res.block_size // 512
    salt = res.salt or "-"
    line = (
        f"0 {sectors} verity {_HASH_TYPE} {data_dev} {hash_dev} {res.block_size} "
        f"{res.block_size} {res.data_blocks} 1 {_ALGORITHM} {res.root_hash} {salt}"
    )
    if restart_on_corruption:
        line += " 1 restart_on_corruption"
    return line
