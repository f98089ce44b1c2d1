"""What `kiln build --keys` writes, checked with independent tools: sbverify for GRUB's
Authenticode signature, gpgv for every OpenPGP signature GRUB will check (on the disk and
in the BOOT update artifact), the variables file parsed back; the signed boot files are
reproducible, and no private key reaches the image.

The chain running (OVMF Secure Boot, tampering) is tests/vm/test_secureboot.py; GRUB's
own checks in seconds are tests/test_grub_signed.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kiln.build import bootloader
from kiln.build.pipeline import BuildResult
from kiln.build.signing import BootSigner
from kiln.core.run import which
from kiln.image.verity import VerityResult
from kiln.secureboot import keys, pe, varstore
from kiln.variant import load_variant

MTOOLS = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
ESP_FILES = ("BOOTX64.EFI", "grub.cfg", "grub.cfg.sig", "grubenv")
BOOT_SIGNED = ("kiln.cfg", "vmlinuz", "initrd.img")


def region_offset(disk: Path, name: str) -> int:
    from kiln.host.slot.disk import Disk

    return Disk.from_image(disk).region(name).offset


def copy_out(image_spec: str, names: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([which("mcopy"), "-n", "-i", image_spec, *names, dest], env=MTOOLS, check=True)


def gpgv(keyring: Path, sig: Path, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([which("gpgv"), "--keyring", keyring, sig, data], capture_output=True, text=True)


@pytest.fixture(scope="module")
def key_set(secure_boot_keys: Path) -> keys.KeySet:
    return keys.load(secure_boot_keys)


@pytest.fixture(scope="module")
def keyring(key_set: keys.KeySet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return BootSigner(key_set, 0).public_key(tmp_path_factory.mktemp("keyring") / "boot.gpg")


def test_grub_is_signed_for_db_and_embeds_the_boot_key(signed_build: BuildResult, key_set: keys.KeySet,
                                                       keyring: Path, tmp_path: Path) -> None:
    esp = tmp_path / "esp"
    copy_out(f"{signed_build.disk}@@{region_offset(signed_build.disk, 'KILN-EFI')}",
             [f"::/EFI/BOOT/{n}" for n in ESP_FILES], esp)
    assert pe.verify_pe(key_set.db_crt, esp / "BOOTX64.EFI")
    other = keys.init(tmp_path / "other")
    assert not pe.verify_pe(other.db_crt, esp / "BOOTX64.EFI")
    grub = (esp / "BOOTX64.EFI").read_bytes()
    assert keyring.read_bytes() in grub, "the OpenPGP boot key is inside the signed image"
    assert bootloader.early_cfg().encode() in grub, "so is the configuration that enforces signatures"
    res = gpgv(keyring, esp / "grub.cfg.sig", esp / "grub.cfg")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("where", ["disk", "artifact"])
def test_every_file_grub_loads_has_a_good_signature(signed_build: BuildResult, keyring: Path, tmp_path: Path,
                                                    where: str) -> None:
    """Slot A on the disk and the BOOT update artifact (what an update writes to the other
    slot) both carry the signatures; gpgv checks each, and refuses a changed file."""
    if where == "disk":
        spec = f"{signed_build.disk}@@{region_offset(signed_build.disk, 'KILN-BOOT-A')}"
    else:
        img = tmp_path / "boot.img"
        subprocess.run([which("zstd"), "-q", "-d", signed_build.artifacts["boot"], "-o", img], check=True)
        spec = str(img)
    files = tmp_path / "files"
    copy_out(spec, [f"::/{n}{ext}" for n in BOOT_SIGNED for ext in ("", ".sig")], files)
    for name in BOOT_SIGNED:
        res = gpgv(keyring, files / f"{name}.sig", files / name)
        assert res.returncode == 0, f"{name}: {res.stderr}"
        assert 'Good signature from "Kiln boot signing key"' in res.stderr
    changed = files / "kiln.cfg"
    changed.write_text(changed.read_text().replace("kiln.verity=0,", "kiln.verity=1,"))
    assert gpgv(keyring, files / "kiln.cfg.sig", changed).returncode != 0


def test_the_variables_file_enrolls_the_key_set(signed_build: BuildResult, key_set: keys.KeySet) -> None:
    assert signed_build.secure_boot_vars == signed_build.output / varstore.VARS_NAME
    vars_ = varstore.read_vars(signed_build.secure_boot_vars)
    assert vars_.enrolls(key_set)


def test_no_private_key_reaches_the_outputs(signed_build: BuildResult, key_set: keys.KeySet) -> None:
    """Not in the disk, not in an artifact, not in the variables file: searched as bytes."""
    secrets = [key_set.key(n).read_bytes() for n in ("PK", "KEK", "db")] + [key_set.boot_key.read_bytes()]
    needles = [b for s in secrets for b in (s, s.split(b"\n")[1])]  # PEM, and its first base64 line
    outputs = [signed_build.disk, *signed_build.artifacts.values(), signed_build.secure_boot_vars]
    for path in outputs:
        assert path is not None
        data = path.read_bytes()
        assert not any(n in data for n in needles), path


def test_signed_boot_files_are_reproducible(key_set: keys.KeySet, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The ESP and a BOOT partition made twice with the same keys are the same bytes (the
    signing clock is SOURCE_DATE_EPOCH, RSA PKCS#1 v1.5 is deterministic)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    v = load_variant()
    vres = VerityResult("ab" * 32, "cd" * 32, 1024, 4096 * 9, "1")
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"kernel" * 1000)
    initrd.write_bytes(b"initrd" * 1000)
    made = []
    for i in range(2):
        signer = BootSigner(key_set, 1700000000)
        esp, boot = tmp_path / f"esp{i}.img", tmp_path / f"boot{i}.img"
        bootloader.esp_partition(esp, v.partitions.efi, mtime=1700000000, work=tmp_path / f"esp{i}", signer=signer)
        bootloader.boot_partition(boot, v, kernel, initrd, vres, mtime=1700000000, work=tmp_path / f"boot{i}",
                                  signer=signer)
        made.append((esp.read_bytes(), boot.read_bytes()))
    assert made[0] == made[1]
