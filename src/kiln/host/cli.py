"""`kiln` inside the image: the commands that make sense on a host (argparse, lean imports).

The workstation CLI (kiln.cli) registers the same groups, so `kiln slot status --image
disk.img` works from outside too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kiln.core.errors import KilnError
from kiln.host.slot.state import TRANSITIONS, SlotState


def _print_status(st: SlotState, as_json: bool) -> None:
    if as_json:
        print(json.dumps(st.to_json(), indent=2))
        return
    for s in ("A", "B"):
        f = st.flags(s)
        mark = " (active)" if s == st.active else ""
        print(f"Slot {s}{mark}: priority={f.priority} tries_left={f.tries_left} "
              f"successful={str(f.successful).lower()} will_boot={str(f.will_boot).lower()}")
    print(f"Active: {st.active or 'unknown'}")
    print(f"Next boot: {st.next_boot or 'none (no bootable slot)'}")


def cmd_slot(args: argparse.Namespace) -> int:
    from kiln.host.slot import Slots

    slots = Slots.open(image=args.image, active=args.active)
    if args.slot_command == "status":
        _print_status(slots.state(), args.json)
    elif args.slot_command == "has-boot-ever-succeeded":
        ever = slots.state().ever_succeeded
        print(json.dumps({"ever_succeeded": ever}) if args.json else str(ever).lower())
    else:
        st = slots.apply(args.slot_command)
        if args.json:
            print(json.dumps(st.to_json(), indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    slot = sub.add_parser("slot", help="A/B slot state (signpost)")
    slot.add_argument("--image", type=Path, help="work on a disk image file instead of this host")
    slot.add_argument("--active", choices=("A", "B"), help="the slot to treat as running (with --image)")
    slot.add_argument("--json", action="store_true", help="machine-readable output")
    ssub = slot.add_subparsers(dest="slot_command", required=True)
    ssub.add_parser("status", help="show both slots and the next boot")
    ssub.add_parser("has-boot-ever-succeeded", help="true once any boot was marked successful")
    for name in TRANSITIONS:
        ssub.add_parser(name, help=f"{name.replace('-', ' ')}")
    slot.set_defaults(func=cmd_slot)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln host commands")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
