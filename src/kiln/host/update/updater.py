"""kiln-updater.service: the update daemon on a real host (`python3 -m kiln.host.update.updater`).

`RealHost` is the daemon's HostPort on a running Kiln host: the live settings, the slots,
the update agent's commands run in this process under the update lock (so `kiln update
…` from the API and the daemon never run at once), the container units, and systemd's
reboot. Between passes it sleeps in one blocking wait (no CPU); SIGHUP (the settings
renderer's reload when settings.updates changes) wakes it at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.boot.console import say
from kiln.host.update import failures
from kiln.host.update.daemon import Updater
from kiln.host.update.status import Paths

# The application key of Kiln's host id, as systemd's sd_id128_get_machine_app_specific()
# and Zincati use one: the machine id never leaves the host, but the id is stable across
# reboots and updates. (Zincati's own key is de35106b6ec24688b63afddaa156679b.)
APP_ID = uuid.UUID("5d3b0a4e-7c1f-4f38-9a61-2e8f0b6c4d17")
MACHINE_ID = Path("/etc/machine-id")
SYSTEMCTL = "/usr/bin/systemctl"
CONTAINERS_UNIT = "kiln-containers.service"  # the container supervisor (kiln.host.containers.supervise)
DRAIN_TIMEOUT = 400.0  # seconds for systemctl stop: the longest stop-timeout is 300 s


def node_id(machine_id: str, app: uuid.UUID = APP_ID) -> str:
    """HMAC-SHA256 keyed by the machine id over the application id, cut to 128 bits and
    marked as a version 4 UUID: systemd's app-specific id, in 32 lower-case hex digits."""
    key = bytes.fromhex(machine_id.strip().replace("-", ""))
    digest = bytearray(hmac.new(key, app.bytes, hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40
    digest[8] = (digest[8] & 0x3F) | 0x80
    return digest.hex()


def state_path(paths: Paths | None = None) -> Path:
    return (paths or Paths()).state / "daemon.json"


class RealHost:
    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths()
        self._drained: list[str] = []

    def _agent(self) -> Any:
        from kiln.host.update.agent import from_host

        return from_host(self.paths)

    def settings(self) -> dict[str, Any]:
        from kiln.host.datastore import Datastore

        return dict(Datastore().live().get("updates") or {})

    def running_version(self) -> str:
        from kiln.host.osinfo import os_release

        return os_release().get("version_id", "0.0.0")

    def running_slot(self) -> str | None:
        from kiln.host.slot import booted_slot

        return booted_slot()

    def gate_passed(self) -> bool:
        from kiln.host.slot import Slots

        slots = Slots.open()
        return bool(slots.state().flags(slots.active or "A").successful)

    def update_state(self) -> tuple[str, str | None, str]:
        st = self._agent().status()
        return st.update_state, st.staged_version, st.reason

    def command(self, name: str) -> None:
        from kiln.host.update.agent import acquire

        agent = self._agent()
        fd = acquire(agent.paths)  # Busy (a KilnError) while `kiln update …` runs one
        try:
            agent.run(name)
        finally:
            os.close(fd)

    def verdict(self, version: str, max_attempts: int) -> failures.Verdict | None:
        return failures.verdicts(failures.read(self.paths.failures), max_attempts).get(version)

    def drain(self) -> None:
        """Stop the container supervisor: on SIGTERM it stops the workloads, then the host
        containers (SIGTERM, SIGKILL after each one's stop-timeout), and `systemctl stop`
        waits for that. A supervisor that is not running has nothing to drain."""
        from kiln.core.run import run

        active = run([SYSTEMCTL, "is-active", "--quiet", CONTAINERS_UNIT], check=False, timeout=60)
        if active.returncode == 0:
            say(f"kiln-updater: draining: stopping {CONTAINERS_UNIT} (workloads, then host containers)")
            run([SYSTEMCTL, "stop", CONTAINERS_UNIT], timeout=DRAIN_TIMEOUT)
            self._drained = [CONTAINERS_UNIT]

    def undrain(self) -> None:
        from kiln.core.run import run

        if self._drained:
            run([SYSTEMCTL, "start", "--no-block", *self._drained], check=False, timeout=60)
            self._drained = []

    def reboot(self) -> None:
        from kiln.core.run import run

        say("kiln-updater: rebooting into the new version")
        run([SYSTEMCTL, "reboot"], timeout=60)


def main(argv: list[str] | None = None) -> int:
    paths = Paths()
    try:
        ident = node_id(MACHINE_ID.read_text())
    except (OSError, ValueError) as e:
        print(f"kiln-updater: no usable machine id ({e}): cannot identify this host", file=sys.stderr)
        return 1
    updater = Updater(RealHost(paths), state_path(paths), ident)
    wake = threading.Event()

    reloads = [0]

    def on_hup(_sig: int, _frame: FrameType | None) -> None:
        reloads[0] += 1
        wake.set()

    signal.signal(signal.SIGHUP, on_hup)
    updater.start()
    say(f"kiln-updater: id {ident}, strategy {updater.state.strategy}")
    said, phase = "", ""  # the first pass's phase always reaches the console
    while True:
        try:
            nxt = updater.step()
        except KilnError as e:  # anything else is a bug: the process ends and systemd restarts it
            print(f"kiln-updater: {e}", file=sys.stderr, flush=True)
            nxt = datetime.now(UTC) + timedelta(minutes=1)
        now_saying = f"{updater.state.phase}: {updater.state.reason}"
        if updater.state.phase != phase:  # the console gets phase changes, the journal every change
            say(f"kiln-updater: {now_saying}")
        elif now_saying != said:
            print(f"kiln-updater: {now_saying}", flush=True)
        said, phase = now_saying, updater.state.phase
        seen = reloads[0]
        wake.wait(max(0.0, (nxt - datetime.now(UTC)).total_seconds()))
        wake.clear()
        if reloads[0] != seen:
            print("kiln-updater: settings changed (SIGHUP): looking again", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
