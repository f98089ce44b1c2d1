"""GRUB EFI, its slot-selection script, the initial grubenv, the ESP and a slot's BOOT image.

GRUB is never updated by OS updates (as in Bottlerocket): the ESP is written once by the
build. Everything slot-specific (kernel, initramfs, command line, verity root hash) lives
in the slot's BOOT partition, so an update writes BOOT/ROOT/HASH of the inactive slot and
flips only the grubenv.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.build import tools
from kiln.core.run import run
from kiln.image import grubenv, layout
from kiln.image.verity import VerityResult, dm_table
from kiln.variant import Variant

if TYPE_CHECKING:
    from kiln.build.signing import BootSigner

GRUB_CFG = Path(__file__).with_name("data") / "grub.cfg"
GRUB_EARLY_CFG = Path(__file__).with_name("data") / "grub-early.cfg"
GRUB_MODULES = (
    "part_gpt",
    "fat",
    "normal",
    "linux",
    "echo",
    "test",
    "loadenv",
    "regexp",
    "reboot",
    "sleep",
    "configfile",
    "gzio",
    "efi_gop",
    "all_video",
    "search",
    "true",
)
# A signed GRUB checks OpenPGP signatures itself; every module is built in, since with
# signatures enforced it could load none from disk.
GRUB_SIGNED_MODULES = ("pgp", "gcry_rsa", "gcry_sha256")
# Slot A holds the build, marked good; slot B is empty and will not boot.
INITIAL_ENV = {"A_PRIO": "1", "A_TRIES": "0", "A_OK": "1", "B_PRIO": "0", "B_TRIES": "0", "B_OK": "0"}


def grub_cfg() -> str:
    return (
        GRUB_CFG.read_text()
        .replace("@BOOT_A@", str(layout.part_number(layout.part_name("boot", "A"))))
        .replace("@BOOT_B@", str(layout.part_number(layout.part_name("boot", "B"))))
    )


# The devices in the verity table: a BOOT image may be written to either slot, so only the
# initramfs, once it has found the booted slot's partitions, can fill them in.
VERITY_DEVICES = ("@ROOT@", "@HASH@")


def verity_arg(vres: VerityResult) -> str:
    """`kiln.verity=`: dm_table()'s line with ',' for ' ' (one kernel parameter); the one
    source of the table the initramfs opens, restart_on_corruption included."""
    fields = dm_table(*VERITY_DEVICES, vres).split(" ")
    assert all(f and "," not in f for f in fields), fields
    return "kiln.verity=" + ",".join(fields)


def slot_cfg(v: Variant, vres: VerityResult) -> str:
    """kiln.cfg on the BOOT partition: the command line and verity table of this build."""
    cmdline = " ".join([*v.cmdline, f"kiln.variant={v.name}", f"kiln.version={v.version}"])
    return f'set KILN_CMDLINE="{cmdline}"\nset KILN_VERITY="{verity_arg(vres)}"\n'


def boot_partition(
    out: Path, v: Variant, vmlinuz: Path, initrd: Path, vres: VerityResult, *, mtime: int, work: Path,
    signer: BootSigner | None = None,
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "kiln.cfg"
    cfg.write_text(slot_cfg(v, vres))
    k = work / "vmlinuz"
    shutil.copy(vmlinuz, k)
    i = work / "initrd.img"
    shutil.copy(initrd, i)
    files = {"vmlinuz": k, "initrd.img": i, "kiln.cfg": cfg}
    if signer:
        files |= {s.name: s for s in signer.sign_for_grub(k, i, cfg)}
    volid = zlib.crc32(f"boot:{v.name}:{v.version}:{vres.root_hash}".encode())
    tools.mkfs_fat(out, v.partitions.boot, label="KILN-BOOT", volume_id=volid, files=files, mtime=mtime)


def early_cfg() -> str:
    """grub-early.cfg as GRUB embeds it: without comments, which the embedded configuration's
    parser does not know (it prints "Unknown command `#'")."""
    return "".join(line for line in GRUB_EARLY_CFG.read_text().splitlines(True) if not line.startswith("#"))


def grub_efi(out: Path, *, mtime: int, work: Path, signer: BootSigner | None = None) -> None:
    """GRUB's EFI image. Signed: it embeds the boot key and the configuration that enforces
    signatures (grub-early.cfg), has no shim_lock verifier (no shim: the firmware checks
    GRUB against db itself), and is signed for db."""
    argv: list[str | Path] = ["grub-mkimage", "-O", "x86_64-efi", "-p", "/EFI/BOOT"]
    if signer is None:
        run([*argv, "-o", out, *GRUB_MODULES], env={"SOURCE_DATE_EPOCH": str(mtime)})
        return
    unsigned = work / "grubx64.unsigned.efi"
    pub = signer.public_key(work / "boot-key.pub")
    early = work / "early.cfg"
    early.write_text(early_cfg())
    run([*argv, "-o", unsigned, "--disable-shim-lock", "--pubkey", pub, "--config", early,
         *GRUB_MODULES, *GRUB_SIGNED_MODULES], env={"SOURCE_DATE_EPOCH": str(mtime)})
    signer.sign_efi(unsigned, out)


def esp_partition(out: Path, size: int, *, mtime: int, work: Path, signer: BootSigner | None = None) -> None:
    work.mkdir(parents=True, exist_ok=True)
    efi = work / "BOOTX64.EFI"
    grub_efi(efi, mtime=mtime, work=work, signer=signer)
    cfg = work / "grub.cfg"
    cfg.write_text(grub_cfg())
    env = work / "grubenv"
    env.write_bytes(grubenv.serialize(INITIAL_ENV))
    files = {"EFI/BOOT/BOOTX64.EFI": efi, "EFI/BOOT/grub.cfg": cfg, "EFI/BOOT/grubenv": env}
    if signer:
        files["EFI/BOOT/grub.cfg.sig"] = signer.sign_for_grub(cfg)[0]
    tools.mkfs_fat(out, size, label="KILN-EFI", volume_id=0x4B494C4E, files=files, mtime=mtime)
