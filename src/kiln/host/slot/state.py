"""A/B slot state and its transitions: Bottlerocket signpost's rules, kept in a grubenv.

Each slot has a priority (0-15), tries left (0-15) and a successful flag; GRUB boots the
slot with the highest priority that will boot, spending one try when it has any. The
transitions below are pure functions so every precondition can be tested without a disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from kiln.core.errors import KilnError

SLOTS = ("A", "B")


class SlotError(KilnError):
    """A slot command whose precondition does not hold; nothing was written."""


@dataclass(frozen=True)
class Flags:
    priority: int = 0
    tries_left: int = 0
    successful: bool = False

    @property
    def will_boot(self) -> bool:
        return self.priority > 0 and (self.tries_left > 0 or self.successful)


@dataclass(frozen=True)
class SlotState:
    a: Flags
    b: Flags
    active: str | None  # the slot running now (None when looking at a disk from outside)
    ever_succeeded: bool = False

    def flags(self, slot: str) -> Flags:
        return self.a if slot == "A" else self.b

    def with_flags(self, slot: str, flags: Flags) -> SlotState:
        return replace(self, a=flags) if slot == "A" else replace(self, b=flags)

    @property
    def inactive(self) -> str:
        return "B" if self._active() == "A" else "A"

    def _active(self) -> str:
        if self.active not in SLOTS:
            raise SlotError("the active slot is unknown", hint="pass --active A|B when working on a disk image")
        return self.active

    @property
    def next_boot(self) -> str | None:
        """The slot GRUB will pick: highest priority among bootable slots, A on a tie."""
        best: str | None = None
        for s in SLOTS:
            f = self.flags(s)
            if f.will_boot and (best is None or f.priority > self.flags(best).priority):
                best = s
        return best

    # --- serialisation to and from grubenv variables -----------------------------------
    @classmethod
    def from_env(cls, env: dict[str, str], active: str | None) -> SlotState:
        def num(key: str, hi: int) -> int:
            raw = env.get(key, "0")
            # Canonical ASCII decimal only: GRUB's test reads "010" (8) or "١" differently.
            if not re.fullmatch(r"0|[1-9][0-9]?", raw) or int(raw) > hi:
                raise KilnError(f"grubenv: {key}={raw!r} is not a number in 0..{hi}")
            return int(raw)

        flags = [Flags(num(f"{s}_PRIO", 15), num(f"{s}_TRIES", 15), num(f"{s}_OK", 1) == 1) for s in SLOTS]
        return cls(flags[0], flags[1], active, env.get("EVER_OK") == "1")

    def to_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for s in SLOTS:
            f = self.flags(s)
            env[f"{s}_PRIO"] = str(f.priority)
            env[f"{s}_TRIES"] = str(f.tries_left)
            env[f"{s}_OK"] = "1" if f.successful else "0"
        env["EVER_OK"] = "1" if self.ever_succeeded else "0"
        return env

    def to_json(self) -> dict[str, Any]:
        def slot(s: str) -> dict[str, Any]:
            f = self.flags(s)
            return {"priority": f.priority, "tries_left": f.tries_left, "successful": f.successful,
                    "will_boot": f.will_boot}

        return {"A": slot("A"), "B": slot("B"), "active": self.active, "next": self.next_boot,
                "ever_succeeded": self.ever_succeeded}


def grub_boot(st: SlotState) -> SlotState:
    """What grub.cfg does at power-on: boot `next_boot`, spending one of its tries first.

    The model the exhaustive searches use; tests/test_grub_cfg.py runs the real grub.cfg
    in grub-emu against the same states and checks that GRUB does exactly this."""
    slot = st.next_boot
    if slot is None:
        raise SlotError("no slot would boot: GRUB reboots")
    f = st.flags(slot)
    if f.tries_left > 0:
        st = st.with_flags(slot, replace(f, tries_left=f.tries_left - 1))
    return replace(st, active=slot)


# --- transitions (signpost's commands) ----------------------------------------------------

def mark_successful_boot(st: SlotState) -> SlotState:
    a = st._active()
    return replace(st.with_flags(a, replace(st.flags(a), successful=True)), ever_succeeded=True)


def _require_active_bootable(st: SlotState, command: str) -> None:
    """Refuse to take away the other slot while the running one would not boot again
    (it spent its try and is not yet marked successful): that would leave no bootable slot."""
    a = st._active()
    if not st.flags(a).will_boot:
        raise SlotError(
            f"refusing {command}: the running slot {a} is not marked successful yet, "
            f"and slot {st.inactive} is the only one that would boot",
            hint="run mark-successful-boot first",
        )


def clear_inactive(st: SlotState) -> SlotState:
    _require_active_bootable(st, "clear-inactive")
    return st.with_flags(st.inactive, Flags(0, 0, False))


def mark_inactive_valid(st: SlotState) -> SlotState:
    i = st.inactive
    return st.with_flags(i, replace(st.flags(i), tries_left=1))


def upgrade_to_inactive(st: SlotState) -> SlotState:
    i, a = st.inactive, st._active()
    f = st.flags(i)
    if f.priority != 0 or f.successful or f.tries_left == 0:
        raise SlotError(
            f"cannot upgrade to slot {i}: it must be cleared and marked valid first "
            f"(priority={f.priority} tries_left={f.tries_left} successful={int(f.successful)})",
            hint="clear-inactive, write the images, mark-inactive-valid, then upgrade-to-inactive",
        )
    st = st.with_flags(i, replace(f, priority=2, successful=False))
    return st.with_flags(a, replace(st.flags(a), priority=1))


def cancel_upgrade(st: SlotState) -> SlotState:
    _require_active_bootable(st, "cancel-upgrade")
    i, a = st.inactive, st._active()
    st = st.with_flags(i, replace(st.flags(i), priority=0))
    return st.with_flags(a, replace(st.flags(a), priority=2))


def rollback_to_inactive(st: SlotState) -> SlotState:
    i, a = st.inactive, st._active()
    f = st.flags(i)
    if not f.will_boot:
        raise SlotError(
            f"cannot roll back to slot {i}: it would not boot "
            f"(priority={f.priority} tries_left={f.tries_left} successful={int(f.successful)})"
        )
    st = st.with_flags(i, replace(f, priority=2))
    return st.with_flags(a, replace(st.flags(a), priority=1))


TRANSITIONS = {
    "mark-successful-boot": mark_successful_boot,
    "clear-inactive": clear_inactive,
    "mark-inactive-valid": mark_inactive_valid,
    "upgrade-to-inactive": upgrade_to_inactive,
    "cancel-upgrade": cancel_upgrade,
    "rollback-to-inactive": rollback_to_inactive,
}
