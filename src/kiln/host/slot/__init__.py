"""A/B slots (Bottlerocket's signpost): state in the ESP's grubenv, partitions by GPT name.

The library API the update agent uses:

    slots = Slots.open()                      # the running host (or Slots.open(image=path))
    slots.apply("clear-inactive")
    slots.write_image(slots.state().inactive, "root", chunks)
    slots.apply("mark-inactive-valid"); slots.apply("upgrade-to-inactive")
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.core.errors import KilnError
from kiln.host.slot.state import SLOTS, TRANSITIONS, Flags, SlotError, SlotState

if TYPE_CHECKING:
    from kiln.host.slot.disk import Disk, Region

# The disk code (GPT, FAT, grubenv) is imported when a Slots is made, not with the package:
# `kiln` commands that only talk to the API import this package to register `kiln slot`.

__all__ = ["SLOTS", "Flags", "SlotError", "SlotState", "Slots"]


def _cmdline_value(name: str, cmdline: Path) -> str | None:
    for arg in cmdline.read_text().split():
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


def booted_slot(cmdline: Path = Path("/proc/cmdline")) -> str | None:
    return _cmdline_value("kiln.slot", cmdline)


def skipped_slot(cmdline: Path = Path("/proc/cmdline")) -> str | None:
    """The slot GRUB chose first but could not load (grub.cfg's `kiln.skipped=`): a boot
    file was missing or, with signatures enforced, did not verify."""
    return _cmdline_value("kiln.skipped", cmdline)


class Slots:
    def __init__(self, disk: Disk, active: str | None) -> None:
        if active is not None and active not in SLOTS:
            raise KilnError(f"active slot must be A or B, got {active!r}")
        from kiln.host.slot.disk import GrubenvStore

        self.disk = disk
        self.store = GrubenvStore(disk)
        self.active = active

    @classmethod
    def open(cls, image: Path | None = None, active: str | None = None) -> Slots:
        from kiln.host.slot.disk import Disk

        if image is not None:
            return cls(Disk.from_image(image), active)
        return cls(Disk.from_host(), active or booted_slot())

    def state(self) -> SlotState:
        return SlotState.from_env(self.store.read(), self.active)

    def apply(self, command: str) -> SlotState:
        """Run a signpost transition; writes only when it changes something."""
        if command not in TRANSITIONS:
            raise KilnError(f"unknown slot command '{command}'", hint=", ".join(TRANSITIONS))
        before = self.state()
        after = TRANSITIONS[command](before)
        if after != before:
            env = self.store.read()
            env.update(after.to_env())
            self.store.write(env)
        return after

    def reset_to_active(self) -> SlotState:
        """Rewrite an unreadable grubenv from what is known for sure: the running slot
        boots. The other slot's state is lost, so it is left cleared (unbootable)."""
        if self.active not in SLOTS:
            raise SlotError("cannot rewrite the grubenv: the running slot is unknown")
        st = SlotState(Flags(), Flags(), self.active, ever_succeeded=True)
        st = st.with_flags(self.active, Flags(1, 0, True))
        self.store.write(st.to_env())
        return st

    def partitions(self, slot: str) -> dict[str, Region]:
        from kiln.image import layout

        return {key: self.disk.region(layout.part_name(key, slot)) for key in ("boot", "root", "hash")}

    def write_image(
        self, slot: str, key: str, chunks: Iterable[bytes], *, digest: bool = True
    ) -> tuple[int, str | None]:
        """Stream an image into the *inactive* slot's partition `key` (boot, root or hash).

        Refused unless the slot is cleared (it cannot be booted while half-written)."""
        st = self.state()
        if slot == st.active:
            raise SlotError(f"refusing to write slot {slot}: it is the running slot")
        if st.flags(slot) != Flags(0, 0, False):
            raise SlotError(f"refusing to write slot {slot}: it is not cleared", hint="run clear-inactive first")
        from kiln.host.slot.disk import write_partition

        return write_partition(self.partitions(slot)[key], chunks, digest=digest)
