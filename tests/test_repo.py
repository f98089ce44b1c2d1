"""`kiln repo`: a TUF repository made, changed and served by Kiln, read by python-tuf's
real client (ngclient) over HTTP on 127.0.0.1, with release artifacts from fake_release."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater

from kiln.cli.main import main
from kiln.core.errors import KilnError
from kiln.host.update import waves as wavemath
from kiln.host.update.manifest import Manifest, Version
from kiln.repo import admin, publish, schedule
from kiln.repo.serve import RepoServer
from tests.helpers import fake_release

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEEDS = [0, 20, 102, 307, 819, 1228, 1843]
START = "2030-01-01T00:00:00Z"


@dataclass(frozen=True)
class Releases:
    v100: Path
    v110: Path
    v100_rebuilt: Path  # same version, different bytes
    migration: Path


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    base = tmp_path_factory.mktemp("releases")
    migration = base / "rename-motd"
    migration.write_text("#!/bin/sh\necho migrating\n")
    return Releases(
        fake_release(base / "1.0.0" / "artifacts", "1.0.0", root_mib=1),
        fake_release(base / "1.1.0" / "artifacts", "1.1.0", root_mib=1),
        fake_release(base / "1.0.0b" / "artifacts", "1.0.0", root_mib=1, seed=7),
        migration,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    admin.init(tmp_path / "repo")
    return tmp_path / "repo"


@pytest.fixture
def server(repo: Path) -> Iterator[RepoServer]:
    with RepoServer(repo) as srv:
        yield srv


def kiln(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """Run the CLI in-process; returns (exit code, parsed JSON stdout or text, stderr)."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    try:
        return rc, json.loads(out), err
    except ValueError:
        return rc, out, err


def manifest_of(repo: Path) -> Manifest:
    return Manifest.from_bytes(read_target(repo, "manifest.json"))


def targets_md(repo: Path) -> Metadata[Any]:
    ts = Metadata.from_file(str(repo / "metadata" / "timestamp.json"))
    snap = Metadata.from_file(str(repo / "metadata" / f"{ts.signed.snapshot_meta.version}.snapshot.json"))
    return Metadata.from_file(str(repo / "metadata" / f"{snap.signed.meta['targets.json'].version}.targets.json"))


def read_target(repo: Path, name: str) -> bytes:
    info = targets_md(repo).signed.targets[name]
    return (repo / "targets" / f"{info.hashes['sha256']}.{name}").read_bytes()


def versions(repo: Path) -> dict[str, int]:
    return {r.name: r.version for r in admin.status(repo).roles}


def client(srv: RepoServer, cache: Path, bootstrap: bytes) -> Updater:
    """A host's TUF client with its own metadata cache, refreshed."""
    cache.mkdir(parents=True, exist_ok=True)
    updater = Updater(str(cache), srv.metadata_url, str(cache / "targets"), srv.targets_url, bootstrap=bootstrap)
    updater.refresh()
    return updater


def snapshot_files(repo: Path) -> dict[str, bytes]:
    files = {f"metadata/{p.name}": p.read_bytes() for p in (repo / "metadata").iterdir()}
    files |= {f"targets/{p.name}": b"" for p in (repo / "targets").iterdir()}
    files |= {f"keys/{p.name}": p.read_bytes() for p in (repo / "keys").iterdir()}
    files["repo.json"] = (repo / "repo.json").read_bytes()
    return files


# -- init ------------------------------------------------------------------------------


def test_init_threshold_layout_and_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "r"
    rc, out, _ = kiln(capsys, "repo", "init", str(d), "--root-keys", "3", "--root-threshold", "2", "--json")
    assert rc == 0
    assert out["versions"] == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 1}
    assert sorted(p.name for p in (d / "keys").iterdir()) == [
        "root-1.pem", "root-2.pem", "root-3.pem", "snapshot-1.pem", "targets-1.pem", "timestamp-1.pem"
    ]
    assert (d / "keys").stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (d / "keys").iterdir())
    md = d / "metadata"
    assert sorted(p.name for p in md.iterdir()) == [
        "1.root.json", "1.snapshot.json", "1.targets.json", "root.json", "timestamp.json"
    ]
    assert (md / "root.json").read_bytes() == (md / "1.root.json").read_bytes()
    root = Metadata.from_file(str(md / "1.root.json")).signed
    assert root.consistent_snapshot is True
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 3
    assert all(root.roles[r].threshold == 1 and len(root.roles[r].keyids) == 1 for r in ("targets", "snapshot"))
    assert all(k.keytype == "ed25519" for k in root.keys.values())
    assert read_target(d, "manifest.json") == Manifest.empty().to_bytes()
    assert json.loads(read_target(d, "manifest.json")) == {"updates": [], "migrations": {}}
    settings = json.loads((d / "repo.json").read_text())
    assert settings["expires_days"] == {"root": 365, "targets": 90, "snapshot": 30, "timestamp": 7}
    assert settings["thresholds"]["root"] == 2
    now = datetime.now(UTC)
    for role, days in settings["expires_days"].items():
        name = "timestamp.json" if role == "timestamp" else f"1.{role}.json"
        expires = Metadata.from_file(str(md / name)).signed.expires
        assert abs(expires - (now + timedelta(days=days))) < timedelta(minutes=5)

    # The 2-of-3 root works for a client and for a later root version.
    assert admin.rotate_key(d, "targets").versions["root"] == 2
    with RepoServer(d) as srv:
        client(srv, tmp_path / "client", (md / "1.root.json").read_bytes())

    rc, _, err = kiln(capsys, "repo", "init", str(d))
    assert rc == 1 and "not empty" in err
    rc, _, err = kiln(capsys, "repo", "init", str(tmp_path / "x"), "--root-keys", "2", "--root-threshold", "3")
    assert rc == 1 and "--root-threshold 3" in err and not (tmp_path / "x").exists()


def test_init_expires_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "r"
    assert kiln(capsys, "repo", "init", str(d), "--expires", "timestamp=1", "--expires", "root=730")[0] == 0
    rc, st, _ = kiln(capsys, "repo", "status", str(d), "--json")
    assert rc == 0
    assert st["expires_days"] == {"root": 730, "targets": 90, "snapshot": 30, "timestamp": 1}
    assert st["roles"]["timestamp"]["expiry"] in ("expires in 1 day", "expires in 23 hours")  # now or seconds later
    assert st["roles"]["root"]["expiry"] == "expires in 730 days"
    assert st["roles"]["root"]["missing_private_keys"] == [] and not st["roles"]["root"]["expired"]
    assert st["updates"] == [] and st["migrations"] == {}
    rc, text, _ = kiln(capsys, "repo", "status", str(d))
    assert rc == 0 and "timestamp" in text and "no releases published" in text


# -- add, check, manifest ------------------------------------------------------------------


def test_add_two_versions_and_check(
    repo: Path, server: RepoServer, releases: Releases, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = kiln(capsys, "repo", "add", str(repo), str(releases.v100), "--json")
    assert rc == 0, err
    assert out["versions"] == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    # A build output directory holding artifacts/ works too.
    rc, out, err = kiln(capsys, "repo", "add", str(repo), str(releases.v110.parent), "--json",
                        "--migration", f"1.0.0:{releases.migration}")
    assert rc == 0, err
    rc, out, err = kiln(capsys, "repo", "check", server.url, "--root", str(repo / "metadata" / "1.root.json"), "--json")
    assert rc == 0, err
    assert [v["version"] for v in out["versions"]] == ["1.0.0", "1.1.0"]
    assert out["roles"]["targets"]["version"] == 3 and out["roles"]["timestamp"]["version"] == 3
    names = {t["name"] for t in out["targets"]}
    assert names == {"manifest.json", "migrate_1.1.0_rename-motd"} | {
        f"kiln-container-host-amd64-{v}-{k}.img.zst" for v in ("1.0.0", "1.1.0") for k in ("boot", "root", "hash")
    }
    rc, text, err = kiln(capsys, "repo", "check", server.url, "--root", str(repo / "metadata" / "1.root.json"))
    assert rc == 0 and "8 targets verified" in text


def test_manifest_content(repo: Path, releases: Releases) -> None:
    publish.add(repo, releases.v110, start_at=START, migrations=[f"1.0.0:{releases.migration}"])
    publish.add(repo, releases.v100, start_at=START)
    m = manifest_of(repo)
    by_version = {str(u.version): u for u in m.updates}
    # max_version: the highest of this version and the current max, on every release of the variant.
    assert {str(u.max_version) for u in m.updates} == {"1.1.0"}
    assert m.migrations == {(Version(1, 0, 0), Version(1, 1, 0)): ["migrate_1.1.0_rename-motd"]}
    assert json.loads(read_target(repo, "manifest.json"))["migrations"] == {
        "(1.0.0, 1.1.0)": ["migrate_1.1.0_rename-motd"]
    }
    assert read_target(repo, "migrate_1.1.0_rename-motd") == releases.migration.read_bytes()
    # Waves from default.toml: Bottlerocket's seeds, opening at the start plus each offset.
    u = by_version["1.0.0"]
    assert sorted(u.waves) == DEFAULT_SEEDS
    start = datetime(2030, 1, 1, tzinfo=UTC)
    offsets = [timedelta(hours=1), timedelta(hours=4), *(timedelta(days=d) for d in (1, 2, 4, 5, 6))]
    assert [u.waves[s] for s in DEFAULT_SEEDS] == [start + o for o in offsets]
    # Images: the target's TUF entry covers the compressed file, the manifest the partition image.
    art = json.loads((releases.v100 / "manifest.json").read_text())
    targets = targets_md(repo).signed.targets
    for key, img in u.images.items():
        entry = art["images"][key]
        assert img.target == entry["file"]
        assert (img.size, img.sha256) == (entry["uncompressed_size"], entry["uncompressed_sha256"])
        assert (targets[img.target].length, targets[img.target].hashes) == (entry["size"], {"sha256": entry["sha256"]})
    assert (u.root_hash, u.salt, u.data_blocks) == (
        art["verity"]["root_hash"], art["verity"]["salt"], art["verity"]["data_blocks"]
    )
    assert u.build_id == art["build_id"]

    # --max-version pulls 1.1.0 back for the whole variant.
    publish.add(repo, releases.v100, start_at=START, max_version="1.0.0", waves="none")
    m = manifest_of(repo)
    assert {str(u.max_version) for u in m.updates} == {"1.0.0"}
    assert next(u for u in m.updates if str(u.version) == "1.0.0").waves == {}


def test_readding_a_version_replaces_it(repo: Path, releases: Releases) -> None:
    publish.add(repo, releases.v100)
    first = manifest_of(repo).updates[0]
    publish.add(repo, releases.v100_rebuilt)
    m = manifest_of(repo)
    assert len(m.updates) == 1
    assert m.updates[0].images["root"].sha256 != first.images["root"].sha256
    assert m.updates[0].root_hash == json.loads((releases.v100_rebuilt / "manifest.json").read_text())["verity"][
        "root_hash"
    ]
    name = m.updates[0].images["root"].target
    assert read_target(repo, name) == (releases.v100_rebuilt / name).read_bytes()


def test_waves_command(
    repo: Path, server: RepoServer, releases: Releases, capsys: pytest.CaptureFixture[str]
) -> None:
    publish.add(repo, releases.v100)
    rc, out, err = kiln(capsys, "repo", "waves", str(repo), "1.0.0", "ohno", "--start-at", START, "--json")
    assert rc == 0, err
    assert len(out["updates"][0]["waves"]) == 6 and out["targets"] == ["manifest.json"]
    waves = manifest_of(repo).updates[0].waves
    assert waves == schedule.load("ohno").at(datetime(2030, 1, 1, tzinfo=UTC))
    assert max(waves.values()) - min(waves.values()) == timedelta(minutes=150)
    mine = repo.parent / "two-step.toml"
    mine.write_text('[[waves]]\nstart_after = "2 hours"\nfleet_percentage = 50\n'
                    '[[waves]]\nstart_after = "1 week"\nfleet_percentage = 100\n')
    assert kiln(capsys, "repo", "waves", str(repo), "v1.0.0", str(mine), "--start-at", START)[0] == 0
    assert manifest_of(repo).updates[0].waves == {
        0: datetime(2030, 1, 1, 2, tzinfo=UTC), 1024: datetime(2030, 1, 8, tzinfo=UTC)
    }
    assert kiln(capsys, "repo", "waves", str(repo), "1.0.0", "none")[0] == 0
    assert manifest_of(repo).updates[0].waves == {}
    rc, _, err = kiln(capsys, "repo", "waves", str(repo), "9.9.9", "default")
    assert rc == 1 and "no release 9.9.9" in err and "container-host/amd64 1.0.0" in err
    rc, _, err = kiln(capsys, "repo", "waves", str(repo), "1.0.0", "default", "--variant", "other")
    assert rc == 1 and "variant other" in err
    assert kiln(capsys, "repo", "check", server.url, "--root", str(repo / "metadata" / "root.json"))[0] == 0


def test_builtin_schedules() -> None:
    spans = {}
    for name in schedule.BUILTIN:
        s = schedule.load(name)
        assert s.waves[-1].fleet_percentage == 100
        spans[name] = (s.waves[0].start_after, s.waves[-1].start_after)
    assert spans["default"] == (timedelta(hours=1), timedelta(days=6))
    assert spans["accelerated"][1] <= timedelta(days=1)
    assert spans["slow"][1] == timedelta(days=13)
    assert spans["ohno"] == (timedelta(minutes=30), timedelta(minutes=180))
    assert sorted(schedule.load("default").at(datetime(2030, 1, 1, tzinfo=UTC))) == DEFAULT_SEEDS
    assert wavemath.wave_seeds([1, 5, 15, 40, 60, 90, 100]) == DEFAULT_SEEDS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[waves]]\nstart_after = "1 hour"\nfleet_percentage = 50\n', "waves[0]: the last wave must reach"),
        ('[[waves]]\nstart_after = "1 hour"\nfleet_percentage = 50\n[[waves]]\nstart_after = "2 hours"\n'
         'fleet_percentage = 40\n', "waves[1]: fleet_percentage 40 is not above"),
        ('[[waves]]\nstart_after = "2 hours"\nfleet_percentage = 5\n[[waves]]\nstart_after = "1 hour"\n'
         'fleet_percentage = 100\n', "waves[1]: start_after must be later"),
        ('[[waves]]\nstart_after = "soon"\nfleet_percentage = 100\n', "waves[0]: start_after:"),
        ('[[waves]]\nstart_after = "1 fortnight"\nfleet_percentage = 100\n', "unknown unit 'fortnight'"),
        ('[[waves]]\nstart_after = "1 day"\nfleet_percentage = 101\n', "waves[0]: fleet_percentage"),
        ('[[waves]]\nstart_after = "1 day"\nfleet_percent = 100\n', "waves[0]: unknown key 'fleet_percent'"),
        ("waves = 3\n", "no [[waves]]"),
        ("[[waves]\n", "not valid TOML"),
    ],
)
def test_bad_wave_files(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "mine.toml"
    f.write_text(text)
    with pytest.raises(KilnError) as e:
        schedule.load(str(f))
    assert str(f) in str(e.value) and message in str(e.value)


# -- refresh and keys --------------------------------------------------------------------------


def test_refresh_bumps_snapshot_and_timestamp(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = versions(repo)
    rc, out, err = kiln(capsys, "repo", "refresh", str(repo), "--json")
    assert rc == 0, err
    assert out["versions"] == before | {"snapshot": before["snapshot"] + 1, "timestamp": before["timestamp"] + 1}
    rc, out, _ = kiln(capsys, "repo", "refresh", str(repo), "--expires", "timestamp=1", "--expires", "targets=30",
                      "--json")
    assert rc == 0 and out["versions"]["targets"] == before["targets"] + 1
    ts = Metadata.from_file(str(repo / "metadata" / "timestamp.json")).signed
    assert ts.version == before["timestamp"] + 2
    assert abs(ts.expires - (datetime.now(UTC) + timedelta(days=1))) < timedelta(minutes=5)
    assert json.loads((repo / "repo.json").read_text())["expires_days"]["targets"] == 30
    assert abs(targets_md(repo).signed.expires - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=5)


@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp"])
def test_rotate_key_and_clients_follow(
    tmp_path: Path, repo: Path, server: RepoServer, releases: Releases, role: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publish.add(repo, releases.v100)
    old_root = (repo / "metadata" / "1.root.json").read_bytes()
    cached = client(server, tmp_path / "cached", old_root)  # has timestamp/snapshot/targets cached
    assert cached.get_targetinfo("manifest.json") is not None
    old_key = repo / "keys" / f"{role}-1.pem"
    before = versions(repo)

    rc, out, err = kiln(capsys, "repo", "rotate-key", str(repo), role, "--json")
    assert rc == 0, err
    assert out["new_keys"] == [str(repo / "keys" / f"{role}-2.pem")]
    assert out["removed_keys"] == [str(old_key)] and not old_key.exists()
    after = out["versions"]
    assert after["root"] == before["root"] + 1
    bumped = {"root": [], "targets": ["targets", "snapshot", "timestamp"], "snapshot": ["snapshot", "timestamp"],
              "timestamp": ["timestamp"]}[role]
    for r in ("targets", "snapshot", "timestamp"):
        assert after[r] == before[r] + (1 if r in bumped else 0)
    root2 = Metadata.from_file(str(repo / "metadata" / "2.root.json"))
    assert (repo / "metadata" / "root.json").read_bytes() == (repo / "metadata" / "2.root.json").read_bytes()
    old_root_md = Metadata.from_bytes(old_root)
    assert root2.signed.roles[role].keyids != old_root_md.signed.roles[role].keyids
    # N+1 verifies with N's root keys and with its own.
    old_root_md.signed.verify_delegate("root", root2.signed_bytes, root2.signatures)
    root2.signed.verify_delegate("root", root2.signed_bytes, root2.signatures)

    # A host with a cache from before, and a new host that only knows 1.root.json, both follow.
    for name in ("cached", "fresh"):
        updater = client(server, tmp_path / name, old_root)
        info = updater.get_targetinfo("manifest.json")
        assert info is not None
        assert Manifest.from_bytes(Path(updater.download_target(info)).read_bytes()).updates
        assert json.loads((tmp_path / name / "root.json").read_bytes())["signed"]["version"] == 2
    rc, _, err = kiln(capsys, "repo", "check", server.url, "--root", str(tmp_path / "fresh" / "root_history" /
                      "1.root.json"))
    assert rc == 0, err
    # Keep going: a second rotation still works from the very first root.
    admin.rotate_key(repo, role)
    client(server, tmp_path / "third", old_root)


def test_rotate_one_root_key_of_two_of_three(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "r"
    admin.init(d, root_keys=3, root_threshold=2)
    st = admin.status(d)
    first = st.roles[0].keyids[0]
    changed = admin.rotate_key(d, "root", keyid=first[:10])
    assert [p.name for p in changed.new_keys] == ["root-4.pem"] and [p.name for p in changed.removed_keys] == [
        "root-1.pem"
    ]
    root = Metadata.from_file(str(d / "metadata" / "2.root.json")).signed
    assert first not in root.roles["root"].keyids and len(root.roles["root"].keyids) == 3
    with RepoServer(d) as srv:
        client(srv, tmp_path / "c", (d / "metadata" / "1.root.json").read_bytes())
    rc, _, err = kiln(capsys, "repo", "rotate-key", str(d), "root", "--key-id", "zz")
    assert rc == 1 and "no key has an id starting with 'zz'" in err


# -- serve ---------------------------------------------------------------------------------


def _get(srv: RepoServer, path: str, method: str = "GET") -> tuple[int, bytes]:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)  # sent as is: no client-side normalization
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_serve_only_metadata_and_targets(repo: Path, server: RepoServer) -> None:
    status, body = _get(server, "/metadata/root.json")
    assert status == 200 and body == (repo / "metadata" / "root.json").read_bytes()
    assert _get(server, "/metadata/timestamp.json", "HEAD") == (200, b"")
    info = targets_md(repo).signed.targets["manifest.json"]
    assert _get(server, f"/targets/{info.hashes['sha256']}.manifest.json")[0] == 200
    (repo / "targets" / ".stage-1-abcd-x").write_bytes(b"partial")
    for path in (
        "/keys/root-1.pem",
        "/metadata/../keys/root-1.pem",
        "/targets/../keys/root-1.pem",
        "/metadata/..%2Fkeys%2Froot-1.pem",
        "/metadata/%2e%2e/keys/root-1.pem",
        "/metadata/%2e%2e%2frepo.json",
        "/../repo.json",
        "/repo.json",
        "/.lock",
        "/metadata/",
        "/metadata",
        "/targets/",
        "/",
        "/targets/.stage-1-abcd-x",
        "/metadata/nope.json",
        "//etc/passwd",
        "/metadata//etc/passwd",
    ):
        status, body = _get(server, path)
        assert status == 404, path
        assert b"PRIVATE KEY" not in body and b"expires_days" not in body
    assert _get(server, "/metadata/root.json", "DELETE")[0] == 501


def test_serve_cli_prints_urls(repo: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli.main", "repo", "serve", str(repo), "--json"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        doc = json.loads(proc.stdout.readline())
        assert doc["metadata_url"].startswith("http://127.0.0.1:") and doc["targets_url"].endswith("/targets/")
        host, port = doc["url"].removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/metadata/1.root.json")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_does_not_import_tuf_at_startup() -> None:
    code = (
        "import sys, kiln.cli.main; kiln.cli.main.parser(); "
        "sys.exit(any(m.split('.')[0] in ('tuf', 'securesystemslib') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# -- refusals: clear errors, nothing written -------------------------------------------------------


def test_bad_inputs_change_nothing(
    tmp_path: Path, repo: Path, releases: Releases, capsys: pytest.CaptureFixture[str]
) -> None:
    publish.add(repo, releases.v100)
    before = snapshot_files(repo)

    missing = tmp_path / "missing"
    shutil.copytree(releases.v110, missing)
    (missing / "kiln-container-host-amd64-1.1.0-root.img.zst").unlink()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(releases.v110, corrupt)
    hash_img = corrupt / "kiln-container-host-amd64-1.1.0-hash.img.zst"
    data = bytearray(hash_img.read_bytes())
    data[-1] ^= 0xFF
    hash_img.write_bytes(bytes(data))
    bad_waves = tmp_path / "bad-waves.toml"
    bad_waves.write_text('[[waves]]\nstart_after = "1 day"\nfleet_percentage = 10\n'
                         '[[waves]]\nstart_after = "2 days"\nfleet_percentage = 5\n')
    r = str(repo)
    cases: list[tuple[list[str], str]] = [
        (["add", r, str(missing)], f"{missing}/kiln-container-host-amd64-1.1.0-root.img.zst: missing"),
        (["add", r, str(corrupt)], f"{hash_img}: sha256"),
        (["add", r, str(tmp_path / "nowhere")], "no manifest.json"),
        (["add", r, str(releases.v110), "--waves", str(bad_waves)], f"{bad_waves}: waves[1]: fleet_percentage 5"),
        (["add", r, str(releases.v110), "--waves", "fast"], "neither a built-in schedule nor a file"),
        (["add", r, str(releases.v110), "--start-at", "tomorrow"], "--start-at: 'tomorrow'"),
        (["add", r, str(releases.v110), "--start-at", "2030-01-01T00:00:00"], "has no time zone"),
        (["add", r, str(releases.v110), "--max-version", "2"], "--max-version: '2'"),
        (["add", r, str(releases.v110), "--migration", f"1.1.0:{releases.migration}"], "must be lower"),
        (["add", r, str(releases.v110), "--migration", "1.0.0:/nonexistent"], "/nonexistent is not a file"),
        (["add", r, str(releases.v110), "--migration", "1.0.0"], "expected FROM_VERSION:PATH"),
        (["refresh", r, "--expires", "timestamp=0"], "--expires 'timestamp=0'"),
        (["refresh", r, "--expires", "mirror=3"], "--expires 'mirror=3'"),
        (["refresh", r, "--expires", "timestamp"], "--expires 'timestamp'"),
        (["waves", r, "1.0.0", str(bad_waves)], f"{bad_waves}: waves[1]"),
        (["waves", r, "1.2", "default"], "VERSION: '1.2'"),
        (["add", str(tmp_path / "notarepo"), str(releases.v110)], "not a Kiln update repository"),
    ]
    for argv, message in cases:
        rc, _, err = kiln(capsys, "repo", *argv)
        assert rc == 1, argv
        assert message in err, (argv, err)
        assert snapshot_files(repo) == before, argv
    assert not (tmp_path / "notarepo").exists()

    # A missing signing key: refused before anything is written.
    key = repo / "keys" / "targets-1.pem"
    saved = key.read_bytes()
    key.unlink()
    rc, _, err = kiln(capsys, "repo", "add", r, str(releases.v110))
    assert rc == 1 and "targets: 0 of the 1 private keys" in err
    key.write_bytes(saved)
    key.chmod(0o600)
    assert snapshot_files(repo) == before


def test_check_failures(
    tmp_path: Path, repo: Path, server: RepoServer, releases: Releases, capsys: pytest.CaptureFixture[str]
) -> None:
    publish.add(repo, releases.v100)
    other = tmp_path / "other"
    admin.init(other)
    rc, _, err = kiln(capsys, "repo", "check", server.url, "--root", str(other / "metadata" / "1.root.json"))
    assert rc == 1 and "UnsignedMetadataError" in err
    rc, _, err = kiln(capsys, "repo", "check", server.url, "--root", str(tmp_path / "none.json"))
    assert rc == 1 and "cannot read" in err
    # A served image that no longer matches targets.json.
    name = manifest_of(repo).updates[0].images["root"].target
    info = targets_md(repo).signed.targets[name]
    stored = repo / "targets" / f"{info.hashes['sha256']}.{name}"
    data = bytearray(stored.read_bytes())
    data[0] ^= 0xFF
    stored.write_bytes(bytes(data))
    rc, _, err = kiln(capsys, "repo", "check", server.url, "--root", str(repo / "metadata" / "1.root.json"))
    assert rc == 1 and "LengthOrHashMismatchError" in err
    # Nothing listening.
    server.stop()
    rc, _, err = kiln(capsys, "repo", "check", server.url, "--root", str(repo / "metadata" / "1.root.json"))
    assert rc == 1 and "kiln: error:" in err


def test_interrupted_root_write_is_repaired(repo: Path) -> None:
    """A crash between `<N>.root.json` and `root.json`: the versioned file is what clients
    see, so it is the current root, and the next change rewrites the copy."""
    admin.rotate_key(repo, "snapshot")
    md = repo / "metadata"
    (md / "root.json").write_bytes((md / "1.root.json").read_bytes())
    assert admin.status(repo).roles[0].version == 2
    admin.refresh(repo)
    assert (md / "root.json").read_bytes() == (md / "2.root.json").read_bytes()
