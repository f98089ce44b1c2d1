"""The update daemon's state machine (kiln.host.update.daemon) with a fake clock, a fake slot
and reboot (tests.fleet_helpers.SimHost), against a real FleetLock server over real etcd."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kiln.fleet.etcd import Etcd
from kiln.fleet.locks import key
from kiln.host.update import daemon
from kiln.host.update.daemon import Lock, Phase, Updater, lock_backoff
from kiln.host.update.fleetlock import FleetLockClient
from kiln.host.update.updater import APP_ID, node_id
from tests.etcd_cluster import EtcdCluster
from tests.fleet_helpers import SimHost, fleet_server_thread

pytestmark = pytest.mark.timeout(120)
T0 = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)  # a Saturday
_groups = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        return self.t

    def advance(self, **kw: float) -> None:
        self.t += timedelta(**kw)


@pytest.fixture(scope="module")
def server(etcd: EtcdCluster) -> Iterator[str]:
    with fleet_server_thread(etcd.endpoints) as url:
        yield url


@pytest.fixture
def group() -> str:
    return f"daemon-{next(_groups)}"


def settings(group: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"strategy": "fleet-lock", "check-interval": "1h", "fleet-lock": {"url": url, "group": group}, **extra}


def make(host: SimHost, tmp_path: Path, clock: Clock, url: str | None = None, node: str = "host-a",
         timeout: float = 5.0) -> Updater:
    def client(p: daemon.Policy, n: str) -> FleetLockClient:
        return FleetLockClient(url or str(p.url), n, p.group, timeout)

    return Updater(host, tmp_path / "daemon.json", node, now=clock, rng=random.Random(7), client_factory=client)


def holders(etcd: EtcdCluster, group: str) -> list[str]:
    entry = Etcd(etcd.endpoints).get(key(group))
    return [h["id"] for h in json.loads(entry.value)["holders"]] if entry.mod_revision else []


# --- strategies ----------------------------------------------------------------------------


def test_manual_does_nothing(tmp_path: Path) -> None:
    host, clock = SimHost(updates={"strategy": "manual"}), Clock()
    u = make(host, tmp_path, clock)
    u.start()
    assert u.step() == T0 + timedelta(hours=1)
    assert (host.commands, host.drained, host.rebooted.is_set()) == ([], 0, False)
    assert u.state.phase == Phase.MANUAL and "kiln update apply" in u.state.reason


def test_immediate_drains_activates_and_reboots_without_a_lock(tmp_path: Path) -> None:
    host, clock = SimHost(updates={"strategy": "immediate"}), Clock()
    u = make(host, tmp_path, clock)
    u.start()
    u.step()
    assert host.commands == ["refresh", "activate"]  # Staged: no prepare needed
    assert host.drained == 1 and host.rebooted.is_set()
    assert (u.state.phase, u.state.lock, u.state.target) == (Phase.REBOOTING, Lock.FREE, "2.0.0")


def test_fleet_lock_the_whole_cycle(tmp_path: Path, server: str, etcd: EtcdCluster, group: str) -> None:
    host, clock = SimHost(updates=settings(group, server)), Clock()
    u = make(host, tmp_path, clock)
    u.start()
    u.step()
    assert host.rebooted.is_set() and holders(etcd, group) == ["host-a"]
    assert (u.state.phase, u.state.lock) == (Phase.REBOOTING, Lock.HELD)
    host.boot_new()  # the reboot: 2.0.0 runs, the gate has passed
    u = make(host, tmp_path, clock)  # a new process
    u.start()
    assert u.state.phase == Phase.CONFIRMING
    u.step()
    assert holders(etcd, group) == []
    assert (u.state.phase, u.state.lock, u.state.reason) == (Phase.IDLE, Lock.FREE, "updated to 2.0.0")


def test_the_slot_goes_back_only_after_the_health_gate(tmp_path: Path, server: str, etcd: EtcdCluster,
                                                       group: str) -> None:
    host, clock = SimHost(updates=settings(group, server)), Clock()
    u = make(host, tmp_path, clock)
    u.start()
    u.step()
    host.boot_new()
    host.healthy = False  # the gate has not passed (yet)
    u = make(host, tmp_path, clock)
    u.start()
    assert u.step() == T0 + daemon.CONFIRM_POLL
    assert holders(etcd, group) == ["host-a"] and "waiting for the health gate" in u.state.reason
    host.healthy = True
    clock.advance(seconds=30)
    u.step()
    assert holders(etcd, group) == []


# --- refusals: never a reboot -------------------------------------------------------------


def test_a_full_group_waits_with_growing_backoff(tmp_path: Path, server: str, etcd: EtcdCluster, group: str) -> None:
    FleetLockClient(server, "other", group).pre_reboot()
    host, clock = SimHost(updates=settings(group, server)), Clock()
    u = make(host, tmp_path, clock)
    u.start()
    waits = []
    for _ in range(8):
        nxt = u.step()
        assert u.state.phase == Phase.WAITING_LOCK and not host.rebooted.is_set() and host.drained == 0
        waits.append((nxt - clock.t).total_seconds())
        clock.t = nxt
    assert u.state.waiting_since == "2026-12-05T01:00:00Z" and u.state.lock_attempts == 8
    assert "refused: failed_lock_semaphore_full" in u.state.reason
    caps = [15, 30, 60, 120, 240, 300, 300, 300]
    assert all(c / 2 <= w <= c for w, c in zip(waits, caps, strict=True)), waits
    FleetLockClient(server, "other", group).steady_state()
    u.step()
    assert host.rebooted.is_set() and holders(etcd, group) == ["host-a"]


def test_backoff_never_exceeds_the_check_interval() -> None:
    rng = random.Random(1)
    for attempts in range(1, 40):
        assert lock_backoff(attempts, timedelta(minutes=1), rng) <= timedelta(minutes=1)
        assert lock_backoff(attempts, timedelta(hours=1), rng) <= daemon.LOCK_BACKOFF_CAP


def test_an_unreachable_server_never_reboots(tmp_path: Path) -> None:
    from kiln.vm.qemu import free_port

    host, clock = SimHost(updates=settings("g", f"http://127.0.0.1:{free_port()}")), Clock()
    u = make(host, tmp_path, clock)
    u.start()
    u.step()
    assert not host.rebooted.is_set() and host.drained == 0
    assert u.state.phase == Phase.WAITING_LOCK and "no answer" in u.state.reason
    assert u.state.lock == Lock.FREE


@pytest.fixture
def slow_server() -> Iterator[tuple[str, list[float]]]:
    """Answers 200 to everything, but only after 3 s: past the client's timeout."""
    seen: list[float] = []

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(time.monotonic())
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            time.sleep(3)
            with contextlib.suppress(OSError):  # the client has long gone
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_slow_server_never_reboots(tmp_path: Path, slow_server: tuple[str, list[float]]) -> None:
    url, seen = slow_server
    host, clock = SimHost(updates=settings("g", url)), Clock()
    u = make(host, tmp_path, clock, timeout=1.0)
    u.start()
    u.step()
    assert seen, "the request reached the server"
    assert not host.rebooted.is_set() and host.drained == 0
    assert u.state.phase == Phase.WAITING_LOCK and "timed out" in u.state.reason


def test_fleet_lock_without_a_url_says_so(tmp_path: Path) -> None:
    host, clock = SimHost(updates={"strategy": "fleet-lock"}), Clock()
    u = make(host, tmp_path, clock)
    u.start()
    u.step()
    assert not host.rebooted.is_set()
    assert u.state.reason == ("cannot run: settings.updates.fleet-lock.url is not set "
                              "(strategy fleet-lock needs a server)")


# --- windows and the lock combine --------------------------------------------------------


def test_staging_any_time_the_lock_and_reboot_only_in_a_window(tmp_path: Path, server: str, etcd: EtcdCluster,
                                                              group: str) -> None:
    window = {"days": ["sun"], "start": "03:00", "length-minutes": 60}
    host = SimHost(updates=settings(group, server, **{"maintenance-windows": [window]}))
    host.staged = None  # the release is not even written yet
    clock = Clock()
    u = make(host, tmp_path, clock)
    u.start()

    def refresh_then_stage(name: str) -> None:
        host.commands.append(name)
        if name == "refresh":
            host.staged = "2.0.0"

    host.command = refresh_then_stage  # type: ignore[method-assign]
    nxt = u.step()
    assert host.staged == "2.0.0" and u.state.phase == Phase.WAITING_WINDOW  # written at once
    assert nxt <= T0 + timedelta(hours=1.1)  # the next check comes before the window
    assert u.state.window == {"window": "sun 03:00 UTC for 60 min", "opens_at": "2026-12-06T03:00:00Z"}
    assert holders(etcd, group) == [] and not host.rebooted.is_set()
    clock.t = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)
    u.step()
    assert host.rebooted.is_set() and holders(etcd, group) == ["host-a"]


def test_a_closed_window_stops_the_lock_retries(tmp_path: Path, server: str, etcd: EtcdCluster, group: str) -> None:
    FleetLockClient(server, "other", group).pre_reboot()
    window = {"start": "01:00", "length-minutes": 1}
    host, clock = SimHost(updates=settings(group, server, **{"maintenance-windows": [window]})), Clock()
    u = make(host, tmp_path, clock)
    u.start()
    nxt = u.step()
    assert u.state.phase == Phase.WAITING_LOCK and nxt <= T0 + timedelta(minutes=1)  # not past the window
    clock.t = T0 + timedelta(minutes=2)
    FleetLockClient(server, "other", group).steady_state()
    u.step()
    assert u.state.phase == Phase.WAITING_WINDOW and not host.rebooted.is_set() and holders(etcd, group) == []


def test_checks_are_jittered_within_ten_percent(tmp_path: Path) -> None:
    clock = Clock()
    u = make(SimHost(updates={"strategy": "immediate"}, staged=None), tmp_path, clock)
    u.start()
    gaps = []
    for _ in range(50):
        nxt = u.step()
        gaps.append((nxt - clock.t).total_seconds())
        clock.t = nxt
    assert all(3240 <= g <= 3960 for g in gaps) and len(set(gaps)) > 40


# --- after a reboot: finish what it interrupted ---------------------------------------------


def rebooting(tmp_path: Path, server: str, group: str, clock: Clock) -> SimHost:
    host = SimHost(updates=settings(group, server))
    u = make(host, tmp_path, clock)
    u.start()
    u.step()
    assert host.rebooted.is_set()
    return host


def test_a_failed_health_gate_keeps_the_slot_and_reports_why(tmp_path: Path, server: str, etcd: EtcdCluster,
                                                            group: str) -> None:
    clock = Clock()
    host = rebooting(tmp_path, server, group, clock)
    host.healthy = False
    host.boot_new()  # rolled back: 1.0.0 runs, 2.0.0 failed its gate (definite)
    u = make(host, tmp_path, clock)
    u.start()
    assert u.state.phase == Phase.FAILED and u.state.lock == Lock.HELD
    u.step()
    assert holders(etcd, group) == ["host-a"]
    status = json.loads(json.dumps(Etcd(etcd.endpoints).get(key(group)).value.decode()))
    assert "2.0.0 failed on this host (health gate failed)" in status
    assert u.state.reported and not host.rebooted.is_set()
    # an operator frees the slot: the host learns it at its next report, and stays on 1.0.0
    FleetLockClient(server, "host-a", group)._post("release")
    clock.advance(hours=2)
    u.step()
    assert (u.state.phase, u.state.lock) == (Phase.IDLE, Lock.FREE)
    assert not host.rebooted.is_set()


def test_a_boot_that_never_finished_gives_the_slot_back_and_retries(tmp_path: Path, server: str, etcd: EtcdCluster,
                                                                   group: str) -> None:
    clock = Clock()
    host = rebooting(tmp_path, server, group, clock)
    # a power cut during 2.0.0's first boot: GRUB fell back, an ambiguous failure recorded
    host.failures_log.append({"version": "2.0.0", "kind": "ambiguous", "reason": "did not finish booting",
                              "at": "2026-12-05T01:00:30Z"})
    host.rebooted.clear()
    u = make(host, tmp_path, clock)
    u.start()
    assert (u.state.phase, u.state.lock, u.state.next_check) == (Phase.IDLE, Lock.FREE, None)
    assert holders(etcd, group) == []
    assert "1 of 3 attempts" in u.state.reason
    u.step()  # the next cycle takes the same version again
    assert host.rebooted.is_set() and holders(etcd, group) == ["host-a"]


def test_a_crash_before_the_reboot_keeps_going_with_the_slot(tmp_path: Path, server: str, etcd: EtcdCluster,
                                                            group: str) -> None:
    clock = Clock()
    host = rebooting(tmp_path, server, group, clock)
    host.rebooted.clear()  # the daemon died before systemd rebooted: 1.0.0, nothing failed
    u = make(host, tmp_path, clock)
    u.start()
    assert (u.state.phase, u.state.lock) == (Phase.IDLE, Lock.HELD)
    u.step()
    assert host.rebooted.is_set() and holders(etcd, group) == ["host-a"]  # the same slot, recursively


def test_a_crash_while_asking_gives_the_slot_back_at_start(tmp_path: Path, server: str, etcd: EtcdCluster,
                                                          group: str) -> None:
    FleetLockClient(server, "host-a", group).pre_reboot()  # granted, but the answer was never recorded
    state = daemon.DaemonState(strategy="fleet-lock", phase="waiting-for-lock", lock="asking", group=group)
    state.save(tmp_path / "daemon.json")
    u = make(SimHost(updates=settings(group, server), staged=None), tmp_path, Clock())
    u.start()
    assert holders(etcd, group) == [] and u.state.lock == Lock.FREE


def test_node_ids_are_systemd_app_specific_ids(tmp_path: Path) -> None:
    """The construction of sd_id128_get_machine_app_specific() (Zincati's too), checked
    against systemd's own `systemd-id128 machine-id --app-specific=` on this machine."""
    import subprocess

    machine = Path("/etc/machine-id").read_text().strip()
    if not machine:
        pytest.skip("this machine has no machine id")
    for app in (APP_ID.hex, "de35106b6ec24688b63afddaa156679b"):  # Kiln's key, Zincati's key
        want = subprocess.run(["systemd-id128", "machine-id", f"--app-specific={app}"], capture_output=True,
                              text=True, check=True).stdout.strip()
        import uuid

        assert node_id(machine, uuid.UUID(app)) == want


def test_a_shorter_check_interval_takes_effect_at_once(tmp_path: Path) -> None:
    clock = Clock()
    host = SimHost(updates={"strategy": "immediate", "check-interval": "1h"}, staged=None)
    u = make(host, tmp_path, clock)
    u.start()
    assert u.step() >= T0 + timedelta(minutes=54)
    host.updates["check-interval"] = "20s"  # settings changed: the daemon is woken (SIGHUP)
    clock.advance(seconds=1)
    nxt = u.step()
    assert nxt <= clock.t + timedelta(seconds=22)
    host.updates["check-interval"] = "2h"  # a longer interval waits for the check already planned
    assert abs((u.step() - nxt).total_seconds()) < 1  # (kept to the second)
