"""Assemble the GPT disk image from partition images, with plain file writes.

No loop devices and no mounts: Kiln's GPT code writes the table, partition images are
copied in at their offsets (sparsely), and the file stays sparse where partitions are empty.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from kiln.build import tools
from kiln.core.errors import KilnError
from kiln.image import gpt, layout
from kiln.variant import Variant

MiB = 1 << 20
NAMESPACE = uuid.UUID("4b494c4e-6469-736b-0000-000000000000")


def disk_size(v: Variant) -> int:
    p = v.partitions
    return MiB + p.efi + 2 * (p.boot + p.root + p.hash) + p.private + p.data + MiB


def plan(v: Variant, build_id: str) -> gpt.Table:
    sizes = {
        "efi": v.partitions.efi,
        "boot": v.partitions.boot,
        "root": v.partitions.root,
        "hash": v.partitions.hash,
        "private": v.partitions.private,
        "data": None,
    }
    specs = [
        (s.name, s.type_guid, uuid.uuid5(NAMESPACE, f"{build_id}:{s.name}"), sizes[s.key]) for s in layout.PARTITIONS
    ]
    return gpt.plan(uuid.uuid5(NAMESPACE, f"{build_id}:disk"), disk_size(v), specs)


def assemble(path: Path, v: Variant, build_id: str, images: dict[str, Path]) -> gpt.Table:
    """Write the disk: slot A from `images` (keys efi/boot/root/hash), slot B left empty."""
    table = plan(v, build_id)
    by_name = {p.name: p for p in table.partitions}
    with open(path, "wb") as f:
        f.truncate(table.disk_size)
    with open(path, "r+b") as f:
        gpt.write_gpt(f, table)
        f.flush()
        fd = f.fileno()
        for key, src in images.items():
            name = layout.part_name(key, None if key == "efi" else "A")
            part = by_name[name]
            if src.stat().st_size > part.size:
                raise KilnError(
                    f"{src.name} ({src.stat().st_size} bytes) does not fit partition {name} ({part.size} bytes)"
                )
            tools.copy_sparse(src, fd, part.offset)
        os.fsync(fd)
    return table
