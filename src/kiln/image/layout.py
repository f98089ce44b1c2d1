"""The Kiln disk layout: which partitions exist, in which order, with which names and types.

Shared by the builder (which writes it) and the host (which finds slots by name). Slot A
and slot B each have BOOT (kernel, initramfs, verity parameters), ROOT (erofs) and HASH
(dm-verity tree); the ESP, PRIVATE (Kiln state) and DATA (/local, /var) are shared.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
# Kiln's own partition types: deliberately not the discoverable-partitions GUIDs, so that
# systemd-gpt-auto-generator leaves them alone.
BOOT_TYPE = uuid.UUID("4b494c4e-0001-4b42-8f6f-6f7400000001")
ROOT_TYPE = uuid.UUID("4b494c4e-0002-4b52-8f6f-6f7400000002")
HASH_TYPE = uuid.UUID("4b494c4e-0003-4b48-8173-680000000003")
PRIVATE_TYPE = uuid.UUID("4b494c4e-0004-4b50-8269-760000000004")
DATA_TYPE = uuid.UUID("4b494c4e-0005-4b44-8174-610000000005")

SLOTS = ("A", "B")
GRUBENV_PATH = "/EFI/BOOT/grubenv"


@dataclass(frozen=True)
class PartSpec:
    key: str  # efi, boot, root, hash, private, data (the variant's partitions.* keys)
    name: str  # GPT partition name
    type_guid: uuid.UUID
    slot: str | None = None


PARTITIONS: tuple[PartSpec, ...] = (
    PartSpec("efi", "KILN-EFI", ESP_TYPE),
    PartSpec("boot", "KILN-BOOT-A", BOOT_TYPE, "A"),
    PartSpec("root", "KILN-ROOT-A", ROOT_TYPE, "A"),
    PartSpec("hash", "KILN-HASH-A", HASH_TYPE, "A"),
    PartSpec("boot", "KILN-BOOT-B", BOOT_TYPE, "B"),
    PartSpec("root", "KILN-ROOT-B", ROOT_TYPE, "B"),
    PartSpec("hash", "KILN-HASH-B", HASH_TYPE, "B"),
    PartSpec("private", "KILN-PRIVATE", PRIVATE_TYPE),
    PartSpec("data", "KILN-DATA", DATA_TYPE),
)


def part_name(key: str, slot: str | None = None) -> str:
    return f"KILN-{key.upper()}" + (f"-{slot}" if slot else "")


def part_number(name: str) -> int:
    """1-based GPT entry number of a partition (GRUB's gptN)."""
    for i, spec in enumerate(PARTITIONS, start=1):
        if spec.name == name:
            return i
    raise KeyError(name)
