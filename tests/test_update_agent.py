"""The update agent on the host: a real TUF repository (`kiln repo`) served on 127.0.0.1,
python-tuf's client, a small Kiln disk whose slot B the agent writes; checked with
veritysetup and by reading the partitions back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kiln.host.slot import Flags, Slots
from kiln.host.update import migrate
from kiln.host.update.agent import Agent
from kiln.host.update.errors import NotAllowed, NothingChosen, UntrustedUpdate, UpdateError
from kiln.host.update.manifest import Version
from kiln.host.update.status import Paths, Status
from kiln.repo import admin, publish
from tests.controlled_repo import ControlledRepo
from tests.helpers import fake_release, small_disk, zstd_chunks

ROOT = Path(__file__).resolve().parents[1]
MIGRATION = ROOT / "migrations" / "2.0.0" / "stock-motd.py"


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("releases")
    return {v: fake_release(base / v, v, root_mib=4) for v in ("1.1.0", "2.0.0")}


@pytest.fixture
def repo(tmp_path: Path, releases: dict[str, Path]) -> Iterator[ControlledRepo]:
    d = tmp_path / "repo"
    admin.init(d)
    publish.add(d, releases["1.1.0"], waves="none")
    with ControlledRepo(d) as srv:
        yield srv


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return small_disk(tmp_path / "disk.img")


def make_agent(tmp_path: Path, disk: Path, srv: ControlledRepo, **settings: Any) -> Agent:
    paths = Paths(state=tmp_path / "state", run=tmp_path / "run", root=srv.directory / "metadata" / "1.root.json")
    return Agent(
        slots=Slots.open(image=disk, active="A"),
        settings={"metadata-base-url": srv.metadata_url, "targets-base-url": srv.targets_url, "seed": 100,
                  **settings},
        variant="container-host",
        version="1.0.0",
        arch="amd64",
        paths=paths,
    )


def read_partition(disk: Path, slots: Slots, slot: str, key: str, length: int) -> bytes:
    region = slots.partitions(slot)[key]
    with open(disk, "rb") as f:
        f.seek(region.offset)
        return f.read(length)


def decompressed(release: Path, key: str) -> bytes:
    manifest = json.loads((release / "manifest.json").read_text())
    return b"".join(zstd_chunks(release / manifest["images"][key]["file"]))


def test_refresh_prepare_activate_deactivate(tmp_path: Path, disk: Path, repo: ControlledRepo,
                                            releases: dict[str, Path]) -> None:
    agent = make_agent(tmp_path, disk, repo)
    assert agent.status().update_state == "Idle"
    st = agent.run("refresh")
    assert (st.update_state, st.chosen_update, st.available_updates) == (
        "Available", {"variant": "container-host", "arch": "amd64", "version": "1.1.0"}, ["1.1.0"])
    st = agent.run("prepare")
    assert st.update_state == "Staged" and st.staged_version == "1.1.0"
    assert st.staging_partition == {"slot": "B", "version": "1.1.0", "next_to_boot": False}
    flags = agent.slots.state().b
    assert (flags.priority, flags.tries_left, flags.successful) == (0, 1, False)
    for key in ("boot", "root", "hash"):
        want = decompressed(releases["1.1.0"], key)
        assert read_partition(disk, agent.slots, "B", key, len(want)) == want, key
    assert agent.run("activate").update_state == "Ready"
    assert agent.slots.state().next_boot == "B"
    st = agent.run("deactivate")
    assert st.update_state == "Staged" and agent.slots.state().next_boot == "A"
    assert st.most_recent_command is not None and st.most_recent_command["cmd_status"] == "Success"


def test_written_slot_passes_veritysetup_verify(tmp_path: Path, disk: Path, repo: ControlledRepo,
                                                releases: dict[str, Path]) -> None:
    agent = make_agent(tmp_path, disk, repo)
    agent.run("refresh")
    agent.run("prepare")
    manifest = json.loads((releases["1.1.0"] / "manifest.json").read_text())
    files = {}
    for key in ("root", "hash"):
        files[key] = tmp_path / f"{key}.img"
        files[key].write_bytes(
            read_partition(disk, agent.slots, "B", key, manifest["images"][key]["uncompressed_size"]))
    subprocess.run(["veritysetup", "verify", files["root"], files["hash"], manifest["verity"]["root_hash"]],
                   check=True, capture_output=True)


def test_commands_refused_in_the_wrong_state(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    agent = make_agent(tmp_path, disk, repo)
    with pytest.raises(NotAllowed, match="prepare is not allowed in state Idle"):
        agent.run("prepare")
    agent.run("refresh")
    with pytest.raises(NotAllowed, match="activate is not allowed in state Available"):
        agent.run("activate")
    with pytest.raises(NotAllowed, match="deactivate"):
        agent.run("deactivate")
    assert agent.slots.state().b.tries_left == 0


def test_nothing_newer_and_version_lock_say_why(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    agent = make_agent(tmp_path, disk, repo, **{"version-lock": "1.0.0"})
    st = agent.run("refresh")
    assert st.update_state == "Idle" and "locked to 1.0.0" in st.reason and "running" in st.reason
    agent.settings["version-lock"] = "9.9.9"
    assert "not in the repository" in agent.run("refresh").reason
    agent.settings["version-lock"] = "latest"
    agent.version = "1.1.0"
    assert agent.run("refresh").reason == "1.1.0 is the newest release for container-host"


def test_wave_not_open_yet_says_when(tmp_path: Path, disk: Path, repo: ControlledRepo,
                                     releases: dict[str, Path]) -> None:
    start = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    publish.add(repo.directory, releases["2.0.0"], waves="default", start_at=start)
    agent = make_agent(tmp_path, disk, repo, seed=1500)
    st = agent.run("refresh")
    # 2.0.0 waits for this host's wave; 1.1.0 (no waves) is taken meanwhile
    assert st.chosen_update == {"variant": "container-host", "arch": "amd64", "version": "1.1.0"}
    agent.version = "1.1.0"
    st = agent.run("refresh")
    assert st.update_state == "Idle" and st.ready_at is not None
    assert "2.0.0 is out, but this host's wave (seed 1500) opens at" in st.reason
    assert datetime.fromisoformat(st.ready_at.replace("Z", "+00:00")) > datetime.now(UTC) + timedelta(days=5)
    agent.settings["ignore-waves"] = True
    assert agent.run("refresh").chosen_update == {"variant": "container-host", "arch": "amd64", "version": "2.0.0"}


def test_lowered_max_version_forces_a_downgrade(tmp_path: Path, disk: Path, repo: ControlledRepo,
                                                releases: dict[str, Path]) -> None:
    publish.add(repo.directory, releases["2.0.0"], waves="none")
    publish.add(repo.directory, releases["1.1.0"], waves="none", max_version="1.1.0")
    agent = make_agent(tmp_path, disk, repo)
    agent.version = "2.0.0"
    st = agent.run("refresh")
    assert st.chosen_update is not None and st.chosen_update["version"] == "1.1.0"


def test_unreachable_repository_is_reported(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    agent = make_agent(tmp_path, disk, repo)
    agent.settings["metadata-base-url"] = "http://127.0.0.1:9/metadata/"
    with pytest.raises(Exception, match="refreshing metadata") as err:
        agent.run("refresh")
    assert type(err.value).__name__ == "RepositoryUnreachable"
    st = agent.status()
    assert st.reason.startswith("cannot check for updates:")
    assert st.most_recent_command is not None and st.most_recent_command["error"] == "RepositoryUnreachable"


def test_prepare_when_the_chosen_update_vanished(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    agent = make_agent(tmp_path, disk, repo)
    agent.run("refresh")
    agent.settings["version-lock"] = "1.0.0"  # changed between refresh and prepare
    with pytest.raises(NothingChosen, match=r"nothing to prepare: locked to 1\.0\.0"):
        agent.run("prepare")
    st = agent.status()
    assert st.update_state == "Idle" and agent.slots.state().b.tries_left == 0


# --- migrations -------------------------------------------------------------------------------


def datastore(root: Path, version: str, motd: str) -> Path:
    d = root / f"v{version}"
    (d / "live").mkdir(parents=True)
    (d / "pending").mkdir()
    (d / "live" / "settings.json").write_text(json.dumps({"motd": motd, "network": {"hostname": "h"}}))
    (d / "live" / "definitions.json").write_text("{}")
    (d / "pending" / "default.json").write_text(json.dumps({"motd": motd}))
    (root / "current").symlink_to(f"v{version}")
    return root


def test_migrations_are_cached_verified_and_run_both_ways(tmp_path: Path, disk: Path, repo: ControlledRepo,
                                                          releases: dict[str, Path]) -> None:
    publish.add(repo.directory, releases["2.0.0"], waves="none", migrations=[f"1.0.0:{MIGRATION}"])
    agent = make_agent(tmp_path, disk, repo)
    agent.run("refresh")
    assert agent.run("prepare").staged_version == "2.0.0"
    cache = agent.paths.migrations
    name = "migrate_2.0.0_stock-motd.py"
    assert (cache / name).read_bytes() == MIGRATION.read_bytes()
    root = agent.paths.root.read_bytes()

    store = datastore(tmp_path / "ds", "1.0.0", "Welcome to Kiln!")
    plan = migrate.plan(store, Version.parse("2.0.0"), cache, root)
    assert plan is not None and list(plan.migrations) == [name] and plan.direction == "--forward"
    assert migrate.apply(store, plan) == [name]
    assert migrate.datastore_version(store) == Version(2, 0, 0)
    live = json.loads((store / "current" / "live" / "settings.json").read_text())
    assert live == {"motd": "Welcome to Kiln 2!", "network": {"hostname": "h"}}
    assert json.loads((store / "current" / "pending" / "default.json").read_text()) == {"motd": "Welcome to Kiln 2!"}
    assert json.loads((store / "v1.0.0" / "live" / "settings.json").read_text())["motd"] == "Welcome to Kiln!"

    back = migrate.plan(store, Version.parse("1.0.0"), cache, root)  # the rollback: 1.0.0 runs it backward
    assert back is not None and back.direction == "--backward"
    migrate.apply(store, back)
    assert json.loads((store / "current" / "live" / "settings.json").read_text())["motd"] == "Welcome to Kiln!"
    assert migrate.plan(store, Version.parse("1.0.0"), cache, root) is None


def test_tampered_cached_migration_is_refused_and_datastore_untouched(
        tmp_path: Path, disk: Path, repo: ControlledRepo, releases: dict[str, Path]) -> None:
    publish.add(repo.directory, releases["2.0.0"], waves="none", migrations=[f"1.0.0:{MIGRATION}"])
    agent = make_agent(tmp_path, disk, repo)
    agent.run("refresh")
    agent.run("prepare")
    cache = agent.paths.migrations
    (cache / "migrate_2.0.0_stock-motd.py").write_text("#!/usr/bin/python3\nimport os\nos.system('touch /pwned')\n")
    store = datastore(tmp_path / "ds", "1.0.0", "Welcome to Kiln!")
    with pytest.raises(UntrustedUpdate, match="does not match its signed length/hash"):
        migrate.plan(store, Version.parse("2.0.0"), cache, agent.paths.root.read_bytes())
    assert migrate.datastore_version(store) == Version(1, 0, 0)


def test_a_release_without_migrations_is_planned_without_verifying_the_cache(
        tmp_path: Path, disk: Path, repo: ControlledRepo, releases: dict[str, Path]) -> None:
    """Nothing to run: the manifest is not verified (no TUF client on the way to ready).
    With migrations to run, the same unverifiable cache is refused."""
    publish.add(repo.directory, releases["2.0.0"], waves="none")
    agent = make_agent(tmp_path, disk, repo)
    agent.run("refresh")
    agent.run("prepare")
    cache = agent.paths.migrations
    shutil.rmtree(cache / "metadata")  # nothing could be verified now
    store = datastore(tmp_path / "ds", "1.0.0", "Welcome to Kiln!")
    plan = migrate.plan(store, Version.parse("2.0.0"), cache, agent.paths.root.read_bytes())
    assert plan is not None and plan.migrations == {}
    doc = json.loads((cache / "manifest.json").read_text())  # now claim a migration it never signed
    doc["migrations"] = {"(1.0.0, 2.0.0)": ["migrate_2.0.0_evil.py"]}
    (cache / "manifest.json").write_text(json.dumps(doc))
    (cache / "migrate_2.0.0_evil.py").write_text("#!/bin/sh\ntouch /pwned\n")
    with pytest.raises(UpdateError):
        migrate.plan(store, Version.parse("2.0.0"), cache, agent.paths.root.read_bytes())


def test_failing_migration_leaves_the_datastore_in_use(tmp_path: Path) -> None:
    store = datastore(tmp_path / "ds", "1.0.0", "x")
    before = {p: p.read_bytes() for p in (store / "v1.0.0").rglob("*.json")}
    plan = migrate.Plan(Version(1, 0, 0), Version(2, 0, 0), {"broken": b"#!/bin/sh\necho nope >&2\nexit 3\n"})
    with pytest.raises(migrate.MigrationFailed, match=r"broken --forward failed \(exit 3\): nope"):
        migrate.apply(store, plan)
    assert migrate.datastore_version(store) == Version(1, 0, 0)
    assert {p: p.read_bytes() for p in (store / "v1.0.0").rglob("*.json")} == before
    assert sorted(p.name for p in store.iterdir()) == ["current", "v1.0.0"]


def test_no_cached_migrations_carries_settings_over(tmp_path: Path) -> None:
    store = datastore(tmp_path / "ds", "1.0.0", "x")
    plan = migrate.plan(store, Version(1, 1, 0), tmp_path / "no-cache", b"")
    assert plan is not None and plan.migrations == {}
    migrate.apply(store, plan)
    assert json.loads((store / "current" / "live" / "settings.json").read_text())["motd"] == "x"
    assert migrate.datastore_version(store) == Version(1, 1, 0)


# --- interruptions ------------------------------------------------------------------------------


AGENT = """
import sys, json
from pathlib import Path
sys.path.insert(0, {root!r})
from kiln.host.slot import Slots
from kiln.host.update.agent import Agent
from kiln.host.update.status import Paths
a = Agent(slots=Slots.open(image=Path({disk!r}), active="A"), settings=json.loads({settings!r}),
          variant="container-host", version="1.0.0", arch="amd64",
          paths=Paths(state=Path({state!r}), run=Path({run!r}), root=Path({rootjson!r})))
for cmd in sys.argv[1:]:
    a.run(cmd)
"""


def test_killed_agent_leaves_the_inactive_slot_unbootable_and_can_rerun(
        tmp_path: Path, disk: Path, releases: dict[str, Path]) -> None:
    """kill -9 of the agent at 10 points of refresh + prepare: inside each metadata refresh
    and at several bytes of every image's download. The server holds the response at that
    byte until the agent is killed there, so each kill lands where it is meant to however
    busy the machine is (no timing). After each, slot B is cleared (GRUB boots A), no
    command is left "Running", and the next run finishes."""
    from kiln.repo.metadata import Repo
    from tests.controlled_repo import Hold

    d = tmp_path / "repo"
    admin.init(d)
    release = fake_release(tmp_path / "big", "1.1.0", root_mib=6, incompressible=True)
    want = decompressed(release, "root")
    publish.add(d, release, waves="none")
    repo = Repo.open(d)
    update = next(u for u in publish.current_manifest(repo).updates if str(u.version) == "1.1.0")
    url = {key: "/targets/" + repo.target_path(update.images[key].target).name for key in ("root", "boot", "hash")}
    size = {key: repo.target_path(update.images[key].target).stat().st_size for key in url}  # compressed
    # (request path, body bytes sent before the pause, which response to that path)
    points = [("/metadata/timestamp.json", 16, 1), ("/metadata/timestamp.json", 16, 2)]  # refresh; prepare
    points += [(url["root"], int(size["root"] * f), 1) for f in (0.0, 0.25, 0.5, 0.75)]
    points += [(url["root"], size["root"] - 1, 1), (url["boot"], size["boot"] // 2, 1),
               (url["hash"], size["hash"] // 2, 1), (url["hash"], size["hash"] - 1, 1)]
    with ControlledRepo(d) as srv:
        agent = make_agent(tmp_path, disk, srv)
        script = AGENT.format(root=str(ROOT / "src"), disk=str(disk), settings=json.dumps(agent.settings),
                              state=str(agent.paths.state), run=str(agent.paths.run),
                              rootjson=str(agent.paths.root))
        argv = [sys.executable, "-c", script, "refresh", "prepare", "activate"]
        for path, at, nth in points:
            hold = Hold(at, nth)
            srv.holds, srv.responses = {path: hold}, {}
            proc = subprocess.Popen(argv)
            try:
                while not hold.reached.wait(0.05):
                    assert proc.poll() is None, f"the agent ended (exit {proc.returncode}) before {path} byte {at}"
            finally:
                proc.kill()
                proc.wait()
                hold.release.set()
            where = f"killed at byte {at} of response {nth} to {path}"
            st = Slots.open(image=disk, active="A").state()
            assert st.b == Flags(0, 0, False) and st.next_boot == "A", f"{where}: {st}"
            status = agent.status()
            assert status.most_recent_command is None or status.most_recent_command["cmd_status"] != "Running", where
            if path.startswith("/targets/"):  # inside prepare, after the status said so
                assert Status.load(agent.paths.status).update_state == "Available", where
        srv.holds = {}
        assert subprocess.run(argv, check=False).returncode == 0  # the rerun completes
        assert Slots.open(image=disk, active="A").state().next_boot == "B"
        assert read_partition(disk, agent.slots, "B", "root", len(want)) == want


def test_a_boot_that_never_finished_is_chosen_again_a_bad_release_is_not(
    tmp_path: Path, disk: Path, repo: ControlledRepo
) -> None:
    """The real agent and status file as a rollback leaves them (Ready before the reboot,
    the other slot cleared, a failure recorded): an ambiguous failure is taken again at the
    next refresh (the VM power-cut test caught the status reconcile dropping it), a
    definite one, or the last of max-boot-attempts ambiguous ones, is not."""
    from kiln.host.update import failures

    agent = make_agent(tmp_path, disk, repo)
    agent.run("refresh")
    agent.run("prepare")
    agent.run("activate")
    agent.slots.apply("clear-inactive")  # what ready.report_fallback does after the fallback
    entry = {"version": "1.1.0", "slot": "B", "kind": "ambiguous", "reason": failures.UNHEALTHY,
             "at": "2026-01-01T00:00:00Z"}
    failures.record(agent.paths.failures, entry)
    st = agent.run("refresh")
    assert (st.update_state, (st.chosen_update or {}).get("version"), st.reason) == ("Available", "1.1.0", "")
    assert agent.run("prepare").update_state == "Staged"
    failures.record(agent.paths.failures, {**entry, "at": "2026-01-01T00:10:00Z"})
    failures.record(agent.paths.failures, {**entry, "at": "2026-01-01T00:20:00Z"})  # the 3rd of 3
    agent.slots.apply("clear-inactive")
    st = agent.run("refresh")
    assert st.update_state == "Idle" and "1.1.0 failed on this host before" in st.reason
    failures.clear(agent.paths.failures, "1.1.0")
    failures.record(agent.paths.failures, {**entry, "kind": "definite", "reason": "health gate failed: x"})
    st = agent.run("refresh")
    assert st.update_state == "Idle" and "1.1.0 failed on this host before" in st.reason
