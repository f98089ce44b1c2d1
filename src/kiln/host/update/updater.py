"""The update daemon on a real host: a thread of the host agent (kiln.host.agent), or
`python3 -m kiln.host.update.updater` on its own.

`RealHost` is the daemon's HostPort on a running Kiln host: the live settings, the slots,
the update agent's commands run in this process under the update lock (so `kiln update
…` from the API and the daemon never run at once), the containers, and systemd's reboot.
Between passes `Loop` sleeps in one blocking wait (no CPU); a change of settings.updates
(the agent's reload, or SIGHUP when run alone) wakes it at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from kiln.core.errors import KilnError
from kiln.host.boot.console import say
from kiln.host.update import failures
from kiln.host.update.daemon import Updater
from kiln.host.update.status import Paths

if TYPE_CHECKING:
    from kiln.host.containers.supervise import Supervisor

# The application key of Kiln's host id, as systemd's sd_id128_get_machine_app_specific()
# and Zincati use one: the machine id never leaves the host, but the id is stable across
# reboots and updates. (Zincati's own key is de35106b6ec24688b63afddaa156679b.)
APP_ID = uuid.UUID("5d3b0a4e-7c1f-4f38-9a61-2e8f0b6c4d17")
MACHINE_ID = Path("/etc/machine-id")
CONFIG = Path("/etc/kiln/updater")  # rendered from settings.updates.strategy
SYSTEMCTL = "/usr/bin/systemctl"


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
    def __init__(self, paths: Paths | None = None, containers: Callable[[], Supervisor | None] | None = None) -> None:
        self.paths = paths or Paths()
        self.containers = containers  # the agent's container supervisor, once it runs
        self._drained: Supervisor | None = None

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
        """Workloads first, then host containers, each with SIGTERM and SIGKILL after its
        stop-timeout; blocks until they are stopped. The supervisor runs in the same process
        (the host agent); without one there is nothing to drain."""
        sup = self.containers() if self.containers else None
        if sup is None:
            return
        say("kiln-updater: draining: stopping the workloads, then the host containers")
        stopped = sup.drain()
        if stopped:
            say(f"kiln-updater: drained: {' '.join(stopped)}")
        self._drained = sup

    def undrain(self) -> None:
        if self._drained is not None:
            self._drained.undrain()
            self._drained = None

    def reboot(self) -> None:
        from kiln.core.run import run

        say("kiln-updater: rebooting into the new version")
        run([SYSTEMCTL, "reboot"], timeout=60)


class Loop:
    """The daemon's life: a pass, what changed said once, then one blocking wait until the
    next pass is due or `poke()` (settings.updates changed) wakes it. No CPU between passes."""

    def __init__(self, updater: Updater) -> None:
        self.updater = updater
        self._wake = threading.Event()
        self._stopping = False
        self._poked = 0

    def poke(self) -> None:
        """Look again now (safe from a signal handler or another thread)."""
        self._poked += 1
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def run(self) -> None:
        updater = self.updater
        updater.start()
        say(f"kiln-updater: id {updater.node_id}, strategy {updater.state.strategy}")
        said, phase = "", ""  # the first pass's phase always reaches the console
        while not self._stopping:
            try:
                nxt = updater.step()
            except KilnError as e:  # anything else is a bug: it ends the loop, its host restarts it
                print(f"kiln-updater: {e}", file=sys.stderr, flush=True)
                nxt = datetime.now(UTC) + timedelta(minutes=1)
            now_saying = f"{updater.state.phase}: {updater.state.reason}"
            if updater.state.phase != phase:  # the console gets phase changes, the journal every change
                say(f"kiln-updater: {now_saying}")
            elif now_saying != said:
                print(f"kiln-updater: {now_saying}", flush=True)
            said, phase = now_saying, updater.state.phase
            seen = self._poked
            self._wake.wait(max(0.0, (nxt - datetime.now(UTC)).total_seconds()))
            self._wake.clear()
            if self._poked != seen and not self._stopping:
                print("kiln-updater: settings changed: looking again", flush=True)


def configured(path: Path = CONFIG) -> bool:
    """Whether settings.updates asks for a daemon (the renderer leaves the file empty for manual)."""
    try:
        return bool(path.read_text().strip())
    except FileNotFoundError:
        return False


def make_loop(paths: Paths | None = None, containers: Callable[[], Supervisor | None] | None = None) -> Loop:
    """The daemon on this host; KilnError when the host cannot be identified."""
    paths = paths or Paths()
    try:
        ident = node_id(MACHINE_ID.read_text())
    except (OSError, ValueError) as e:
        raise KilnError(f"no usable machine id ({e}): cannot identify this host") from None
    return Loop(Updater(RealHost(paths, containers), state_path(paths), ident))


def main(argv: list[str] | None = None) -> int:
    """The daemon on its own (development); on a host it runs in kiln.host.agent."""
    try:
        loop = make_loop()
    except KilnError as e:
        print(f"kiln-updater: {e}", file=sys.stderr)
        return 1

    def on_hup(_sig: int, _frame: FrameType | None) -> None:
        loop.poke()

    signal.signal(signal.SIGHUP, on_hup)
    loop.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
