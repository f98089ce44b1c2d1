"""The fleet dashboard in a real headless Chromium, against a real fleet server and etcd fed by
the real update daemon on simulated hosts: two groups mid-rollout, one halted by a failed
health gate. A screenshot is kept in build/test-artifacts/ (or $KILN_TEST_ARTIFACTS)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from kiln.fleet import locks as locks_mod
from kiln.fleet.config import FleetConfig
from kiln.fleet.etcd import Etcd
from kiln.fleet.hosts import FleetHosts
from kiln.fleet.locks import FleetLocks
from kiln.fleet.release import ReleaseSource
from kiln.host.update.fleetlock import FleetLockClient
from tests.chromium import Page, chromium
from tests.etcd_cluster import EtcdCluster
from tests.fleet_helpers import SimHost, fleet_server_thread, updater
from tests.test_fleet_view import manifest_doc

pytestmark = pytest.mark.timeout(300)
ARTIFACTS = Path(os.environ.get("KILN_TEST_ARTIFACTS", Path(__file__).parent.parent / "build" / "test-artifacts"))


@pytest.fixture
def rollout(etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`web` (2 slots, 6 hosts): 2 reboot, 4 wait for a slot. `db` (1 slot, 3 hosts): its
    first host failed the health gate and keeps the slot, so the group is halted."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(manifest_doc(waves={"0": "2026-12-01T00:00:00Z", "1024": "2031-01-01T00:00:00Z"})))
    prefix = f"test/dashboard-{tmp_path.name}/"
    config = FleetConfig.from_doc({"groups": {"web": {"slots": 2}, "db": {"slots": 1}}})
    hosts = FleetHosts(Etcd(etcd.endpoints), prefix=prefix)
    monkeypatch.setattr(locks_mod, "PREFIX", f"{prefix}groups/")  # this test's groups only, in etcd
    with fleet_server_thread(etcd.endpoints, locks=FleetLocks(Etcd(etcd.endpoints), config), hosts=hosts,
                             release=ReleaseSource(str(manifest))) as url:
        for group, n in (("db", 3), ("web", 6)):
            for i in range(n):
                node = f"node-{group}-{i}"
                host = SimHost(updates={"strategy": "fleet-lock", "check-interval": "1h",
                                        "fleet-lock": {"url": url, "group": group}})
                u = updater(host, tmp_path / f"{node}.json", node, url, timeout=10)
                u.start()
                u.step()  # check, ask for a slot; the first ones reboot
                if group == "db" and i == 0:  # back on 1.0.0: 2.0.0 failed its gate here
                    host.healthy = False
                    host.boot_new()
                    u = updater(host, tmp_path / f"{node}.json", node, url, timeout=10)
                    u.start()
                    u.step()  # keeps the slot and tells the server why
        hosts.record_history(timedelta(0))
        yield url


def shown(page: Page, selector: str) -> list[str]:
    result: list[str] = page.eval(f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.textContent)")
    return result


def set_field(page: Page, element: str, value: str) -> None:
    """What a person does to a filter: the value changes and the page hears of it."""
    event = "input" if element == "f-text" else "change"
    page.eval(f"(() => {{ const e = document.getElementById({json.dumps(element)}); e.value = {json.dumps(value)}; "
              f"e.dispatchEvent(new Event({json.dumps(event)})); }})()")


def test_the_dashboard_shows_the_rollout(rollout: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium() as page:
        page.goto(rollout + "/")
        page.wait_for("document.querySelectorAll('#hosts tbody tr').length === 9")
        # groups, slots and holders (with how long they have held)
        web = shown(page, "#groups tr[data-group=web] td")
        assert web[1] == "2 of 2 held" and "node-web-0" in web[2] and "node-web-1" in web[2], web
        assert " s" in web[2] and "1.0.0: 6" in web[3]
        db = shown(page, "#groups tr[data-group=db] td")
        assert db[1] == "1 of 1 held" and "failed: 2.0.0 failed on this host" in db[2], db
        # the halted group and why
        halted = shown(page, "#halted .halted")
        assert len(halted) == 1 and halted[0].startswith("group db is halted: node-db-0 (2.0.0 failed"), halted
        # hosts by state, the release and its waves
        states = " ".join(shown(page, "#states .bar"))
        assert "rebooting2" in states.replace(" ", "") and "waiting-for-lock" in states and "failed1" in states.replace(
            " ", "")
        assert "newest release 2.0.0" in page.eval("document.getElementById('release').textContent")
        waves = shown(page, "#waves tbody tr")
        assert len(waves) == 2 and "open" in waves[0] and "opens in" in waves[1] and "50.0 % of hosts" in waves[1]
        assert page.eval("document.querySelectorAll('#versions-chart polygon').length") >= 1
        page.screenshot(ARTIFACTS / "fleet-dashboard.png")

        # the host filter: text, then a state
        set_field(page, "f-text", "node-db")
        page.wait_for("document.querySelectorAll('#hosts tbody tr').length === 3")
        assert all(r.startswith("node-db-") for r in shown(page, "#hosts tbody tr td:first-child"))
        set_field(page, "f-state", "failed")
        page.wait_for("document.querySelectorAll('#hosts tbody tr').length === 1")
        row = shown(page, "#hosts tbody tr td")
        assert row[0] == "node-db-0" and row[4] == "failed" and "health gate" in row[6], row
        assert page.eval("document.getElementById('hosts-count').textContent") == "1–1 of 1 hosts"
        page.screenshot(ARTIFACTS / "fleet-dashboard-filtered.png")

        # it refreshes by itself: a new host appears without a reload
        FleetLockClient(rollout, "node-new", "web").report("1.0.0", None, slot="A", state="idle")
        set_field(page, "f-state", "")
        set_field(page, "f-text", "node-new")
        page.wait_for("document.querySelectorAll('#hosts tbody tr[data-host=\"node-new\"]').length === 1", timeout=30)
        assert page.errors == [], page.errors


def test_a_planned_rollout_is_drawn_beside_the_real_one(rollout: str, tmp_path: Path) -> None:
    """A `kiln fleet simulate` timeline loaded from a file: a dashed line of the planned share."""
    plan = {"kind": "kiln-fleet-plan", "start": "2026-12-01T00:00:00Z", "release": "2.0.0", "params": {"hosts": 1000},
            "points": [{"t": f"2026-12-0{d}T00:00:00Z", "versions": {"1.0.0": 1000 - 300 * (d - 1),
                                                                     "2.0.0": 300 * (d - 1)}} for d in (1, 2, 3, 4)]}
    with chromium() as page:
        page.goto(rollout + "/")
        page.wait_for("document.querySelectorAll('#groups tbody tr').length >= 2")
        # a file chooser cannot be clicked headless: hand the file to the input as a user would
        page.eval("(() => { const dt = new DataTransfer(); "
                  f"dt.items.add(new File([{json.dumps(json.dumps(plan))}], 'timeline.json', "
                  "{type: 'application/json'})); const input = document.getElementById('plan-file'); "
                  "input.files = dt.files; input.dispatchEvent(new Event('change')); })()")
        page.wait_for("document.querySelectorAll('#versions-chart polyline').length === 1")
        assert "1000 hosts planned" in page.eval("document.getElementById('plan-name').textContent")
        assert "planned share on 2.0.0" in page.eval("document.getElementById('versions-legend').textContent")
        page.screenshot(ARTIFACTS / "fleet-dashboard-planned.png")
        assert page.errors == [], page.errors
