"""What this host's boot chain verified: Secure Boot, GRUB's signature checks, lockdown, dm-verity.

Read from the kernel's own views, never from Kiln's configuration, so the report says what
happened at this boot, not what was asked for:

- efivarfs `SecureBoot-8be4df61-…` and `SetupMode-…`: 4 bytes of attributes, then the
  one-byte value the firmware set at this boot (UEFI 2.10, 3.3: read-only at runtime);
- `/sys/kernel/security/lockdown`: "none [integrity] confidentiality", the bracketed word;
- `/proc/cmdline`: `kiln.bootsig=enforce` is appended by grub.cfg only when GRUB runs
  with `check_signatures=enforce`, and that grub.cfg is itself signature-checked;
- `/proc/self/mountinfo` + `/sys/dev/block/M:m/dm/name`: the root filesystem is the
  device-mapper device `kiln-root`, which the initramfs creates only as a dm-verity target
  with restart_on_corruption (it refuses a table without it), from `kiln.verity=`.

`boot_files_verified` claims the whole chain up to the kernel and initramfs, so it holds
only when each link did: the firmware enforced db (Secure Boot on, not in setup mode) and
the GRUB it started enforced signatures. Stdlib only and cheap: GET /os calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict, cast, get_args

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
BOOTSIG_ENFORCED = "kiln.bootsig=enforce"
ROOT_DM_NAME = "kiln-root"
Lockdown = Literal["none", "integrity", "confidentiality"]
LOCKDOWN_MODES: tuple[str, ...] = get_args(Lockdown)


class SecureBootJson(TypedDict):
    """`secure_boot` in `kiln slot status --json` and GET /os."""

    uefi: bool
    enabled: bool
    setup_mode: bool
    boot_files_verified: bool
    lockdown: Lockdown | None
    root_verified: bool


@dataclass(frozen=True)
class SecureBootStatus:
    uefi: bool  # booted by UEFI firmware (/sys/firmware/efi exists)
    enabled: bool  # the firmware enforced Secure Boot at this boot
    setup_mode: bool  # no PK enrolled: the firmware runs anything
    boot_files_verified: bool  # firmware checked GRUB and GRUB checked every file it loaded
    lockdown: Lockdown | None  # None: the kernel has no lockdown LSM (or securityfs is absent)
    root_verified: bool  # / is dm-verity (kiln-root)

    def to_json(self) -> SecureBootJson:
        return {"uefi": self.uefi, "enabled": self.enabled, "setup_mode": self.setup_mode,
                "boot_files_verified": self.boot_files_verified, "lockdown": self.lockdown,
                "root_verified": self.root_verified}

    def summary(self) -> str:
        """One line for `kiln slot status`."""
        if not self.uefi:
            sb = "off (not booted by UEFI)"
        elif self.setup_mode:
            sb = "off (setup mode: no platform key enrolled)"
        else:
            sb = "on" if self.enabled else "off"
        return (f"Secure Boot: {sb}; boot files verified: {_yes(self.boot_files_verified)}; "
                f"lockdown: {self.lockdown or 'unsupported'}; root verified (dm-verity): {_yes(self.root_verified)}")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def efi_flag(efivars: Path, name: str, guid: str = EFI_GLOBAL) -> bool | None:
    """A one-byte UEFI variable (after efivarfs' 4 attribute bytes); None if absent or unreadable."""
    try:
        data = (efivars / f"{name}-{guid}").read_bytes()
    except OSError:
        return None
    return data[4] == 1 if len(data) == 5 else None


def lockdown_mode(sys_root: Path = Path("/sys")) -> Lockdown | None:
    """The kernel's lockdown mode: the bracketed word of /sys/kernel/security/lockdown."""
    try:
        text = (sys_root / "kernel/security/lockdown").read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]") and word[1:-1] in LOCKDOWN_MODES:
            return cast(Lockdown, word[1:-1])
    return None


def bootsig_enforced(proc_root: Path = Path("/proc")) -> bool:
    try:
        return BOOTSIG_ENFORCED in (proc_root / "cmdline").read_text().split()
    except OSError:
        return False


def root_is_verity(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc")) -> bool:
    """/ is mounted from the device-mapper device the initramfs made with dm-verity."""
    try:
        lines = (proc_root / "self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    device = None
    for line in lines:  # the last mount on / is the one in effect
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/":
            device = fields[2]
    if device is None:
        return False
    try:
        return (sys_root / "dev/block" / device / "dm/name").read_text().strip() == ROOT_DM_NAME
    except OSError:
        return False


def status(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc")) -> SecureBootStatus:
    """This boot's chain as the kernel saw it (roots are parameters for tests)."""
    uefi = (sys_root / "firmware/efi").is_dir()
    efivars = sys_root / "firmware/efi/efivars"
    enabled = uefi and efi_flag(efivars, "SecureBoot") is True
    setup_mode = uefi and efi_flag(efivars, "SetupMode") is True
    return SecureBootStatus(
        uefi=uefi, enabled=enabled, setup_mode=setup_mode,
        boot_files_verified=enabled and not setup_mode and bootsig_enforced(proc_root),
        lockdown=lockdown_mode(sys_root), root_verified=root_is_verity(sys_root, proc_root),
    )
