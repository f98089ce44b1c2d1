"""Confirm a healthy boot: mark the running slot successful, then print the ready line.

Runs once kiln-ready.target has finished starting (reached or failed). First it reports
an update that GRUB fell back from (the other slot was tried and never marked
successful), or a slot GRUB skipped because its boot files did not load or verify; then
the health gate (kiln.host.boot.health) must pass; only then is the slot marked
successful. A new version that fails the gate reboots into the previous one.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.boot import health
from kiln.host.boot.console import say
from kiln.host.osinfo import os_release
from kiln.host.slot import Slots, SlotState, booted_slot, skipped_slot
from kiln.host.update import failures
from kiln.host.update.status import Paths, write_versions

UNHEALTHY = failures.UNHEALTHY
BOOT_FILES = "its boot files (kiln.cfg, kernel or initramfs) did not load or verify"
Wait = Callable[[health.Check], str | None]


def _reboot() -> None:
    from kiln.core.run import run

    run(["systemctl", "reboot"], check=False)


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


def fell_back(st: SlotState) -> bool:
    """GRUB chose the running slot because the other one, the upgrade target (higher
    priority), spent its try without ever being marked successful."""
    other, mine = st.flags(st.inactive), st.flags(st.active or "A")
    return other.priority > mine.priority and not other.will_boot and not other.successful


def rolls_back(st: SlotState) -> bool:
    """After a failed health gate: reboot into the other slot only when the running version
    was never marked successful here, and the other slot would boot."""
    return not st.flags(st.active or "A").successful and st.flags(st.inactive).will_boot


def report_fallback(slots: Slots, st: SlotState, paths: Paths, running: str, skipped: str | None = None) -> None:
    """If GRUB fell back from the other slot (tried, never successful) or skipped it (its
    boot files did not load: `skipped`, from kiln.skipped=), log why, then clear that slot
    so the report is made once and the broken version cannot boot."""
    import json
    import time

    from kiln.host.update.status import read_versions, write_versions

    other = st.inactive
    was_skipped = skipped is not None and skipped == other and st.flags(other).priority > 0
    if not (fell_back(st) or was_skipped):
        return
    pending = paths.state / "pending-failure.json"
    note: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        note = json.loads(pending.read_bytes())
    reason = BOOT_FILES if was_skipped else note.get("reason") if note.get("slot") == other else None
    version = read_versions(paths).get(other) or (note.get("version") if reason else None) or "unknown"
    # A reason means a definite failure: GRUB refused the files, or the new version judged
    # itself (health gate). Otherwise it never got that far, which a power cut cannot be
    # told apart from: ambiguous.
    entry = {"version": version, "slot": other, "reason": reason or UNHEALTHY,
             "kind": failures.DEFINITE if reason else failures.AMBIGUOUS,
             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "running": running}
    failures.record(paths.failures, entry)
    if was_skipped and not fell_back(st):
        say(f"kiln: slot {other} ({version}) did not boot: {reason}; running {running} on slot {slots.active}")
    else:
        say(f"kiln: update to {version} failed ({entry['reason']}); rolled back to {running} on slot {slots.active}")
    slots.apply("clear-inactive")
    write_versions(paths, {other: None})
    pending.unlink(missing_ok=True)


def _live_settings() -> dict[str, Any]:
    from kiln.host.datastore import Datastore

    try:
        return Datastore().live()
    except Exception:  # no settings: the gate then checks the defaults
        return {}


def gate(slots: Slots, st: SlotState, paths: Paths, version: str, *, settings: dict[str, Any] | None = None,
         wait: Wait = health.wait_healthy, reboot: Callable[[], None] = _reboot, broken: str | None = None) -> bool:
    """The health gate; on failure of a version never marked successful, reboot into
    the other slot when it would boot. Returns True when healthy. (`settings`, `wait` and
    `reboot` default to the host's: tests pass their own; `broken` fails it at once.)"""
    import json

    from kiln.core.fs import atomic_write

    reason = broken or wait(health.Check.from_settings(_live_settings() if settings is None else settings))
    if reason is None:
        return True
    slot = slots.active or "A"
    say(f"kiln: not ready: {reason}")
    if rolls_back(st):
        note = {"version": version, "slot": slot, "reason": f"health gate failed: {reason}"}
        paths.state.mkdir(parents=True, exist_ok=True)
        atomic_write(paths.state / "pending-failure.json", json.dumps(note).encode())
        say(f"kiln: version {version} failed its health gate; rebooting into slot {st.inactive}")
        reboot()
    return False


def confirm(slots: Slots, paths: Paths, version: str, *, settings: dict[str, Any] | None = None,
            wait: Wait = health.wait_healthy, reboot: Callable[[], None] = _reboot,
            skipped: str | None = None, broken: str | None = None) -> bool:
    """Everything between the boot and the ready line: repair an unreadable grubenv,
    report a fallback, pass the health gate, mark the slot successful. True when marked."""
    slot = slots.active or "A"
    try:
        st = slots.state()
    except KilnError as e:  # GRUB fell back to A on an unreadable grubenv; repair it
        st = slots.reset_to_active()
        say(f"kiln: grubenv was unreadable ({e}); rewrote it: slot {slot} good, the other slot cleared")
    report_fallback(slots, st, paths, version, skipped)
    st = slots.state()
    if not gate(slots, st, paths, version, settings=settings, wait=wait, reboot=reboot, broken=broken):
        return False
    slots.apply("mark-successful-boot")
    write_versions(paths, {slot: version})
    return True


def boot_gate(broken: str | None = None, *, target_reached: bool = False) -> bool:
    """The boot's gate on a real host, once kiln-ready.target has finished starting: True
    when the slot was marked successful and the ready line printed. `broken` is why the
    host cannot be healthy whatever the checks say (the settings pipeline failed);
    `target_reached`: the caller's `systemctl start` of the target succeeded."""
    slot = booted_slot()
    if slot is None:
        print("kiln: not booted through Kiln's boot chain (no kiln.slot=)", file=sys.stderr)
        return False
    version = os_release().get("version_id", "?")
    try:
        wait = functools.partial(health.wait_healthy, target_reached=target_reached)
        if not confirm(Slots.open(active=slot), Paths(), version, skipped=skipped_slot(), broken=broken, wait=wait):
            return False
    except KilnError as e:
        print(f"kiln: cannot mark slot {slot} successful: {e}", file=sys.stderr)
        return False
    # The serial getty may hang up /dev/ttyS0 users; /dev/console always reaches the log.
    with open("/dev/console", "w") as console:
        print(ready_line(os_release(), slot), file=console, flush=True)
        print(status_line(), file=console, flush=True)
    return True


def main() -> int:
    return 0 if boot_gate() else 1


if __name__ == "__main__":
    raise SystemExit(main())
