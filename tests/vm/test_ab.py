"""VM, A/B: upgrade to slot B written through the slot library, stay there, roll back;
and fail closed: a slot that panics or whose root is corrupted is abandoned by itself."""

from __future__ import annotations

import json
import subprocess
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


def test_upgrade_to_b_then_rollback_to_a(images: Images, boot: Callable[..., Vm], tmp_path: Path) -> None:
    v1, v2 = images.get("1.0.0"), images.get("2.0.0")
    disk = raw_copy(v1.disk, tmp_path / "disk.img")

    vm = boot(disk, overlay=False)
    assert vm.wait_ready(300).group(1, 3) == ("1.0.0", "A")
    vm.check("echo from-v1 > /local/marker && sync")
    assert vm.shutdown(timeout=120)

    # Write slot B from v2's update artifacts, exactly as the update agent will.
    assert install_to_inactive(disk, v2.manifest.parent) == "B"
    st = Slots.open(image=disk, active="A").state()
    assert st.next_boot == "B" and st.b.tries_left == 1 and not st.b.successful

    vm = boot(disk, overlay=False)
    assert vm.wait_for(r"kiln-grub: booting slot (\w)", 120).group(1) == "B"
    assert vm.wait_ready(300).group(1, 3) == ("2.0.0", "B")
    assert vm.check("cat /local/marker").strip() == "from-v1"
    st_json = slot_status(vm)
    assert st_json["active"] == "B" and st_json["next"] == "B"
    assert st_json["B"] == {"priority": 2, "tries_left": 0, "successful": True, "will_boot": True}
    assert st_json["A"] == {"priority": 1, "tries_left": 0, "successful": True, "will_boot": True}

    vm.send("reboot\n")  # marked successful: stays on B
    assert vm.wait_ready(300).group(1, 3) == ("2.0.0", "B")

    vm.check("kiln slot rollback-to-inactive")
    assert slot_status(vm)["next"] == "A"
    vm.send("reboot\n")
    assert vm.wait_ready(300).group(1, 3) == ("1.0.0", "A")
    assert vm.check("cat /local/marker").strip() == "from-v1"


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
    st = slot_status(vm)
    assert st["B"] == {"priority": 2, "tries_left": 0, "successful": False, "will_boot": False}
    assert st["next"] == "A"


def _decompressed(build_dir: Path, key: str, dest: Path) -> Path:
    manifest = json.loads((build_dir / "manifest.json").read_text())
    with open(dest, "wb") as f:
        for chunk in zstd_chunks(build_dir / manifest["images"][key]["file"]):
            f.write(chunk)
    return dest


def test_slot_whose_kernel_panics_falls_back(images: Images, boot: Callable[..., Vm], tmp_path: Path) -> None:
    boot_img = _decompressed(images.get("2.0.0").manifest.parent, "boot", tmp_path / "boot.img")
    junk = tmp_path / "initrd.img"
    junk.write_bytes(b"\x00not an initramfs" * 4096)
    # Without a usable initramfs the kernel cannot mount a root and panics (panic=5 reboots).
    subprocess.run(["mcopy", "-o", "-i", str(boot_img), str(junk), "::/initrd.img"], check=True,
                   env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    _broken_slot_falls_back(images, boot, tmp_path, "boot", boot_img)
    assert "Kernel panic" in boot_output(tmp_path)


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
