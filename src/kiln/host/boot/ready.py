"""Confirm a healthy boot: mark the running slot successful, then print the ready line.

Runs only after kiln-ready.target is reached (every unit the host needs is up), so a
slot that never gets this far keeps zero tries and GRUB falls back to the other one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kiln.core.errors import KilnError
from kiln.host.osinfo import os_release
from kiln.host.slot import Slots, booted_slot


def ready_line(osr: dict[str, str], slot: str) -> str:
    return f"kiln: ready version={osr.get('version_id', '?')} variant={osr.get('variant_id', '?')} slot={slot}"


def status_line() -> str:
    """A one-line summary for the console: how the root is mounted and what runs."""
    from kiln.core.run import run  # after the ready line: not on the boot's critical path

    mounts = {}
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype, opts = line.split()[:4]
        mounts[mnt] = (dev, fstype, opts.split(",")[0])
    root = mounts.get("/", ("?", "?", "?"))
    verity = "dm-verity" if root[0].startswith("/dev/mapper/kiln-root") or root[0].startswith("/dev/dm-") else root[0]
    argv = ["systemctl", "list-units", "--type=service", "--state=running", "--no-legend", "--plain"]
    units = run(argv, check=False).stdout.decode().split()
    services = sorted(u.removesuffix(".service") for u in units if u.endswith(".service"))
    return (f"kiln: status root={verity},{root[1]},{root[2]} etc={mounts.get('/etc', ('?', '?'))[1]} "
            f"local={mounts.get('/local', ('?', '?'))[1]} services={','.join(services)}")


def main() -> int:
    slot = booted_slot()
    if slot is None:
        print("kiln: not booted through Kiln's boot chain (no kiln.slot=)", file=sys.stderr)
        return 1
    try:
        slots = Slots.open(active=slot)
        try:
            slots.state()
        except KilnError as e:  # GRUB fell back to A on an unreadable grubenv; repair it
            slots.reset_to_active()
            with open("/dev/console", "w") as console:
                print(f"kiln: grubenv was unreadable ({e}); rewrote it: slot {slot} good, "
                      "the other slot cleared", file=console, flush=True)
        slots.apply("mark-successful-boot")
    except KilnError as e:
        print(f"kiln: cannot mark slot {slot} successful: {e}", file=sys.stderr)
        return 1
    # The serial getty may hang up /dev/ttyS0 users; /dev/console always reaches the log.
    with open("/dev/console", "w") as console:
        print(ready_line(os_release(), slot), file=console, flush=True)
        print(status_line(), file=console, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
