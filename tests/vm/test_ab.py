"""VM, A/B at the slot level: a slot whose root is corrupted is abandoned by itself, and
an unreadable grubenv falls back to slot A. (Upgrading, rolling back and a kernel that
panics are exercised through the update agent in test_update.py.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.host.slot import Slots
from kiln.vm.qemu import Vm
from tests.conftest import Images, raw_copy
from tests.helpers import install_to_inactive, zstd_chunks

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


def slot_status(vm: Vm) -> dict[str, object]:
    status: dict[str, object] = json.loads(vm.check("kiln slot status --json"))
    return status


def _broken_slot_falls_back(images: Images, boot: Callable[..., Vm], tmp_path: Path,
                            key: str, broken: Path) -> None:
    v1, v2 = images.get("1.0.0"), images.get("2.0.0")
    disk = raw_copy(v1.disk, tmp_path / "disk.img")
    install_to_inactive(disk, v2.manifest.parent, replace={key: broken})

    vm = boot(disk, overlay=False)
    assert vm.wait_for(r"kiln-grub: booting slot (\w)", 120).group(1) == "B"
    # B fails and reboots; GRUB must skip it on the very next boot.
    assert vm.wait_for(r"kiln-grub: booting slot (\w)", 240).group(1) == "A"
    assert vm.wait_ready(300).group(1, 3) == ("1.0.0", "A")
    assert vm.output.count("kiln-grub: booting slot") == 2, "more than one reboot to fall back"
    # The fallback is reported once, and the slot that failed is cleared (it cannot boot).
    assert "kiln: update to unknown failed (did not finish booting" in vm.output  # no agent wrote it
    st = slot_status(vm)
    assert st["B"] == {"priority": 0, "tries_left": 0, "successful": False, "will_boot": False}
    assert st["next"] == "A"


def _decompressed(build_dir: Path, key: str, dest: Path) -> Path:
    manifest = json.loads((build_dir / "manifest.json").read_text())
    with open(dest, "wb") as f:
        for chunk in zstd_chunks(build_dir / manifest["images"][key]["file"]):
            f.write(chunk)
    return dest


def test_slot_with_corrupted_root_block_falls_back(images: Images, boot: Callable[..., Vm], tmp_path: Path) -> None:
    root_img = _decompressed(images.get("2.0.0").manifest.parent, "root", tmp_path / "root.img")
    with open(root_img, "r+b") as f:  # the erofs superblock: read by the very first mount
        f.seek(1024 + 64)
        byte = f.read(1)
        f.seek(1024 + 64)
        f.write(bytes([byte[0] ^ 0xFF]))
    _broken_slot_falls_back(images, boot, tmp_path, "root", root_img)
    log = boot_output(tmp_path)
    assert "is corrupted" in log or "dm-verity device corrupted" in log


def boot_output(tmp_path: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("serial*.log")))



def test_unreadable_grubenv_falls_back_to_slot_a(images: Images, boot: Callable[..., Vm], tmp_path: Path) -> None:
    disk = raw_copy(images.get("1.0.0").disk, tmp_path / "disk.img")
    store = Slots.open(image=disk, active="A").store
    with open(disk, "r+b") as f:  # a torn or garbled first sector: no valid header
        f.seek(store.offset)
        f.write(b"\xff" * 512)
    vm = boot(disk, overlay=False)
    vm.wait_for("kiln-grub: grubenv unreadable; falling back to slot A", 120)
    vm.wait_for("kiln: grubenv was unreadable", 300)
    assert vm.wait_ready(300).group(1, 3) == ("1.0.0", "A")
    st = slot_status(vm)
    assert st["A"] == {"priority": 1, "tries_left": 0, "successful": True, "will_boot": True}
    assert st["B"]["will_boot"] is False
