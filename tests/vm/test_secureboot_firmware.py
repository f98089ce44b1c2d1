"""The firmware link of the chain, on OVMF's Secure Boot build under TCG: with the variables
`kiln.secureboot.varstore.make_vars` writes, the firmware starts a GRUB signed with the key
set's db key and refuses ("Access Denied") an unsigned one and one signed by another key
set; plain OVMF (no --secure-boot) still starts the unsigned one. The disk is a bare ESP
holding one tiny GRUB that prints a marker and powers off, so each boot takes ~4 s."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.core.run import run
from kiln.secureboot import keys, pe, varstore
from kiln.vm.qemu import Vm

pytestmark = [pytest.mark.vm, pytest.mark.timeout(120)]

MARK = "kiln-sb-test: grub ran"
REFUSED = r"failed to load Boot\w+ .*: Access Denied"


def esp_with(efi: Path, out: Path) -> Path:
    """An 8 MiB FAT volume (no partition table: OVMF reads it as removable media) with
    `efi` as the default boot loader /EFI/BOOT/BOOTX64.EFI."""
    run(["mkfs.vfat", "-C", "-n", "ESP", out, "8192"])
    env = {"MTOOLS_SKIP_CHECK": "1"}
    run(["mmd", "-i", out, "::/EFI", "::/EFI/BOOT"], env=env)
    run(["mcopy", "-i", out, efi, "::/EFI/BOOT/BOOTX64.EFI"], env=env)
    return out


def test_secure_boot_firmware_runs_only_what_db_signed(tmp_path: Path, boot: Callable[..., Vm]) -> None:
    mine = keys.init(tmp_path / "keys")
    theirs = keys.init(tmp_path / "theirs")
    sb_vars = tmp_path / varstore.VARS_NAME
    varstore.make_vars(mine, sb_vars)
    vars_sum = hashlib.sha256(sb_vars.read_bytes()).hexdigest()

    cfg = tmp_path / "early.cfg"
    cfg.write_text(f"echo {MARK}\nhalt\n")
    grub = tmp_path / "grub.efi"
    run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/EFI/BOOT", "-c", cfg, "-o", grub, "echo", "halt"])
    signed, foreign = tmp_path / "signed.efi", tmp_path / "foreign.efi"
    pe.sign_pe(mine, grub, signed)
    pe.sign_pe(theirs, grub, foreign)

    # Each boot either prints the marker or the boot manager's refusal, never both.
    for efi, accepted in ((signed, True), (grub, False), (foreign, False)):
        vm = boot(esp_with(efi, tmp_path / f"{efi.stem}.img"), cold_reboot=False, secure_boot_vars=sb_vars)
        found = vm.wait_for(f"({MARK})|({REFUSED})", 45)
        assert (found.group(1) is not None) is accepted, f"{efi.name}: {found.group(0)}"
        vm.kill()
        assert MARK not in vm.output or accepted, f"{efi.name} ran under Secure Boot"
        copy = vm.cfg.workdir / "OVMF_VARS.fd"
        assert copy.is_file() and vm.cfg.secure_boot_vars == sb_vars
    assert hashlib.sha256(sb_vars.read_bytes()).hexdigest() == vars_sum, "the firmware wrote the original"

    # Without Secure Boot (today's `kiln run`) the unsigned GRUB still starts.
    vm = boot(tmp_path / "grub.img", cold_reboot=False)
    vm.wait_for(MARK, 45)
