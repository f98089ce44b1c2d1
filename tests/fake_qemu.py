"""A stand-in for qemu-system-x86_64 with -no-reboot, for the VM harness's unit tests
(tests/test_vm_lifecycle.py): it lives as long as one boot of a guest would, prints a
ready line on its "serial console" (stdout), answers QMP on STATE/qmp.sock, and ends the
way a QEMU does when its guest resets or powers off (exit 0 after the kernel's last line).
Only the process lifetime is faked; the real thing is tested in tests/vm/test_run.py.

Every start appends its pid to STATE/pids (the boot number is that line's number) and
every power-button press "BOOT firmware|os" to STATE/presses.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("state", type=Path)
    ap.add_argument("--resets", type=int, default=0, help="this many boots end in a guest reset")
    ap.add_argument("--firmware", type=float, default=0.0, help="seconds before the OS runs: a press is lost")
    ap.add_argument("--on-button", choices=("power-off", "reset"), default="power-off",
                    help="reset: the guest was already going down for a reboot")
    ap.add_argument("--exit", type=int, help="exit with this status after the ready line (a failing QEMU)")
    ap.add_argument("--power-off-after", type=float, help="the guest powers itself off after this many seconds")
    args = ap.parse_args()

    with open(args.state / "pids", "a") as f:
        f.write(f"{os.getpid()}\n")
    boot = len((args.state / "pids").read_text().split())
    path = args.state / "qmp.sock"
    path.unlink(missing_ok=True)  # as QEMU does with a stale socket
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    server.settimeout(0.05)
    say(f"BdsDxe: fake firmware, boot {boot}")
    t0 = time.monotonic()
    up = False
    while True:
        now = time.monotonic() - t0
        if not up and now >= args.firmware:
            up = True
            say(f"kiln: ready version=1.0.{boot} variant=fake slot={'AB'[boot % 2]}")
            if args.exit is not None:
                sys.exit(args.exit)
            if boot <= args.resets:
                time.sleep(0.1)
                say("reboot: Restarting system")
                return
        if args.power_off_after is not None and now >= args.power_off_after:
            say("reboot: Power down")
            return
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        pressed = False
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                command = json.loads(line)["execute"]
                if command == "system_powerdown":
                    with open(args.state / "presses", "a") as p:
                        p.write(f"{boot} {'os' if up else 'firmware'}\n")
                    pressed = up
                f.write(b'{"return": {}}\n')
                f.flush()
        if pressed:
            say("reboot: Power down" if args.on_button == "power-off" else "reboot: Restarting system")
            return


if __name__ == "__main__":
    main()
