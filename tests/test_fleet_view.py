"""The fleet's view (kiln.fleet.hosts, kiln.fleet.release, the server's /v1/status, /v1/hosts and
/metrics): host reports kept in a real etcd, forgotten when hosts go silent, bounded; the real
update daemon reporting through a real server."""

from __future__ import annotations

import itertools
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kiln.core.errors import KilnError
from kiln.fleet.etcd import Etcd
from kiln.fleet.hosts import FleetHosts, HostReport
from kiln.fleet.release import ReleaseSource, release_view
from kiln.host.update.daemon import Updater
from kiln.host.update.fleetlock import FleetLockClient, LockRefused
from kiln.host.update.manifest import Manifest
from tests.etcd_cluster import EtcdCluster
from tests.fleet_helpers import SimHost, fleet_server_thread

pytestmark = pytest.mark.timeout(120)
_fleets = itertools.count()


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()


def manifest_doc(version: str = "2.0.0", waves: dict[str, str] | None = None) -> dict[str, Any]:
    image = {"target": "x.img.zst", "size": 1, "sha256": "0" * 64}
    return {"updates": [{"variant": "container-host", "arch": "amd64", "version": version, "max_version": version,
                         "waves": waves or {}, "images": {"boot": image, "root": image, "hash": image},
                         "verity": {"root_hash": "0" * 64, "salt": "0" * 64, "data_blocks": 1}}],
            "migrations": {}}


class Fleet:
    def __init__(self, etcd: EtcdCluster, url: str, hosts: FleetHosts) -> None:
        self.etcd, self.url, self.hosts = etcd, url, hosts

    def client(self, host: str, group: str = "web") -> FleetLockClient:
        return FleetLockClient(self.url, host, group, timeout=10)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = get(f"{self.url}/v1/status")
        return result

    def select(self, query: str = "") -> dict[str, Any]:
        result: dict[str, Any] = get(f"{self.url}/v1/hosts{query}")
        return result


@pytest.fixture
def fleet(etcd: EtcdCluster, tmp_path: Path) -> Iterator[Fleet]:
    """A fleet server with its own corner of etcd (other tests' hosts are not counted here)."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(manifest_doc(waves={"0": "2026-12-01T00:00:00Z", "512": "2030-01-01T00:00:00Z"})))
    hosts = FleetHosts(Etcd(etcd.endpoints), prefix=f"test/fleet-view-{next(_fleets)}/", max_hosts=50)
    with fleet_server_thread(etcd.endpoints, hosts=hosts, release=ReleaseSource(str(manifest))) as url:
        yield Fleet(etcd, url, hosts)


def test_reports_are_kept_checked_and_summarised(fleet: Fleet) -> None:
    for i in range(6):
        group = "web" if i < 4 else "db"
        fleet.client(f"h{i}", group).report("2.0.0" if i % 2 else "1.0.0", None, slot="AB"[i % 2],
                                           state="idle", target=None)
    fleet.client("odd", "db").report("1.0.0", "x" * 2000, slot="C", state="bogus", target="2.0.0\n")
    fleet.client("plain", "db").pre_reboot()  # a plain FleetLock client: locked, not in the view
    fleet.hosts._cached = None
    summary = fleet.status()["hosts"]
    assert summary["total"] == 7 and summary["versions"] == {"1.0.0": 4, "2.0.0": 3}
    assert summary["groups"]["web"]["versions"] == {"1.0.0": 2, "2.0.0": 2}
    assert summary["states"] == {"idle": 6, "unknown": 1}
    odd = fleet.select("?q=odd")["hosts"][0]
    assert odd["slot"] is None and odd["state"] is None and odd["target"] is None  # malformed: dropped
    assert len(odd["failure"]) == 512
    assert [h["id"] for h in fleet.select("?group=web&version=2.0.0")["hosts"]] == ["h1", "h3"]
    page = fleet.select("?limit=2&offset=1")
    assert page["total"] == 7 and [h["id"] for h in page["hosts"]] == ["h5", "odd"]
    assert [h["id"] for h in fleet.select("?q=xxxx")["hosts"]] == ["odd"]  # the failure text matches too
    with pytest.raises(urllib.error.HTTPError) as bad:
        get(f"{fleet.url}/v1/hosts?limit=0")
    assert bad.value.code == 400
    metrics = get(f"{fleet.url}/metrics")
    assert 'kiln_fleet_hosts_by_version{group="web",version="2.0.0"} 2' in metrics
    assert 'kiln_fleet_hosts_by_state{group="db",state="unknown"} 1' in metrics


def test_the_view_is_bounded_and_locks_do_not_depend_on_it(etcd: EtcdCluster) -> None:
    hosts = FleetHosts(Etcd(etcd.endpoints), prefix=f"test/fleet-view-{next(_fleets)}/", max_hosts=3)
    with fleet_server_thread(etcd.endpoints, hosts=hosts) as url:
        for i in range(3):
            FleetLockClient(url, f"h{i}", "cap").report("1.0.0", None, state="idle")
        hosts._count = (0, 0.0)  # count again now, not in SUMMARY_TTL seconds
        with pytest.raises(LockRefused) as refused:
            FleetLockClient(url, "h3", "cap").report("1.0.0", None, state="idle")
        assert refused.value.status == 429 and refused.value.kind == "too_many_hosts"
        FleetLockClient(url, "h0", "cap").report("2.0.0", None, state="idle")  # a known host still reports
        FleetLockClient(url, "h3", "cap").pre_reboot("1.0.0", {"state": "waiting-for-lock"})  # and h3 still locks


def test_a_host_that_stops_reporting_is_forgotten(etcd: EtcdCluster) -> None:
    hosts = FleetHosts(Etcd(etcd.endpoints), prefix=f"test/fleet-view-{next(_fleets)}/",
                       forget_after=timedelta(seconds=4))
    now = datetime.now(UTC)
    hosts.put(HostReport("quiet", "g", "1.0.0", seen="x"))
    for i in range(3):  # one that keeps reporting, under the same and then a newer lease
        hosts.put(HostReport("chatty", "g", "1.0.0", seen=str(i)))
        time.sleep(1)
    deadline = time.monotonic() + 20
    while any(r.id == "quiet" for r in hosts.all()):
        assert time.monotonic() < deadline, "a silent host is still in the view"
        hosts.put(HostReport("chatty", "g", "1.0.0", seen="again"))  # it keeps reporting
        time.sleep(0.5)
        hosts._cached = None
    assert [r.id for r in hosts.all()] == ["chatty"]
    assert datetime.now(UTC) - now < timedelta(seconds=4 + 1 + 5), "gone within forget-after + period (+ slack)"


def test_history_is_sampled_once_per_interval_and_bounded(etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.fleet import hosts as hosts_mod

    monkeypatch.setattr(hosts_mod, "MAX_HISTORY", 3)
    t = [datetime(2026, 12, 2, tzinfo=UTC)]
    hosts = FleetHosts(Etcd(etcd.endpoints), prefix=f"test/fleet-view-{next(_fleets)}/", now=lambda: t[0])
    hosts.put(HostReport("a", "g", "1.0.0", state="idle"))
    assert hosts.record_history(timedelta(minutes=1))
    assert not hosts.record_history(timedelta(minutes=1))  # another server just did
    for _ in range(4):
        t[0] += timedelta(minutes=1)
        hosts._cached = None
        assert hosts.record_history(timedelta(minutes=1))
    points = hosts.history()
    assert len(points) == 3 and points[-1]["t"] == "2026-12-02T00:04:00Z"
    assert points[-1]["versions"] == {"1.0.0": 1} and points[-1]["states"] == {"idle": 1}


def test_release_view_shows_the_newest_release_and_its_waves(fleet: Fleet, tmp_path: Path) -> None:
    rel = fleet.status()["release"]
    assert rel["version"] == "2.0.0"
    assert rel["waves"] == [{"seed": 0, "share": 0.25, "opens": "2026-12-01T00:00:00Z"},
                            {"seed": 512, "share": 0.75, "opens": "2030-01-01T00:00:00Z"}]
    assert release_view(Manifest.from_json({"updates": [], "migrations": {}})) is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(KilnError, match=r"no manifest\.json"):
        ReleaseSource(str(tmp_path / "empty"))


def test_the_daemon_reports_where_it_stands(fleet: Fleet, tmp_path: Path) -> None:
    """The real update daemon (SimHost as its host): after its check, in its lock request,
    and after it came back on the new version, the view says so."""
    settings = {"strategy": "fleet-lock", "check-interval": "1h", "fleet-lock": {"url": fleet.url, "group": "web"}}
    host = SimHost(updates=settings)

    def updater() -> Updater:
        return Updater(host, tmp_path / "daemon.json", "node-1", rng=random.Random(1),
                       client_factory=lambda p, n: FleetLockClient(fleet.url, n, p.group, timeout=10))

    def seen() -> dict[str, Any]:
        fleet.hosts._cached = None
        found: dict[str, Any] = fleet.select("?q=node-1")["hosts"][0]
        return found

    u = updater()
    u.start()
    u.step()  # check, lock, reboot
    assert host.rebooted.is_set()
    assert {k: seen()[k] for k in ("version", "slot", "state", "target")} == {
        "version": "1.0.0", "slot": "A", "state": "rebooting", "target": "2.0.0"}
    host.boot_new()
    u = updater()
    u.start()
    u.step()  # confirmed: the slot goes back
    assert {k: seen()[k] for k in ("version", "slot", "state", "target")} == {
        "version": "2.0.0", "slot": "B", "state": "idle", "target": None}
    assert all(g["holders"] == [] for g in fleet.status()["groups"] if g["group"] == "web")


def test_the_dashboard_files_are_served(fleet: Fleet) -> None:
    page = get(f"{fleet.url}/")
    assert "<title>Kiln fleet</title>" in page and "/dashboard.js" in page
    assert "refresh" in get(f"{fleet.url}/dashboard.js") and "body" in get(f"{fleet.url}/dashboard.css")
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(f"{fleet.url}/nothing.js")
    assert missing.value.code == 404
