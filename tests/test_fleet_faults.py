"""Fleet reboots stay safe under load and faults: simulated hosts (the update daemon's real
state machine, fake slot and reboot) against `kiln fleet serve` processes over a real
3-member etcd cluster, with servers, the etcd leader and quorum taken away mid-rollout.

Safety is checked from etcd's own revision history of each group's key (every value the
semaphore ever had), not from what the servers say.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.fleet.etcd import Etcd
from kiln.fleet.locks import key
from kiln.host.update.fleetlock import FleetLockClient, LockUnreachable
from kiln.vm.qemu import free_port
from tests.etcd_cluster import EtcdCluster, etcd_cluster
from tests.fleet_helpers import Agent, ServerProcess

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(420)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path / "etcd") as c:
        yield c


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


@pytest.fixture
def servers(cluster: EtcdCluster, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    cfg = config(tmp_path, '[lock]\ndefault-slots = 3\n[groups.solo]\nslots = 1\n')
    procs = [ServerProcess(cluster.endpoints, free_port(), cfg).start() for _ in range(2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()


def agents(n: int, urls: list[str], tmp_path: Path, group: str = "race", interval: str = "2s") -> list[Agent]:
    updates = {"strategy": "fleet-lock", "check-interval": interval, "fleet-lock": {"group": group}}
    out = []
    for i in range(n):
        url = urls[i % len(urls)]
        u = {**updates, "fleet-lock": {**updates["fleet-lock"], "url": url}}
        out.append(Agent(f"host-{i:03d}", tmp_path / f"agent-{i}.json", url, u))
    return out


def launch(fleet: list[Agent], seconds: float) -> list[threading.Thread]:
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=a.run, args=(deadline,), daemon=True) for a in fleet]
    for t in threads:
        t.start()
    return threads


def updated(fleet: list[Agent]) -> int:
    return sum(1 for a in fleet if a.host.version == "2.0.0")


def wait_for(cond: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def max_holders_in_history(etcd: EtcdCluster, group: str) -> tuple[int, int]:
    """(most holders the group's semaphore ever had, how many revisions were read)."""
    history = Etcd(etcd.endpoints).history(key(group))
    return max((len(json.loads(v)["holders"]) for _, v in history), default=0), len(history)


def max_overlap(fleet: list[Agent]) -> int:
    """From the hosts' side: most reboots in progress at one instant."""
    edges = sorted([(a, 1) for ag in fleet for a, _ in ag.reboots] + [(b, -1) for ag in fleet for _, b in ag.reboots])
    best = cur = 0
    for _, d in edges:
        cur += d
        best = max(best, cur)
    return best


def finish(fleet: list[Agent], threads: list[threading.Thread], timeout: float) -> None:
    for t in threads:
        t.join(timeout)
    errors = [(a.name, a.error) for a in fleet if a.error]
    assert not errors, errors[:3]
    stuck = [(a.name, a.host.version) for a in fleet if a.host.version != "2.0.0"]
    assert not stuck, f"{len(stuck)} hosts did not update: {stuck[:5]}"


def test_200_hosts_3_slots_through_a_server_crash_and_an_etcd_leader_crash(
    cluster: EtcdCluster, servers: list[ServerProcess], tmp_path: Path
) -> None:
    fleet = agents(200, [s.url for s in servers], tmp_path)
    threads = launch(fleet, 300)
    wait_for(lambda: updated(fleet) >= 50, "a quarter of the fleet to update", 120)
    servers[0].kill()  # SIGKILL one server: the hosts behind it get no answer, and wait
    time.sleep(1.0)
    servers[0].start()  # as systemd would restart it: it has no state to lose
    wait_for(lambda: updated(fleet) >= 110, "half of the fleet to update", 120)
    leader = cluster.leader()
    cluster.kill(leader)
    time.sleep(2.0)
    cluster.restart(leader)
    finish(fleet, threads, 300)
    most, revisions = max_holders_in_history(cluster, "race")
    assert most == 3, f"the semaphore held {most} at most over {revisions} revisions"
    assert revisions >= 400  # at least a grant and a release per host are in the history
    assert max_overlap(fleet) <= 3
    assert all(len(a.reboots) == 1 for a in fleet)  # nobody rebooted twice
    final = json.loads(Etcd(cluster.endpoints).get(key("race")).value)
    assert final["holders"] == []


def test_quorum_lost_nobody_reboots_until_it_is_back(
    cluster: EtcdCluster, servers: list[ServerProcess], tmp_path: Path
) -> None:
    fleet = agents(30, [servers[0].url], tmp_path)
    threads = launch(fleet, 300)
    wait_for(lambda: updated(fleet) >= 6, "the rollout to start", 60)
    leader = cluster.leader()
    down = [next(m for m in cluster.members if m is not leader), leader]
    for m in down:
        cluster.kill(m)
    settled = time.monotonic() + 1.0  # a reboot already granted may still be on its way
    time.sleep(4.0)
    with pytest.raises(LockUnreachable, match="etcd_unavailable"):
        FleetLockClient(servers[0].url, "probe", "race", timeout=10).pre_reboot()
    outage_end = time.monotonic()
    during = [a.name for a in fleet for asked, _ in a.reboots if settled < asked < outage_end]
    assert during == [], f"rebooted without quorum: {during}"
    for m in down:
        cluster.restart(m)
    finish(fleet, threads, 240)
    assert max_holders_in_history(cluster, "race")[0] <= 3


def kiln(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kiln.cli.main", *args], capture_output=True, text=True, timeout=60)


def test_a_host_killed_while_holding_keeps_its_slot_until_released(
    cluster: EtcdCluster, servers: list[ServerProcess], tmp_path: Path
) -> None:
    url = servers[0].url
    dead = subprocess.Popen([sys.executable, "-m", "tests.fleet_agent", url, "solo", "dead-host",
                             str(tmp_path / "dead.json")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert dead.stdout is not None and dead.stdout.readline().strip() == "rebooting"
    finally:
        dead.kill()  # SIGKILL, mid-reboot, holding the group's only slot
        dead.wait()
    (waiting,) = agents(1, [url], tmp_path, group="solo", interval="1s")
    threads = launch([waiting], 120)
    time.sleep(4)
    assert waiting.host.version == "1.0.0" and not waiting.reboots
    status = json.loads(kiln("fleet", "status", "--server", url, "--json").stdout)
    (solo,) = [g for g in status["groups"] if g["group"] == "solo"]
    assert [h["id"] for h in solo["holders"]] == ["dead-host"] and solo["free"] == 0
    text = kiln("fleet", "status", "--server", url).stdout
    assert "group solo: 1/1 slots held" in text and "dead-host" in text
    r = kiln("fleet", "release", "dead-host", "--group", "solo", "--server", url)
    assert r.returncode == 0 and "released dead-host's slot in group solo" in r.stdout
    finish([waiting], threads, 60)
    status = json.loads(kiln("fleet", "status", "--server", url, "--json").stdout)
    (solo,) = [g for g in status["groups"] if g["group"] == "solo"]
    assert [(e["event"], e["id"], e["by"]) for e in solo["events"]] == [("released", "dead-host", "operator")]


def test_with_stale_after_a_dead_holder_expires(cluster: EtcdCluster, tmp_path: Path) -> None:
    cfg = config(tmp_path, '[groups.solo]\nslots = 1\nstale-after = "3 seconds"\n')
    server = ServerProcess(cluster.endpoints, free_port(), cfg).start()
    try:
        dead = subprocess.Popen([sys.executable, "-m", "tests.fleet_agent", server.url, "solo", "dead-host",
                                 str(tmp_path / "dead.json")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert dead.stdout is not None and dead.stdout.readline().strip() == "rebooting"
        dead.kill()
        dead.wait()
        (waiting,) = agents(1, [server.url], tmp_path, group="solo", interval="1s")
        threads = launch([waiting], 60)
        finish([waiting], threads, 60)
        status = json.loads(kiln("fleet", "status", "--server", server.url, "--json").stdout)
        (solo,) = [g for g in status["groups"] if g["group"] == "solo"]
        assert [(e["event"], e["id"]) for e in solo["events"]] == [("expired", "dead-host")]
    finally:
        server.kill()
