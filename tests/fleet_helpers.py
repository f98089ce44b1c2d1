"""Fleet test helpers: a FleetLock server in a thread or a process, and a simulated host.

`SimHost` is the update daemon's HostPort with a fake slot and a fake reboot: the daemon's
real state machine (kiln.host.update.daemon.Updater) runs against it, asking a real
FleetLock server whose state is in a real etcd cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.fleet.config import FleetConfig
from kiln.fleet.etcd import Etcd
from kiln.fleet.hosts import FleetHosts
from kiln.fleet.locks import FleetLocks
from kiln.fleet.release import ReleaseSource
from kiln.fleet.server import FleetLockService, FleetServer
from kiln.host.update import failures
from kiln.host.update.daemon import Updater
from kiln.host.update.fleetlock import FleetLockClient

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def fleet_server_thread(endpoints: list[str], config: FleetConfig | None = None,
                        locks: FleetLocks | None = None, tls: ssl.SSLContext | None = None,
                        hosts: FleetHosts | None = None, release: ReleaseSource | None = None) -> Iterator[str]:
    """`kiln fleet serve`'s server in a thread of this process; yields its base URL."""
    locks = locks or FleetLocks(Etcd(endpoints), config or FleetConfig())
    server = FleetServer(("127.0.0.1", 0), FleetLockService(locks, hosts, release), tls)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class ServerProcess:
    """`kiln fleet serve` as its own process (killable with SIGKILL, as a crash)."""

    endpoints: list[str]
    port: int
    config: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        argv = [sys.executable, "-m", "kiln.cli.main", "fleet", "serve", "--port", str(self.port), "--json"]
        for e in self.endpoints:
            argv += ["--etcd", e]
        if self.config:
            argv += ["--config", str(self.config)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once listening
        if not line:
            raise RuntimeError(f"kiln fleet serve exited with {self.proc.wait()}")
        assert json.loads(line)["port"] == self.port
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class SimHost:
    """A host for the daemon: a staged release waiting, a slot that becomes it on reboot."""

    version: str = "1.0.0"
    staged: str | None = "2.0.0"
    updates: dict[str, Any] = field(default_factory=dict)
    healthy: bool = True  # does the new version pass its health gate?
    failures_log: list[dict[str, Any]] = field(default_factory=list)
    drained: int = 0
    rebooted: threading.Event = field(default_factory=threading.Event)
    commands: list[str] = field(default_factory=list)
    slot: str = "A"

    def settings(self) -> dict[str, Any]:
        return self.updates

    def running_version(self) -> str:
        return self.version

    def running_slot(self) -> str:
        return self.slot

    def gate_passed(self) -> bool:
        return self.healthy

    def update_state(self) -> tuple[str, str | None, str]:
        return ("Staged", self.staged, "") if self.staged else ("Idle", None, "the newest release runs")

    def command(self, name: str) -> None:
        self.commands.append(name)

    def verdict(self, version: str, max_attempts: int) -> failures.Verdict | None:
        return failures.verdicts(self.failures_log, max_attempts).get(version)

    def drain(self) -> None:
        self.drained += 1

    def undrain(self) -> None:
        pass

    def reboot(self) -> None:
        self.rebooted.set()

    def boot_new(self) -> None:
        """What the reboot does: the new version runs (healthy or not, per `healthy`)."""
        assert self.staged
        if self.healthy:
            self.version, self.staged = self.staged, None
            self.slot = "B" if self.slot == "A" else "A"
        else:  # the gate failed: back on the old slot, a definite failure recorded
            self.failures_log.append({"version": self.staged, "kind": "definite", "reason": "health gate failed",
                                      "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            self.staged = None
        self.rebooted.clear()


def updater(host: SimHost, state: Path, node: str, url: str, *, timeout: float = 5.0) -> Updater:
    return Updater(host, state, node, client_factory=lambda p, n: FleetLockClient(url, n, p.group, timeout))


@dataclass
class Agent:
    """One simulated host running the daemon in a thread until it runs the new version."""

    name: str
    state: Path
    url: str
    updates: dict[str, Any]
    reboot_time: float = 0.05
    host: SimHost = field(init=False)
    reboots: list[tuple[float, float]] = field(default_factory=list)  # (asked, back) monotonic
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.host = SimHost(updates=self.updates)

    def run(self, deadline: float) -> None:
        try:
            self._run(deadline)
        except BaseException as e:  # reported by the test
            self.error = e

    def _run(self, deadline: float) -> None:
        u = updater(self.host, self.state, self.name, self.url, timeout=3.0)
        u.start()
        while not self.stop.is_set() and time.monotonic() < deadline:
            nxt = datetime.now(UTC)
            with contextlib.suppress(KilnError):
                nxt = u.step()
            if self.host.rebooted.is_set():
                asked = time.monotonic()
                time.sleep(self.reboot_time)
                self.host.boot_new()
                self.reboots.append((asked, time.monotonic()))
                u = updater(self.host, self.state, self.name, self.url, timeout=3.0)  # a new process
                u.start()
                continue
            if self.host.version != "1.0.0" and u.state.phase == "idle" and u.state.lock == "free":
                return  # updated, and the slot is back
            wait = (nxt - datetime.now(UTC)).total_seconds()
            self.stop.wait(min(max(wait, 0.01), 1.0))
