"""Confirm a healthy boot: mark the running slot successful, then print the ready line.

Runs only after kiln-ready.target is reached (every unit the host needs is up), so a
slot that never gets this far keeps zero tries and GRUB falls back to the other one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kiln.core.errors import KilnError
from kiln.host.slot import Slots, booted_slot


def os_release(path: Path = Path("/etc/os-release")) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v.strip('"')
    return out


def ready_line(osr: dict[str, str], slot: str) -> str:
    return f"kiln: ready version={osr.get('VERSION_ID', '?')} variant={osr.get('VARIANT_ID', '?')} slot={slot}"


def main() -> int:
    slot = booted_slot()
    if slot is None:
        print("kiln: not booted through Kiln's boot chain (no kiln.slot=)", file=sys.stderr)
        return 1
    try:
        Slots.open(active=slot).apply("mark-successful-boot")
    except KilnError as e:
        print(f"kiln: cannot mark slot {slot} successful: {e}", file=sys.stderr)
        return 1
    # The serial getty may hang up /dev/ttyS0 users; /dev/console always reaches the log.
    with open("/dev/console", "w") as console:
        print(ready_line(os_release(), slot), file=console, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
