"""`kiln slot …`: the A/B state (signpost), on this host or on a disk image (`--image`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kiln.host.secureboot import SecureBootStatus, status
from kiln.host.slot.state import TRANSITIONS, SlotState


def _print_status(st: SlotState, as_json: bool, boot: SecureBootStatus | None = None) -> None:
    """Both slots; with `boot` (this host, not a disk image), what its boot chain verified."""
    if as_json:
        doc = st.to_json()
        if boot is not None:
            doc["secure_boot"] = boot.to_json()
        print(json.dumps(doc, indent=2))
        return
    for s in ("A", "B"):
        f = st.flags(s)
        mark = " (active)" if s == st.active else ""
        print(f"Slot {s}{mark}: priority={f.priority} tries_left={f.tries_left} "
              f"successful={str(f.successful).lower()} will_boot={str(f.will_boot).lower()}")
    print(f"Active: {st.active or 'unknown'}")
    print(f"Next boot: {st.next_boot or 'none (no bootable slot)'}")
    if boot is not None:
        print(boot.summary())


def cmd_slot(args: argparse.Namespace) -> int:
    from kiln.host.slot import Slots

    slots = Slots.open(image=args.image, active=args.active)
    if args.slot_command == "status":
        _print_status(slots.state(), bool(args.json), None if args.image is not None else status())
    elif args.slot_command == "has-boot-ever-succeeded":
        ever = slots.state().ever_succeeded
        print(json.dumps({"ever_succeeded": ever}) if bool(args.json) else str(ever).lower())
    else:
        st = slots.apply(args.slot_command)
        if bool(args.json):
            print(json.dumps(st.to_json(), indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def options(p: argparse.ArgumentParser, default: object) -> None:
        # Accepted before or after the subcommand: `kiln slot --json status` = `kiln slot status --json`.
        p.add_argument("--image", type=Path, default=default, help="work on a disk image file instead of this host")
        p.add_argument("--active", choices=("A", "B"), default=default,
                       help="the slot to treat as running (with --image)")
        p.add_argument("--json", action="store_true", default=default, help="machine-readable output")

    slot = sub.add_parser("slot", help="A/B slot state (signpost)")
    options(slot, None)
    ssub = slot.add_subparsers(dest="slot_command", required=True)
    helps = {
        "status": "show both slots and the next boot",
        "has-boot-ever-succeeded": "true once any boot was marked successful",
        "mark-successful-boot": "confirm the running slot (done by the host agent at boot)",
        "clear-inactive": "make the other slot unbootable before writing it",
        "mark-inactive-valid": "give the freshly written other slot one try",
        "upgrade-to-inactive": "boot the other slot next (it must be cleared and marked valid)",
        "cancel-upgrade": "undo upgrade-to-inactive",
        "rollback-to-inactive": "boot the other, previously good slot next",
    }
    for name in ("status", "has-boot-ever-succeeded", *TRANSITIONS):
        options(ssub.add_parser(name, help=helps[name]), argparse.SUPPRESS)
    slot.set_defaults(func=cmd_slot)
