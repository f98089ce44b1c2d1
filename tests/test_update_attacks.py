"""TUF attacks on the update agent. A repository under the test's control (`ControlledRepo`
serving a real `kiln repo` directory) plays the malicious mirror: it replaces, replays,
mixes, stretches or slows responses, and in some tests it also holds some of the
repository's signing keys (a thief with the online timestamp/snapshot keys).

For every attack the agent must (a) refuse with the right error family (UntrustedUpdate,
MetadataExpired or RepositoryUnreachable) and a message naming the file or role, (b) leave
the running slot A as it was (its flags and the bytes of its partitions), (c) never leave
slot B bootable, and (d) record the failure in the status file (`most_recent_command`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, MetaFile

from kiln.host.slot import Flags, Slots
from kiln.host.update.agent import Agent
from kiln.host.update.errors import MetadataExpired, RepositoryUnreachable, UntrustedUpdate, UpdateError
from kiln.host.update.fetch import HttpFetcher
from kiln.host.update.status import Status
from kiln.repo import admin, publish
from kiln.repo.metadata import Repo, serialize
from tests.controlled_repo import ControlledRepo, published
from tests.helpers import fake_release, small_disk
from tests.test_update_agent import decompressed, make_agent, read_partition

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("releases")
    return {v: fake_release(base / v, v, root_mib=4) for v in ("1.1.0", "2.0.0")}


@pytest.fixture(scope="module")
def pristine_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_disk(tmp_path_factory.mktemp("disk") / "disk.img")


@pytest.fixture
def disk(tmp_path: Path, pristine_disk: Path) -> Path:
    copy = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", pristine_disk, copy], check=True)
    return copy


@pytest.fixture
def repo(tmp_path: Path, releases: dict[str, Path]) -> Iterator[ControlledRepo]:
    with published(tmp_path / "repo", releases["1.1.0"]) as srv:
        yield srv


def digests(slots: Slots, slot: str) -> dict[str, str]:
    """sha256 of each of the slot's partitions, whole."""
    out = {}
    for key, region in slots.partitions(slot).items():
        with open(region.path, "rb") as f:
            f.seek(region.offset)
            out[key] = hashlib.sha256(f.read(region.size)).hexdigest()
    return out


@dataclass
class Guard:
    """What no attack may change: slot A's flags and bytes; and slot B never boots."""

    agent: Agent
    a_flags: Flags
    a_bytes: dict[str, str]

    @classmethod
    def take(cls, agent: Agent) -> Guard:
        return cls(agent, agent.slots.state().a, digests(agent.slots, "A"))

    def check(self) -> None:
        st = self.agent.slots.state()
        assert st.a == self.a_flags, "slot A's flags changed"
        assert digests(self.agent.slots, "A") == self.a_bytes, "slot A's partitions changed"
        assert not st.b.will_boot and st.b.tries_left == 0, f"slot B is left bootable: {st.b}"
        assert st.next_boot == "A"
        status = self.agent.status()
        assert status.staging_partition["version"] is None and status.staged_version is None
        assert status.update_state in ("Idle", "Available")

    def refused(self, command: str, error: type[UpdateError], *words: str) -> str:
        """`command` fails with exactly `error`, its message holding each of `words`; then
        the checks above, and the status file records the failure. Returns the message."""
        with pytest.raises(UpdateError) as info:
            self.agent.run(command)
        message = str(info.value)
        assert type(info.value) is error, f"{command}: {type(info.value).__name__}: {message}"
        for word in words:
            assert word in message, f"{command}: {word!r} not in {message!r}"
        self.check()
        cmd = Status.load(self.agent.paths.status).most_recent_command
        assert cmd is not None
        assert (cmd["cmd_type"], cmd["cmd_status"], cmd["exit_status"], cmd["error"]) == (
            command, "Failed", 1, error.__name__)
        assert cmd["stderr"] == message
        return message

    def refused_both(self, error: type[UpdateError], *words: str) -> None:
        """Both commands that read the repository (refresh, then prepare) are refused."""
        for command in ("refresh", "prepare"):
            self.refused(command, error, *words)
        assert self.agent.status().reason.startswith("cannot check for updates: ")


def ready(tmp_path: Path, disk: Path, srv: ControlledRepo) -> Guard:
    """The guard of an agent that has refreshed once against the honest repository (Available)."""
    agent = make_agent(tmp_path, disk, srv)
    assert agent.run("refresh").update_state == "Available"
    return Guard.take(agent)


# --- repository helpers: what the attacker can read, and sign with stolen keys --------------------


def meta(srv: ControlledRepo, name: str) -> bytes:
    return (srv.directory / "metadata" / name).read_bytes()


def version(srv: ControlledRepo, role: str) -> int:
    return int(Repo.open(srv.directory).role(role).signed.version)


def target_url(directory: Path, name: str) -> str:
    """The request path of target `name` (`/targets/<sha256>.<name>`)."""
    return "/targets/" + Repo.open(directory).target_path(name).name


def image_url(directory: Path, key: str, release: str = "1.1.0") -> tuple[str, str]:
    """(target name, request path) of a release's image."""
    repo = Repo.open(directory)
    update = next(u for u in publish.current_manifest(repo).updates if str(u.version) == release)
    name = update.images[key].target
    return name, target_url(directory, name)


def sign(directory: Path, md: Metadata[Any], role: str) -> bytes:
    """`md` signed with the repository's own keys for `role` (a thief holding them)."""
    repo = Repo.open(directory)
    md.signatures.clear()
    for signer in repo.keys.signers(list(repo.root.signed.roles[role].keyids)):
        md.sign(signer, append=True)
    return serialize(md)


class Expiring(Repo):
    """The repository's own commit, but with expiry times of the test's choosing."""

    expiry: dict[str, datetime]

    def _renew(self, md: Metadata[Any], role: str, now: datetime) -> None:
        super()._renew(md, role, now)
        if role in self.expiry:
            md.signed.expires = self.expiry[role]


def commit_expiring(directory: Path, roles: set[str], **expiry: datetime) -> None:
    """Re-sign `roles` (and the roles above them) as the repository does, with `expiry`."""
    repo = Expiring.open(directory)
    assert isinstance(repo, Expiring)
    repo.expiry = {role: when.replace(microsecond=0) for role, when in expiry.items()}
    repo.commit(roles)


# --- images: changed, stretched, cut ------------------------------------------------------------


def test_tampered_image_is_refused_after_streaming(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    """Same length, last byte flipped: only the sha256 at the end of the stream can tell."""
    guard = ready(tmp_path, disk, repo)
    name, url = image_url(repo.directory, "root")

    def flip(path: str, data: bytes | None) -> bytes:
        assert data
        return data[:-1] + bytes([data[-1] ^ 0xFF])

    repo.hooks[url] = flip
    guard.refused("prepare", UntrustedUpdate, f"target {name}: sha256", "does not match the signed")
    assert url in repo.requests


@pytest.mark.parametrize(("change", "words"), [
    (lambda d: d + b"\0" * 100, "sent more than the signed"),
    # A whole response (its Content-Length says so) of another length is another file, as
    # ngclient's length check says; a connection cut short is the next test.
    (lambda d: d[:-100], "bytes, not the signed"),
], ids=["longer", "shorter"])
def test_image_of_the_wrong_length(tmp_path: Path, disk: Path, repo: ControlledRepo,
                                   change: Callable[[bytes], bytes], words: str) -> None:
    guard = ready(tmp_path, disk, repo)
    name, url = image_url(repo.directory, "root")
    repo.hooks[url] = lambda path, data: change(data or b"")
    guard.refused("prepare", UntrustedUpdate, f"target {name}", words)


def test_image_cut_short_is_unreachable(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    """The connection closes before the Content-Length announced: the network's fault, retried."""
    guard = ready(tmp_path, disk, repo)
    name, url = image_url(repo.directory, "root")
    body = repo.read(url) or b""
    repo.raw[url] = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:-100]
    guard.refused("prepare", RepositoryUnreachable, name, f"connection closed after {len(body) - 100} bytes")


def test_endless_image_stops_at_the_signed_length(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    guard = ready(tmp_path, disk, repo)
    name, url = image_url(repo.directory, "root")
    signed = len(repo.read(url) or b"")
    repo.endless.add(url)
    guard.refused("prepare", UntrustedUpdate, f"target {name}", f"sent more than the signed {signed} bytes")
    assert stops_sending(repo, url) < 64 * MiB  # of the 4 GiB on offer: the proof, not a time


def stops_sending(srv: ControlledRepo, path: str) -> int:
    """Bytes the server sent on `path`, once every response to it ended (the client hung up).

    The refused download's generator, and with it its connection, stays open while the
    error's traceback holds its frame (a reference cycle): collecting it closes the
    connection, and the server's next write fails at once. 30 s only ends a hang (a client
    still reading) within the module's 60 s timeout."""
    gc.collect()
    for i, done in enumerate(srv.finished.get(path, [])):
        assert done.wait(30), f"{path}: the server is still sending response {i + 1} ({srv.sent.get(path, 0)} bytes)"
    return srv.sent.get(path, 0)


def test_slow_retrieval_of_an_image_hits_the_deadline(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    """A trickle (2 kB/s in 100-byte pieces, never idle long enough for the socket timeout):
    only HttpFetcher's overall deadline (grace + bytes / min_rate) stops it."""
    guard = ready(tmp_path, disk, repo)
    agent = guard.agent
    agent.fetcher = HttpFetcher(socket_timeout=2.0, min_rate=64 * 1024, grace=0.3)
    name, url = image_url(repo.directory, "root")
    repo.rates[url] = 2000
    # "too slow" is the deadline's own error: without it the trickle (pieces every 50 ms,
    # never idle for the 2 s socket timeout) would run to the end and the prepare succeed.
    guard.refused("prepare", RepositoryUnreachable, f"downloading {name}", name, "too slow")


def test_slow_retrieval_of_metadata_hits_the_deadline(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    guard = ready(tmp_path, disk, repo)
    agent = guard.agent
    agent.fetcher = HttpFetcher(socket_timeout=2.0, min_rate=64 * 1024, grace=0.3)
    repo.rates["/metadata/timestamp.json"] = 1000
    guard.refused_both(RepositoryUnreachable, "timestamp.json", "too slow")  # the deadline's error, as above


# --- releases the manifest lies about (validly signed: the publisher's artifacts were bad) -------


def lying_release(src: Path, dest: Path, edit: Callable[[dict[str, Any], Path], None]) -> Path:
    """A copy of the artifacts directory `src` whose build manifest `edit` changes (`kiln repo
    add` checks the compressed files against it, and trusts its uncompressed sizes/hashes)."""
    shutil.copytree(src, dest)
    doc = json.loads((dest / "manifest.json").read_text())
    edit(doc, dest)
    (dest / "manifest.json").write_text(json.dumps(doc, indent=2))
    return dest


def zstd_bomb(doc: dict[str, Any], dest: Path) -> None:
    """The root image becomes 256 MiB of zeros (a few kB compressed); the manifest still
    says 4 MiB."""
    entry = doc["images"]["root"]
    file = dest / entry["file"]
    subprocess.run(f"head -c {256 * MiB} /dev/zero | zstd -q -1 -c > {file}", shell=True, check=True)
    data = file.read_bytes()
    assert len(data) < 64 * 1024
    entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()


def test_zstd_bomb_stops_at_the_signed_size(tmp_path: Path, disk: Path, repo: ControlledRepo,
                                            releases: dict[str, Path]) -> None:
    bomb = lying_release(releases["1.1.0"], tmp_path / "bomb", zstd_bomb)
    publish.add(repo.directory, bomb, waves="none")
    guard = ready(tmp_path, disk, repo)
    agent = guard.agent
    name, _ = image_url(repo.directory, "root")
    guard.refused("prepare", UntrustedUpdate, name, f"decompresses to more than the signed {4 * MiB} bytes")
    region = agent.slots.partitions("B")["root"]  # the proof: nothing written past the signed size
    assert region.read(4 * MiB, region.size - 4 * MiB) == bytes(region.size - 4 * MiB), \
        "the writer went past the signed size"


def test_image_that_does_not_match_its_signed_hash(tmp_path: Path, disk: Path, repo: ControlledRepo,
                                                   releases: dict[str, Path]) -> None:
    def wrong_digest(doc: dict[str, Any], dest: Path) -> None:
        doc["images"]["boot"]["uncompressed_sha256"] = hashlib.sha256(b"another boot image").hexdigest()

    publish.add(repo.directory, lying_release(releases["1.1.0"], tmp_path / "lie", wrong_digest), waves="none")
    guard = ready(tmp_path, disk, repo)
    name, _ = image_url(repo.directory, "boot")
    guard.refused("prepare", UntrustedUpdate, f"{name}: wrote 65536 bytes", "the manifest signs 65536 bytes")


def test_root_image_that_does_not_match_its_verity_root_hash(tmp_path: Path, disk: Path, repo: ControlledRepo,
                                                             releases: dict[str, Path]) -> None:
    """Every image is written with its signed length (boot and hash with their signed sha256;
    root's content check is this one), but the signed root hash is another: refused when
    the slot is read back as dm-verity will, before mark-inactive-valid."""
    def wrong_root_hash(doc: dict[str, Any], dest: Path) -> None:
        doc["verity"]["root_hash"] = hashlib.sha256(b"another root").hexdigest()

    publish.add(repo.directory, lying_release(releases["1.1.0"], tmp_path / "lie", wrong_root_hash), waves="none")
    guard = ready(tmp_path, disk, repo)
    agent = guard.agent
    guard.refused("prepare", UpdateError, "slot B does not verify after writing")
    want = decompressed(releases["1.1.0"], "root")
    assert read_partition(disk, agent.slots, "B", "root", len(want)) == want  # written, then refused


# --- metadata: tampered, expired, replayed, frozen, mixed, foreign ------------------------------


def test_tampered_manifest(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    guard = ready(tmp_path, disk, repo)
    agent = guard.agent
    url = target_url(repo.directory, "manifest.json")
    repo.hooks[url] = lambda path, data: (data or b"").replace(b'"1.1.0"', b'"9.9.9"')
    assert repo.hooks[url](url, repo.read(url)) != repo.read(url)
    guard.refused_both(UntrustedUpdate, "target manifest.json: sha256", "does not match the signed")
    assert agent.status().chosen_update == {"variant": "container-host", "arch": "amd64", "version": "1.1.0"}


@pytest.mark.parametrize(("role", "words"), [
    ("timestamp", "timestamp.json is expired"),
    ("snapshot", "snapshot.json is expired"),
    ("targets", "New targets is expired"),
    ("root", "Final root.json is expired"),
])
def test_expired_metadata(tmp_path: Path, disk: Path, repo: ControlledRepo, role: str, words: str) -> None:
    """The repository itself signs `role` with an expiry in the past (a new version, validly
    signed: only its date is wrong); the roles above it are fresh."""
    guard = ready(tmp_path, disk, repo)
    commit_expiring(repo.directory, {role}, **{role: datetime.now(UTC) - timedelta(hours=1)})
    guard.refused_both(MetadataExpired, words)


def rolled_back(srv: ControlledRepo, agent: Agent, releases: dict[str, Path]) -> dict[str, bytes]:
    """The client sees version 2 of timestamp/snapshot/targets, then version 3 (2.0.0 is
    published), then the repository moves on to 4. Returns the version 2 files (what a
    mirror could have kept to replay)."""
    old = {role: meta(srv, f"{role}.json" if role == "timestamp" else f"2.{role}.json")
           for role in ("timestamp", "snapshot", "targets")}
    assert {version(srv, r) for r in old} == {2}
    publish.add(srv.directory, releases["2.0.0"], waves="none")
    assert agent.run("refresh").chosen_update == {"variant": "container-host", "arch": "amd64", "version": "2.0.0"}
    publish.set_waves(srv.directory, "2.0.0", "none")
    assert {version(srv, r) for r in old} == {4}
    return old


def replay(role: str) -> Callable[[ControlledRepo, dict[str, bytes]], tuple[str, ...]]:
    """The mirror answers the request for the newest `role` with the saved version 2."""
    def attack(srv: ControlledRepo, old: dict[str, bytes]) -> tuple[str, ...]:
        path = "/metadata/timestamp.json" if role == "timestamp" else f"/metadata/4.{role}.json"
        srv.hooks[path] = lambda p, d: old[role]
        if role == "timestamp":
            return "timestamp.json", "New timestamp version 2 must be >= 3"
        return (f"4.{role}.json",)  # pinned by the length and hash one level up
    return attack


def stolen_timestamp_key(srv: ControlledRepo, old: dict[str, bytes]) -> tuple[str, ...]:
    """A new timestamp, validly signed, pointing back at snapshot version 2."""
    ts = Metadata.from_bytes(meta(srv, "timestamp.json"))
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile.from_data(2, old["snapshot"], ["sha256"])
    forged = sign(srv.directory, ts, "timestamp")
    srv.hooks["/metadata/timestamp.json"] = lambda p, d: forged
    return "timestamp.json", "New snapshot version must be >= 3, got version 2"


def stolen_snapshot_and_timestamp_keys(srv: ControlledRepo, old: dict[str, bytes]) -> tuple[str, ...]:
    """A new snapshot listing targets version 2, and a new timestamp for it."""
    sn = Metadata.from_bytes(meta(srv, "4.snapshot.json"))
    sn.signed.version = 5
    sn.signed.meta["targets.json"] = MetaFile.from_data(2, old["targets"], ["sha256"])
    snapshot = sign(srv.directory, sn, "snapshot")
    ts = Metadata.from_bytes(meta(srv, "timestamp.json"))
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile.from_data(5, snapshot, ["sha256"])
    timestamp = sign(srv.directory, ts, "timestamp")
    srv.hooks["/metadata/5.snapshot.json"] = lambda p, d: snapshot
    srv.hooks["/metadata/timestamp.json"] = lambda p, d: timestamp
    return "5.snapshot.json", "Expected targets.json version 2, got 3"


@pytest.mark.parametrize(("attack", "stolen"), [
    pytest.param(replay("timestamp"), (), id="timestamp"),
    pytest.param(replay("snapshot"), (), id="snapshot"),
    pytest.param(replay("targets"), (), id="targets"),
    pytest.param(stolen_timestamp_key, ("timestamp",), id="snapshot-by-timestamp-key"),
    pytest.param(stolen_snapshot_and_timestamp_keys, ("snapshot", "timestamp"), id="targets-by-snapshot-key"),
])
def test_rollback(tmp_path: Path, disk: Path, repo: ControlledRepo, releases: dict[str, Path],
                  attack: Callable[[ControlledRepo, dict[str, bytes]], tuple[str, ...]],
                  stolen: tuple[str, ...]) -> None:
    """The client has seen version 3 of every role; the mirror serves version 2 (validly
    signed, saved earlier), or a thief with online keys signs new metadata pointing back at
    it. Once the mirror is honest again (and stolen keys are rotated: a forged timestamp
    the client accepted has a version the real one must first exceed), the client recovers."""
    guard = ready(tmp_path, disk, repo)
    agent = guard.agent
    old = rolled_back(repo, agent, releases)
    words = attack(repo, old)
    guard.refused_both(UntrustedUpdate, *words)
    repo.hooks.clear()
    for role in stolen:
        admin.rotate_key(repo.directory, role)
    assert agent.run("refresh").chosen_update == {"variant": "container-host", "arch": "amd64", "version": "2.0.0"}


def test_freeze(tmp_path: Path, disk: Path, repo: ControlledRepo, releases: dict[str, Path]) -> None:
    """Freeze: after 2.0.0 is published, the mirror keeps serving the timestamp from before
    (unexpired, validly signed; every older file it points at is still there). The client
    cannot tell a frozen repository from a quiet one, so it simply sees no new update.
    TUF's defence is the timestamp's short expiry (7 days by default, renewed by `kiln repo
    refresh` from cron): once the replayed timestamp expires, the agent refuses with
    MetadataExpired. Here the frozen timestamp expires 6 s after it is signed.

    The frozen timestamp is signed in a copy of the repository taken before 2.0.0 (same
    keys, same files), right before the refresh that must see it unexpired: the 6 s cover
    that one refresh (~0.2 s idle), not the publishing. The real repository renews its
    timestamp after publishing (as cron would), so the honest one outranks the frozen one."""
    guard = ready(tmp_path, disk, repo)
    agent = guard.agent
    before = tmp_path / "repo-before-2.0.0"
    shutil.copytree(repo.directory, before)
    publish.add(repo.directory, releases["2.0.0"], waves="none")
    commit_expiring(repo.directory, {"timestamp"})  # the renewal
    expires = (datetime.now(UTC) + timedelta(seconds=6)).replace(microsecond=0)
    commit_expiring(before, {"timestamp"}, timestamp=expires)
    frozen = (before / "metadata" / "timestamp.json").read_bytes()
    repo.hooks["/metadata/timestamp.json"] = lambda p, d: frozen

    st = agent.run("refresh")
    assert datetime.now(UTC) < expires, "too slow to see the freeze before the expiry"
    assert (st.update_state, st.available_updates) == ("Available", ["1.1.0"])
    assert st.chosen_update == {"variant": "container-host", "arch": "amd64", "version": "1.1.0"}
    guard.check()

    while datetime.now(UTC) < expires + timedelta(milliseconds=100):  # wait for the expiry itself
        time.sleep(0.1)
    guard.refused_both(MetadataExpired, "timestamp.json is expired")

    repo.hooks.clear()  # the freeze ends: the real, fresh timestamp shows 2.0.0
    assert agent.run("refresh").available_updates == ["2.0.0", "1.1.0"]


@pytest.mark.parametrize("direction", ["new-snapshot-old-targets", "old-snapshot-new-targets"])
def test_mix_and_match(tmp_path: Path, disk: Path, repo: ControlledRepo, releases: dict[str, Path],
                       direction: str) -> None:
    """Snapshot from one repository state, targets from another, to a client that has
    forgotten everything (so no rollback check can help): the snapshot's hash pins them."""
    guard = ready(tmp_path, disk, repo)
    agent = guard.agent
    old = {name: meta(repo, name) for name in ("timestamp.json", "2.targets.json")}
    publish.add(repo.directory, releases["2.0.0"], waves="none")
    shutil.rmtree(agent.paths.metadata)
    if direction == "new-snapshot-old-targets":
        repo.hooks["/metadata/3.targets.json"] = lambda p, d: old["2.targets.json"]
        words = ("3.targets.json",)
    else:
        repo.hooks["/metadata/timestamp.json"] = lambda p, d: old["timestamp.json"]
        new_targets = meta(repo, "3.targets.json")
        repo.hooks["/metadata/2.targets.json"] = lambda p, d: new_targets
        words = ("2.targets.json",)
    guard.refused_both(UntrustedUpdate, *words)


@pytest.fixture
def foreign(tmp_path: Path, releases: dict[str, Path]) -> Path:
    """Another repository (other keys) publishing the same release."""
    d = tmp_path / "foreign"
    admin.init(d)
    publish.add(d, releases["1.1.0"], waves="none")
    return d


def test_foreign_timestamp(tmp_path: Path, disk: Path, repo: ControlledRepo, foreign: Path) -> None:
    guard = ready(tmp_path, disk, repo)
    data = (foreign / "metadata" / "timestamp.json").read_bytes()
    repo.hooks["/metadata/timestamp.json"] = lambda p, d: data
    guard.refused_both(UntrustedUpdate, "timestamp.json", "timestamp was signed by 0/1 keys")


def test_foreign_targets_even_with_stolen_snapshot_and_timestamp_keys(
        tmp_path: Path, disk: Path, repo: ControlledRepo, foreign: Path) -> None:
    """The thief lists another repository's targets (signed by its own targets key) in a
    snapshot and timestamp signed with the real keys: the targets key is still missing."""
    guard = ready(tmp_path, disk, repo)
    targets = (foreign / "metadata" / "2.targets.json").read_bytes()
    sn = Metadata.from_bytes(meta(repo, "2.snapshot.json"))
    sn.signed.version = 3
    sn.signed.meta["targets.json"] = MetaFile.from_data(3, targets, ["sha256"])
    snapshot = sign(repo.directory, sn, "snapshot")
    ts = Metadata.from_bytes(meta(repo, "timestamp.json"))
    ts.signed.version = 3
    ts.signed.snapshot_meta = MetaFile.from_data(3, snapshot, ["sha256"])
    timestamp = sign(repo.directory, ts, "timestamp")
    repo.hooks.update({
        "/metadata/timestamp.json": lambda p, d: timestamp,
        "/metadata/3.snapshot.json": lambda p, d: snapshot,
        "/metadata/3.targets.json": lambda p, d: targets,
    })
    guard.refused_both(UntrustedUpdate, "3.targets.json", "targets was signed by 0/1 keys")


def test_root_not_chained_to_the_embedded_one(tmp_path: Path, disk: Path, repo: ControlledRepo,
                                              foreign: Path) -> None:
    """A version 2 root signed by another repository's root keys (a valid rotation there)."""
    admin.rotate_key(foreign, "root")
    data = (foreign / "metadata" / "2.root.json").read_bytes()
    guard = ready(tmp_path, disk, repo)
    repo.hooks["/metadata/2.root.json"] = lambda p, d: data
    guard.refused_both(UntrustedUpdate, "2.root.json", "root was signed by 0/1 keys")


def test_endless_timestamp_stops_at_the_maximum_length(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    """timestamp.json's length is signed nowhere: python-tuf bounds it (16 KiB)."""
    guard = ready(tmp_path, disk, repo)
    path = "/metadata/timestamp.json"
    repo.endless.add(path)
    guard.refused_both(UntrustedUpdate, "timestamp.json", "exceeding the maximum allowed length of 16384")
    assert stops_sending(repo, path) < 64 * MiB


# --- malformed HTTP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"{" * 100,  # cut inside a chunk
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # not a chunk size
    b"SPDY/9 999 What\r\n\r\n",  # not HTTP
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    b"",  # the connection closed at once
], ids=["chunk-cut", "bad-chunk-size", "bad-status-line", "503", "closed"])
def test_broken_http_is_unreachable(tmp_path: Path, disk: Path, repo: ControlledRepo, raw: bytes) -> None:
    """A broken or cut response is the network's fault (retry later): RepositoryUnreachable,
    never a stray http.client exception."""
    guard = ready(tmp_path, disk, repo)
    repo.raw["/metadata/timestamp.json"] = raw
    guard.refused_both(RepositoryUnreachable, "timestamp.json")


def test_broken_http_for_an_image_is_unreachable(tmp_path: Path, disk: Path, repo: ControlledRepo) -> None:
    guard = ready(tmp_path, disk, repo)
    name, url = image_url(repo.directory, "root")
    body = repo.read(url) or b""
    repo.raw[url] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % (2 * len(body)) + body
    guard.refused("prepare", RepositoryUnreachable, name, "IncompleteRead")
