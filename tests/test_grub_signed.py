"""The signed boot chain's GRUB links, run by GRUB itself (grub-emu) on a disk signed as
`kiln build --keys` signs it: grub.cfg, each slot's kiln.cfg, kernel and initramfs verified
against the boot key; a slot whose files do not verify is passed over for the other slot
(kiln.skipped=); the unsigned grubenv cannot switch any of it off.

The harness (GrubDisk, the linux/initrd stand-ins) is tests/test_grub_cfg.py's; the VM
test (tests/vm/test_secureboot.py) runs the same chain under OVMF with Secure Boot on.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from kiln.build.signing import BootSigner
from kiln.core.run import which
from kiln.host.slot.state import Flags, SlotState, grub_boot
from kiln.image.pgp import SigningKey
from kiln.secureboot import keys
from tests.test_grub_cfg import BUILDS, KEYS, MTIME, TOOL_ENV, GrubDisk, GrubRun, editenv, editenv_list

BOOTSIG = ("kiln.bootsig=enforce", "lockdown=integrity")
GOOD = Flags(1, 0, True)


@pytest.fixture(scope="module")
def key_set(tmp_path_factory: pytest.TempPathFactory) -> keys.KeySet:
    return keys.init(tmp_path_factory.mktemp("sb") / "keys")


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, key_set: keys.KeySet) -> GrubDisk:
    base = tmp_path_factory.mktemp("grub-signed")
    return GrubDisk.build(base / "disk.img", base / "work", BootSigner(key_set, MTIME))


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory: pytest.TempPathFactory) -> GrubDisk:
    base = tmp_path_factory.mktemp("grub-unsigned")
    return GrubDisk.build(base / "disk.img", base / "work")


@pytest.fixture
def disk(signed: GrubDisk, tmp_path: Path) -> GrubDisk:
    return signed.copy(tmp_path / "disk.img")


def env_of(tmp: Path, a: Flags, b: Flags) -> bytes:
    return editenv(tmp, {k: v for k, v in SlotState(a, b, None).to_env().items() if k in KEYS})


def replace_file(disk: GrubDisk, slot: str, name: str, data: bytes, tmp: Path) -> None:
    """Write `name` in slot's BOOT partition (or the ESP's /EFI/BOOT when slot is "ESP")."""
    src = tmp / f"new-{name}"
    src.write_bytes(data)
    spec, dest = (disk.mtools("efi"), f"::/EFI/BOOT/{name}") if slot == "ESP" else (disk.mtools("boot", slot),
                                                                                     f"::/{name}")
    subprocess.run([which("mcopy"), "-o", "-i", spec, src, dest], env=TOOL_ENV, check=True)


def read_file(disk: GrubDisk, slot: str, name: str, tmp: Path) -> bytes:
    out = tmp / f"old-{name}"
    subprocess.run([which("mcopy"), "-o", "-i", disk.mtools("boot", slot), f"::/{name}", out], env=TOOL_ENV,
                   check=True)
    return out.read_bytes()


def booted_normally(disk: GrubDisk, run: GrubRun, slot: str, extra: tuple[str, ...] = ()) -> None:
    assert not run.hung, run.output
    assert run.booted == slot, run.output
    assert run.linux == BUILDS[slot].linux_args(disk.v, slot, (*extra, *BOOTSIG)), run.output
    assert (run.kernel, run.initrd) == (BUILDS[slot].kernel, BUILDS[slot].initrd), run.output


# --- a signed disk boots as the unsigned one does, and says so on the command line -------------


def test_a_signed_disk_boots_with_signatures_enforced(disk: GrubDisk, tmp_path: Path) -> None:
    run = disk.boot(disk.read_env())
    assert "kiln-grub: grub.cfg did not load" not in run.output
    assert not run.errors, run.output
    booted_normally(disk, run, "A")


@pytest.mark.parametrize(("a", "b", "slot"), [
    (GOOD, Flags(2, 1, False), "B"), (Flags(1, 0, True), Flags(2, 0, True), "B"), (GOOD, Flags(0, 0, False), "A")])
def test_the_slot_choice_is_unchanged(disk: GrubDisk, tmp_path: Path, a: Flags, b: Flags, slot: str) -> None:
    st = SlotState(a, b, None)
    run = disk.boot(env_of(tmp_path, a, b))
    booted_normally(disk, run, slot)
    seen = editenv_list(tmp_path, run.env_after)
    assert {k: seen[k] for k in KEYS} == {k: v for k, v in grub_boot(st).to_env().items() if k in KEYS}


# --- a slot whose files do not verify is passed over ------------------------------------------


def tamper(data: bytes) -> bytes:
    """One byte changed, in the middle (a kernel or an initramfs keeps its size)."""
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


@pytest.mark.parametrize("name", ["kiln.cfg", "vmlinuz", "initrd.img"])
def test_a_tampered_boot_file_sends_grub_to_the_other_slot(disk: GrubDisk, unsigned: GrubDisk, tmp_path: Path,
                                                           name: str) -> None:
    """Slot B is the update GRUB is about to try (one try left); its file is changed:
    GRUB spends the try, refuses the file, and boots A, telling it kiln.skipped=B. The
    same change on an unsigned disk is loaded: the refusal is the signature check's."""
    changed = tamper(read_file(disk, "B", name, tmp_path))
    plain = unsigned.copy(tmp_path / "unsigned.img")
    replace_file(plain, "B", name, changed, tmp_path)
    run = plain.boot(env_of(tmp_path, GOOD, Flags(2, 1, False)))
    assert run.booted == "B" and "falling back" not in run.output, run.output

    replace_file(disk, "B", name, changed, tmp_path)
    run = disk.boot(env_of(tmp_path, GOOD, Flags(2, 1, False)))
    assert "kiln-grub: booting slot B" in run.output
    assert "kiln-grub: falling back to slot A" in run.output
    booted_normally(disk, run, "A", ("kiln.skipped=B",))
    if name == "initrd.img":  # refused before B's kernel was loaded (see grub.cfg)
        assert "kiln-grub: slot B: initrd.img did not verify" in run.output
        assert run.output.count("kiln-test: linux") == 1, run.output
    seen = editenv_list(tmp_path, run.env_after)
    assert (seen["B_TRIES"], seen["B_PRIO"], seen["A_PRIO"]) == ("0", "2", "1")


def test_a_root_hash_changed_in_kiln_cfg_is_refused(disk: GrubDisk, tmp_path: Path) -> None:
    """The attack the chain exists for: a new root with kiln.cfg's hash made to match."""
    cfg = read_file(disk, "A", "kiln.cfg", tmp_path).decode()
    forged = cfg.replace(BUILDS["A"].vres.root_hash, "e" * 64)
    assert forged != cfg
    replace_file(disk, "A", "kiln.cfg", forged.encode(), tmp_path)
    run = disk.boot(env_of(tmp_path, Flags(2, 0, True), Flags(1, 0, True)))
    assert "kiln-grub: slot A: kiln.cfg did not load" in run.output
    booted_normally(disk, run, "B", ("kiln.skipped=A",))
    assert "e" * 64 not in run.output


@pytest.mark.parametrize("how", ["other-key", "deleted"])
def test_a_signature_by_another_key_or_none_is_refused(disk: GrubDisk, tmp_path: Path, how: str) -> None:
    if how == "deleted":
        subprocess.run([which("mdel"), "-i", disk.mtools("boot", "A"), "::/vmlinuz.sig"], env=TOOL_ENV, check=True)
    else:
        other = SigningKey(rsa.generate_private_key(public_exponent=65537, key_size=3072), created=MTIME)
        kernel = tmp_path / "vmlinuz"
        kernel.write_bytes(read_file(disk, "A", "vmlinuz", tmp_path))
        replace_file(disk, "A", "vmlinuz.sig", other.sign([kernel.read_bytes()], MTIME), tmp_path)
    run = disk.boot(env_of(tmp_path, Flags(2, 0, True), Flags(1, 0, True)))
    booted_normally(disk, run, "B", ("kiln.skipped=A",))


def test_with_no_slot_that_verifies_grub_stops(disk: GrubDisk, tmp_path: Path) -> None:
    for slot in ("A", "B"):
        replace_file(disk, slot, "vmlinuz", tamper(read_file(disk, slot, "vmlinuz", tmp_path)), tmp_path)
    run = disk.boot(env_of(tmp_path, Flags(2, 0, True), Flags(1, 0, True)))
    assert run.booted is None and not run.hung, run.output
    assert "kiln-grub: no slot could be loaded" in run.output
    assert run.paused == [5]


def test_a_tampered_grub_cfg_is_never_run(disk: GrubDisk, tmp_path: Path) -> None:
    """grub.cfg itself is verified: a changed one (here: slot rules that always pick B and
    no try counting) is refused, and the embedded configuration stops the boot."""
    cfg = tmp_path / "grub.cfg"
    subprocess.run([which("mcopy"), "-i", disk.mtools("efi"), "::/EFI/BOOT/grub.cfg", cfg], env=TOOL_ENV,
                   check=True)
    replace_file(disk, "ESP", "grub.cfg", cfg.read_bytes().replace(b"SLOT=A", b"SLOT=B"), tmp_path)
    run = disk.boot(disk.read_env())
    assert "kiln-grub: grub.cfg did not load or verify" in run.output, run.output
    assert run.booted is None and "kiln-grub: booting" not in run.output
    assert run.paused == [30]


def test_the_grubenv_cannot_turn_the_checks_off(disk: GrubDisk, tmp_path: Path) -> None:
    """The grubenv is the one unsigned input: variables beyond the six slot ones are not
    read, so it cannot switch signature checking off, move the prefix, or add to the
    kernel's command line."""
    replace_file(disk, "A", "vmlinuz", tamper(read_file(disk, "A", "vmlinuz", tmp_path)), tmp_path)
    env = {k: v for k, v in SlotState(Flags(2, 0, True), Flags(1, 0, True), None).to_env().items() if k in KEYS}
    env |= {"check_signatures": "no", "KILN_BOOTSIG": "init=/bin/sh", "superusers": "", "prefix": "(hd0,gpt2)",
            "KILN_CMDLINE": "init=/bin/sh", "SLOT": "A"}
    run = disk.boot(editenv(tmp_path, env))
    booted_normally(disk, run, "B", ("kiln.skipped=A",))
    assert "init=/bin/sh" not in " ".join(run.linux)


@pytest.mark.parametrize("name", ["kiln.cfg", "vmlinuz", "initrd.img"])
def test_an_unsigned_disk_passes_over_a_slot_with_a_missing_file(unsigned: GrubDisk, tmp_path: Path,
                                                                 name: str) -> None:
    """The same fallback without signatures: a BOOT partition missing a file (a write cut
    short) no longer ends in a reboot loop on that slot."""
    plain = unsigned.copy(tmp_path / "unsigned.img")
    subprocess.run([which("mdel"), "-i", plain.mtools("boot", "A"), f"::/{name}"], env=TOOL_ENV, check=True)
    run = plain.boot(env_of(tmp_path, Flags(2, 0, True), Flags(1, 0, True)))
    assert run.booted == "B", run.output
    assert run.linux == BUILDS["B"].linux_args(plain.v, "B", ("kiln.skipped=A",)), run.output
    assert run.output.count("kiln-test: linux") == (2 if name == "vmlinuz" else 1), run.output
