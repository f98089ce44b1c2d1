"""The whole verified boot chain under OVMF with Secure Boot on: `kiln build --keys` +
`kiln run --secure-boot` boots and reports it; then each piece of the chain, tampered on a
copy of the disk, is refused: the firmware refuses GRUB, GRUB refuses grub.cfg, a slot's
kiln.cfg (a root hash changed to match a changed root), kernel or initramfs, and dm-verity
refuses a changed root block. The machine never reaches ready on tampered bytes: it comes
back on the other slot, or stops when no slot is valid.

The disk for the tamper cases holds the signed build in both slots (B copied from A, as an
update would write it), so there is a slot to come back on. The GRUB-level rules are also
covered in seconds by tests/test_grub_signed.py (grub-emu); the firmware's db check with a
bare ESP by tests/vm/test_secureboot_firmware.py.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.build.pipeline import BuildResult
from kiln.core.run import which
from kiln.host.slot import Flags, Slots, SlotState
from kiln.image import layout
from kiln.image.verity import build_hash_tree
from kiln.secureboot import keys, varstore
from kiln.vm.qemu import Vm
from tests.conftest import raw_copy
from tests.vm.guest import guest_json

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

MTOOLS = {"MTOOLS_SKIP_CHECK": "1"}
REFUSED = r"failed to load Boot\w+ .*: Access Denied"
GOOD_A_THEN_B = SlotState(Flags(2, 0, True), Flags(1, 0, True), None)  # both good, A preferred
UPDATE_TO_B = SlotState(Flags(1, 0, True), Flags(2, 1, False), None)  # B an update about to be tried


@pytest.fixture(scope="module")
def signed(signed_build: BuildResult) -> BuildResult:
    return signed_build


@pytest.fixture(scope="module")
def two_slots(signed: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The signed disk with slot B holding the same build, byte for byte."""
    disk = raw_copy(signed.disk, tmp_path_factory.mktemp("two-slots") / "disk.img")
    slots = Slots.open(image=disk, active="A")
    with open(disk, "r+b") as f:
        for kind, region in slots.partitions("A").items():
            dest = slots.partitions("B")[kind]
            f.seek(region.offset)
            data = f.read(region.size)
            f.seek(dest.offset)
            f.write(data)
    return disk


def with_state(src: Path, dest: Path, st: SlotState) -> Path:
    disk = raw_copy(src, dest)
    Slots.open(image=disk).store.write(st.to_env())
    return disk


def fat_spec(disk: Path, part: str) -> str:
    return f"{disk}@@{Slots.open(image=disk).disk.region(part).offset}"


def edit_file(disk: Path, part: str, name: str, change: Callable[[bytes], bytes], tmp: Path) -> None:
    """Rewrite one file in a FAT partition (the ESP or a BOOT) of `disk` with mtools."""
    local = tmp / name.replace("/", "_")
    subprocess.run([which("mcopy"), "-o", "-i", fat_spec(disk, part), f"::/{name}", local], env=MTOOLS, check=True)
    before = local.read_bytes()
    after = change(before)
    assert after != before
    local.write_bytes(after)
    subprocess.run([which("mcopy"), "-o", "-i", fat_spec(disk, part), local, f"::/{name}"], env=MTOOLS, check=True)


def flip(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def boot_config(disk: Path, slot: str, tmp: Path) -> dict[str, str]:
    local = tmp / f"kiln-{slot}.cfg"
    subprocess.run([which("mcopy"), "-o", "-i", fat_spec(disk, layout.part_name("boot", slot)), "::/kiln.cfg",
                    local], env=MTOOLS, check=True)
    text = local.read_text()
    verity = re.search(r"kiln\.verity=([^\s\"]+)", text)
    assert verity, text
    fields = verity[1].split(",")
    # dm_table(): 0 <sectors> verity 1 <data> <hash> <dbs> <hbs> <blocks> <hash start> sha256 <root> <salt> ...
    return {"root_hash": fields[11], "salt": fields[12], "data_blocks": fields[8], "text": text}


def forge_root(disk: Path, slot: str, tmp: Path) -> str:
    """What an attacker with the disk would do: change a block of the slot's root, write a
    new, valid hash tree for it, and put its root hash in kiln.cfg. Returns the new hash."""
    cfg = boot_config(disk, slot, tmp)
    slots = Slots.open(image=disk)
    root, hashp = slots.partitions(slot)["root"], slots.partitions(slot)["hash"]
    size = int(cfg["data_blocks"]) * 4096
    data = tmp / "root.img"
    with open(disk, "rb") as f:
        f.seek(root.offset)
        data.write_bytes(flip(f.read(size)))
    with open(disk, "rb") as f:  # keep the tree's uuid (superblock bytes 16-31, as veritysetup writes it)
        f.seek(hashp.offset + 16)
        tree_uuid = uuid.UUID(bytes=f.read(16))
    tree = tmp / "hash.img"
    vres = build_hash_tree(data, tree, salt=bytes.fromhex(cfg["salt"]), uuid=tree_uuid)
    assert vres.root_hash != cfg["root_hash"]
    with open(disk, "r+b") as f:
        f.seek(root.offset)
        f.write(data.read_bytes())
        f.seek(hashp.offset)
        f.write(tree.read_bytes())
    forged = cfg["text"].replace(cfg["root_hash"], vres.root_hash)
    edit_file(disk, layout.part_name("boot", slot), "kiln.cfg", lambda _: forged.encode(), tmp)
    return vres.root_hash


def start(boot: Callable[..., Vm], disk: Path, sb_vars: Path) -> Vm:
    return boot(disk, overlay=False, secure_boot_vars=sb_vars)


# --- the chain verified, and reported ------------------------------------------------------------


def test_a_signed_image_boots_with_secure_boot_on_and_reports_the_chain(signed: BuildResult,
                                                                       boot: Callable[..., Vm]) -> None:
    assert signed.secure_boot_vars and signed.secure_boot_vars.is_file()
    vm = boot(signed.disk, secure_boot_vars=signed.secure_boot_vars)
    vm.wait_ready(240)
    vm.wait_shell()
    status = guest_json(vm, "kiln slot status --json")
    assert status["secure_boot"] == {"uefi": True, "enabled": True, "setup_mode": False, "boot_files_verified": True,
                                     "lockdown": "integrity", "root_verified": True}, status
    assert "[integrity]" in vm.check("cat /sys/kernel/security/lockdown")
    cmdline = vm.check("cat /proc/cmdline")
    assert "kiln.bootsig=enforce" in cmdline and "lockdown=integrity" in cmdline
    assert guest_json(vm, "kiln raw GET /os")["secure_boot"] == \
        status["secure_boot"]


# --- tampered pieces: refused, never run ----------------------------------------------------------


def test_a_tampered_grub_is_refused_by_the_firmware(two_slots: Path, signed: BuildResult, boot: Callable[..., Vm],
                                                    tmp_path: Path) -> None:
    disk = with_state(two_slots, tmp_path / "disk.img", GOOD_A_THEN_B)
    edit_file(disk, layout.part_name("efi"), "EFI/BOOT/BOOTX64.EFI", flip, tmp_path)
    vm = start(boot, disk, signed.secure_boot_vars or Path())
    vm.wait_for(REFUSED, 120)
    assert "kiln-grub" not in vm.output


def test_an_image_signed_with_another_key_set_is_refused(signed: BuildResult, boot: Callable[..., Vm],
                                                         tmp_path: Path) -> None:
    """The same signed image on a machine that enrolled another key set's db."""
    theirs = tmp_path / "vars.fd"
    varstore.make_vars(keys.init(tmp_path / "theirs"), theirs)
    vm = boot(signed.disk, secure_boot_vars=theirs)
    vm.wait_for(REFUSED, 120)
    assert "kiln-grub" not in vm.output


def test_a_tampered_grub_cfg_is_never_run(two_slots: Path, signed: BuildResult, boot: Callable[..., Vm],
                                          tmp_path: Path) -> None:
    disk = with_state(two_slots, tmp_path / "disk.img", GOOD_A_THEN_B)
    edit_file(disk, layout.part_name("efi"), "EFI/BOOT/grub.cfg",
              lambda b: b.replace(b"set timeout=0", b"set timeout=0\nset KILN_BOOTSIG=init=/bin/sh"), tmp_path)
    vm = start(boot, disk, signed.secure_boot_vars or Path())
    vm.wait_for("kiln-grub: grub.cfg did not load or verify", 120)
    assert "kiln-grub: booting" not in vm.output


@pytest.mark.parametrize("name", ["vmlinuz", "initrd.img"])
def test_a_tampered_kernel_or_initramfs_boots_the_other_slot(two_slots: Path, signed: BuildResult,
                                                             boot: Callable[..., Vm], tmp_path: Path,
                                                             name: str) -> None:
    """Slot A, good and preferred, has a changed kernel (or initramfs): GRUB refuses it and
    boots B in the same boot. The kernel case runs to ready and the host's report; the
    initramfs case stops once B's initramfs is running (its first-boot line)."""
    disk = with_state(two_slots, tmp_path / "disk.img", GOOD_A_THEN_B)
    edit_file(disk, layout.part_name("boot", "A"), name, flip, tmp_path)
    vm = start(boot, disk, signed.secure_boot_vars or Path())
    refused = "slot A: initrd.img did not verify" if name == "initrd.img" else "slot A failed to load"
    vm.wait_for(f"kiln-grub: {refused}", 120)
    vm.wait_for("kiln-grub: falling back to slot B", 30)
    vm.wait_for("kiln-grub: booting slot B", 30)
    if name == "initrd.img":
        vm.wait_for("kiln-init: creating KILN-DATA filesystem", 120)
        assert vm.output.count("kiln-grub: booting slot") == 2
        return
    vm.wait_for(r"kiln: slot A \(\S+\) did not boot: its boot files", 240)  # printed before ready
    assert vm.wait_ready(120).group(0).endswith("slot=B")
    assert vm.output.count("kiln-grub: booting slot") == 2, "one boot, two tries"
    after = SlotState.from_env(Slots.open(image=disk).store.read(), None)
    assert after.a == Flags(0, 0, False) and after.b.successful, "A cleared; B, the running slot, good"


def test_a_forged_root_hash_in_kiln_cfg_boots_the_other_slot(two_slots: Path, signed: BuildResult,
                                                             boot: Callable[..., Vm], tmp_path: Path) -> None:
    disk = with_state(two_slots, tmp_path / "disk.img", GOOD_A_THEN_B)
    forged = forge_root(disk, "A", tmp_path)
    vm = start(boot, disk, signed.secure_boot_vars or Path())
    vm.wait_for("kiln-grub: slot A: kiln.cfg did not load", 120)
    assert vm.wait_ready(240).group(0).endswith("slot=B")
    assert forged not in vm.output


def test_a_tampered_root_block_is_refused_by_dm_verity(two_slots: Path, signed: BuildResult,
                                                       boot: Callable[..., Vm], tmp_path: Path) -> None:
    """B, an update about to be tried, has a changed root block (its kiln.cfg still the
    signed one): dm-verity refuses the block and restarts the machine (restart_on_corruption);
    the try is spent, so GRUB falls back to A."""
    disk = with_state(two_slots, tmp_path / "disk.img", UPDATE_TO_B)
    root = Slots.open(image=disk).partitions("B")["root"]
    with open(disk, "r+b") as f:  # the erofs superblock: read at mount
        f.seek(root.offset + 1024)
        byte = f.read(1)
        f.seek(root.offset + 1024)
        f.write(bytes([byte[0] ^ 0x01]))
    vm = start(boot, disk, signed.secure_boot_vars or Path())
    vm.wait_for("kiln-grub: booting slot B", 120)
    vm.wait_for("reboot: Restarting system with command 'dm-verity device corrupted'", 120)
    vm.wait_for("kiln-grub: booting slot A", 120)
    vm.wait_for(r"kiln: update to \S+ failed", 240)  # the fallback report comes before ready
    assert vm.wait_ready(120).group(0).endswith("slot=A")
    assert vm.output.count("kiln: ready") == 1
