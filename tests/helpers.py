"""Helpers for VM tests: write a slot from a build's update artifacts, as an update will."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

from kiln.host.slot import Slots


def zstd_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    proc = subprocess.Popen(["zstd", "-dc", str(path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        while chunk := proc.stdout.read(size):
            yield chunk
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise RuntimeError(f"zstd -dc {path} failed")


def install_to_inactive(disk: Path, artifacts: Path, *, active: str = "A",
                        replace: dict[str, Path] | None = None, upgrade: bool = True) -> str:
    """clear-inactive, stream boot/root/hash into the inactive slot, mark valid, upgrade.

    `replace` substitutes an uncompressed image for one of the artifacts (to test broken
    slots). Returns the slot written."""
    manifest = json.loads((artifacts / "manifest.json").read_text())
    slots = Slots.open(image=disk, active=active)
    slots.apply("clear-inactive")
    target = slots.state().inactive
    for key in ("boot", "root", "hash"):
        if replace and key in replace:
            data = replace[key].read_bytes()
            written, _ = slots.write_image(target, key, iter([data]))
            assert written == len(data)
            continue
        entry = manifest["images"][key]
        written, digest = slots.write_image(target, key, zstd_chunks(artifacts / entry["file"]))
        assert (written, digest) == (entry["uncompressed_size"], entry["uncompressed_sha256"])
    slots.apply("mark-inactive-valid")
    if upgrade:
        slots.apply("upgrade-to-inactive")
    return target
