"""kiln.host.secureboot: the boot chain as the kernel shows it, from sysfs/proc trees made
here (no EFI, Secure Boot on/off, setup mode, each lockdown mode, GRUB's enforcement mark,
root on dm-verity or not), and from this machine's real /sys and /proc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.host.cli.slot import _print_status
from kiln.host.secureboot import EFI_GLOBAL, SecureBootStatus, lockdown_mode, status
from kiln.host.slot.state import Flags, SlotState

EFI_NON_VOLATILE_BS_RT = b"\x06\x00\x00\x00"  # efivarfs' 4 attribute bytes (BOOTSERVICE|RUNTIME)
MOUNTINFO_VERITY = ("20 1 254:0 / / ro,relatime shared:1 - erofs /dev/mapper/kiln-root ro\n"
                    "21 20 0:5 / /dev rw shared:2 - devtmpfs devtmpfs rw\n")
MOUNTINFO_PLAIN = "27 1 253:1 / / rw,relatime - ext4 /dev/vda rw\n"


def tree(base: Path, *, efi: bool = True, secure_boot: int | None = None, setup_mode: int | None = None,
         lockdown: str | None = None, cmdline: str = "console=ttyS0 kiln.slot=A",
         mountinfo: str = MOUNTINFO_VERITY, dm_name: str | None = "kiln-root") -> tuple[Path, Path]:
    """A /sys and /proc as a booted host shows them; None leaves a file out."""
    sys_root, proc_root = base / "sys", base / "proc"
    sys_root.mkdir(parents=True)
    (proc_root / "self").mkdir(parents=True)
    if efi:
        efivars = sys_root / "firmware/efi/efivars"
        efivars.mkdir(parents=True)
        for name, value in (("SecureBoot", secure_boot), ("SetupMode", setup_mode)):
            if value is not None:
                (efivars / f"{name}-{EFI_GLOBAL}").write_bytes(EFI_NON_VOLATILE_BS_RT + bytes([value]))
    if lockdown is not None:
        (sys_root / "kernel/security").mkdir(parents=True)
        (sys_root / "kernel/security/lockdown").write_text(lockdown + "\n")
    (proc_root / "cmdline").write_text(cmdline + "\n")
    (proc_root / "self/mountinfo").write_text(mountinfo)
    if dm_name is not None:
        (sys_root / "dev/block/254:0/dm").mkdir(parents=True)
        (sys_root / "dev/block/254:0/dm/name").write_text(dm_name + "\n")
    return sys_root, proc_root


ENFORCED = "console=ttyS0 kiln.slot=A kiln.verity=1,2,3 kiln.bootsig=enforce"


@pytest.mark.parametrize(
    ("kw", "expect"),
    [
        ({"efi": False, "cmdline": ENFORCED},
         {"uefi": False, "enabled": False, "setup_mode": False, "boot_files_verified": False}),
        ({"secure_boot": 1, "setup_mode": 0, "cmdline": ENFORCED},
         {"uefi": True, "enabled": True, "setup_mode": False, "boot_files_verified": True}),
        ({"secure_boot": 1, "setup_mode": 0},  # GRUB did not enforce: the firmware checked GRUB only
         {"uefi": True, "enabled": True, "setup_mode": False, "boot_files_verified": False}),
        ({"secure_boot": 0, "setup_mode": 0, "cmdline": ENFORCED},  # the mark alone proves nothing
         {"uefi": True, "enabled": False, "setup_mode": False, "boot_files_verified": False}),
        ({"secure_boot": 0, "setup_mode": 1, "cmdline": ENFORCED},
         {"uefi": True, "enabled": False, "setup_mode": True, "boot_files_verified": False}),
        ({"secure_boot": 1, "setup_mode": 1, "cmdline": ENFORCED},  # inconsistent firmware: not trusted
         {"uefi": True, "enabled": True, "setup_mode": True, "boot_files_verified": False}),
        ({"cmdline": ENFORCED},  # EFI without efivarfs mounted: nothing can be claimed
         {"uefi": True, "enabled": False, "setup_mode": False, "boot_files_verified": False}),
        ({"secure_boot": 1, "setup_mode": 0, "cmdline": "kiln.bootsig=enforced kiln.bootsig=off"},
         {"uefi": True, "enabled": True, "setup_mode": False, "boot_files_verified": False}),
    ],
    ids=["no-efi", "sb-on-enforced", "sb-on-grub-not-enforcing", "sb-off", "setup-mode", "sb-and-setup",
         "no-efivarfs", "other-bootsig-words"],
)
def test_secure_boot_states(tmp_path: Path, kw: dict[str, object], expect: dict[str, bool]) -> None:
    got = dict(status(*tree(tmp_path, **kw)).to_json())  # type: ignore[arg-type]
    assert {k: got[k] for k in expect} == expect


@pytest.mark.parametrize(
    ("text", "mode"),
    [("[none] integrity confidentiality", "none"), ("none [integrity] confidentiality", "integrity"),
     ("none integrity [confidentiality]", "confidentiality"), ("none integrity confidentiality", None),
     ("", None), ("none [bogus] integrity", None), (None, None)],
)
def test_lockdown_modes(tmp_path: Path, text: str | None, mode: str | None) -> None:
    sys_root, proc_root = tree(tmp_path, secure_boot=1, setup_mode=0, lockdown=text)
    assert lockdown_mode(sys_root) == mode
    assert status(sys_root, proc_root).lockdown == mode


@pytest.mark.parametrize(
    ("mountinfo", "dm_name", "verified"),
    [(MOUNTINFO_VERITY, "kiln-root", True),
     (MOUNTINFO_VERITY, "someone-else", False),  # a device-mapper root Kiln's initramfs did not make
     (MOUNTINFO_VERITY, None, False),  # 254:0 is not a device-mapper device at all
     (MOUNTINFO_PLAIN, None, False),
     (MOUNTINFO_PLAIN + "30 27 254:0 / /mnt ro - erofs /dev/dm-0 ro\n", "kiln-root", False),  # kiln-root elsewhere
     (MOUNTINFO_PLAIN + "31 27 254:0 / / ro - erofs /dev/dm-0 ro\n", "kiln-root", True),  # the last / wins
     ("", "kiln-root", False)],
)
def test_root_verified(tmp_path: Path, mountinfo: str, dm_name: str | None, verified: bool) -> None:
    assert status(*tree(tmp_path, mountinfo=mountinfo, dm_name=dm_name)).root_verified is verified


def test_truncated_or_missing_files_are_not_claims(tmp_path: Path) -> None:
    sys_root, proc_root = tree(tmp_path, secure_boot=1, setup_mode=0, cmdline=ENFORCED)
    (sys_root / f"firmware/efi/efivars/SecureBoot-{EFI_GLOBAL}").write_bytes(b"\x06\x00\x00")  # no value byte
    (proc_root / "self/mountinfo").unlink()
    got = status(sys_root, proc_root)
    assert not got.enabled and not got.boot_files_verified and not got.root_verified
    (proc_root / "cmdline").unlink()
    assert not status(sys_root, proc_root).boot_files_verified


def test_this_machine_does_not_crash() -> None:
    """Whatever this machine is (probably not EFI-booted, no lockdown LSM), the real
    /sys and /proc give a consistent answer."""
    got = status()
    assert got.uefi is Path("/sys/firmware/efi").is_dir()
    if not got.uefi:
        assert not got.enabled and not got.setup_mode and not got.boot_files_verified
    assert got.lockdown in (None, "none", "integrity", "confidentiality")
    assert got.boot_files_verified <= (got.enabled and not got.setup_mode)
    assert json.loads(json.dumps(got.to_json())) == got.to_json()
    assert got.summary().startswith("Secure Boot: ")


def test_slot_status_reports_the_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st = SlotState(Flags(1, 0, True), Flags(), "A", ever_succeeded=True)
    chain = status(*tree(tmp_path, secure_boot=1, setup_mode=0, cmdline=ENFORCED,
                         lockdown="none [integrity] confidentiality"))
    _print_status(st, True, chain)
    doc = json.loads(capsys.readouterr().out)
    assert doc["secure_boot"] == {"uefi": True, "enabled": True, "setup_mode": False, "boot_files_verified": True,
                                  "lockdown": "integrity", "root_verified": True}
    assert doc["active"] == "A"
    _print_status(st, False, chain)
    text = capsys.readouterr().out
    assert ("Secure Boot: on; boot files verified: yes; lockdown: integrity; root verified (dm-verity): yes"
            in text.splitlines())
    _print_status(st, True, None)  # a disk image (--image): nothing to say about a running firmware
    assert "secure_boot" not in json.loads(capsys.readouterr().out)
    off = SecureBootStatus(False, False, False, False, None, False)
    _print_status(st, False, off)
    assert "Secure Boot: off (not booted by UEFI); boot files verified: no; lockdown: unsupported" \
        in capsys.readouterr().out
