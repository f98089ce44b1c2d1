"""The TUF client downloads every target the way the specification says (5.7.3), not only
the plain-named, sha256-signed ones Kiln's own publisher makes.

Each test builds a repository with python-tuf's Metadata API (not `kiln repo`): targets in
subdirectories, held by delegated roles two levels deep, signed with sha512 only or with
several hashes, with `consistent_snapshot` on or off. It is served over HTTP on 127.0.0.1
by `ControlledRepo`, which stores each target only where that flag says it belongs, so a
client that guesses the URL gets a 404.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from kiln.host.update.errors import RepositoryUnreachable, UntrustedUpdate
from kiln.host.update.fetch import HttpFetcher
from kiln.host.update.trust import Source, TrustedRepo, check_bytes, offline_targets, target_url
from kiln.repo.metadata import serialize
from tests.controlled_repo import ControlledRepo

pytestmark = pytest.mark.timeout(60)

X86 = "images/x86_64/kiln-2.0.0.img"  # in role "images" (paths images/*/*)
ARM = "images/aarch64/kiln-2.0.0.img"  # in role "arm", which "images" delegates images/aarch64/* to
NOTES = "notes/2.0.0/changes.txt"  # in the top-level targets, sha256 and sha512
PLAIN = "sha512-only.bin"  # a plain name in the top-level targets, sha512 only
CONTENT = {
    X86: b"x86 image " * 5000,
    ARM: b"arm image " * 3000,
    NOTES: b"what changed\n",
    PLAIN: b"\x00\x01 sha512 only" * 100,
}
ALGOS = {X86: ["sha512"], ARM: ["sha512"], NOTES: ["sha256", "sha512"], PLAIN: ["sha512"]}


def hashes(data: bytes, algos: list[str]) -> dict[str, str]:
    return {a: hashlib.new(a, data).hexdigest() for a in algos}


@dataclass
class Built:
    """A python-tuf repository on disk: its trusted root, and where each target was put."""

    directory: Path
    root: bytes
    stored: dict[str, str] = field(default_factory=dict)  # target path -> request path it is served at


def build(directory: Path, *, consistent: bool, entries: dict[str, dict[str, str]] | None = None,
          rotate_to: bool | None = None) -> Built:
    """Write the repository: root (v1, and v2 with `consistent_snapshot=rotate_to` when given),
    targets -> images -> arm, snapshot, timestamp. `entries` overrides the signed hashes
    of targets (to sign something the bytes do not match)."""
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    keys = {r: CryptoSigner.generate_ed25519() for r in ("root", "targets", "snapshot", "timestamp", "images", "arm")}
    root = Root(expires=expires, consistent_snapshot=consistent)
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(keys[role].public_key, role)
    infos = {p: TargetFile(len(d), hashes(d, ALGOS[p]), p) for p, d in CONTENT.items()}
    for p, h in (entries or {}).items():
        infos[p] = TargetFile(len(CONTENT[p]), h, p)

    def delegate(name: str, paths: list[str]) -> Delegations:
        key = keys[name].public_key
        return Delegations({key.keyid: key}, roles={name: DelegatedRole(name, [key.keyid], 1, False, paths)})

    roles: dict[str, Any] = {
        "targets": Targets(expires=expires, targets={p: infos[p] for p in (NOTES, PLAIN)},
                           delegations=delegate("images", ["images/*/*"])),
        "images": Targets(expires=expires, targets={X86: infos[X86]},
                          delegations=delegate("arm", ["images/aarch64/*"])),
        "arm": Targets(expires=expires, targets={ARM: infos[ARM]}),
    }
    md_dir, tg_dir = directory / "metadata", directory / "targets"
    md_dir.mkdir(parents=True)

    def write(name: str, md: Metadata[Any], signer: CryptoSigner, version: int = 1) -> bytes:
        md.sign(signer)
        data = serialize(md)
        (md_dir / f"{version}.{name}.json").write_bytes(data)
        (md_dir / f"{name}.json").write_bytes(data)
        return data

    root_bytes = write("root", Metadata(root), keys["root"])
    if rotate_to is not None:
        root.version, root.consistent_snapshot = 2, rotate_to
        write("root", Metadata(root), keys["root"], version=2)
    meta = {f"{n}.json": MetaFile(1) for n in roles}
    for name, signed in roles.items():
        write(name, Metadata(signed), keys[name])
    write("snapshot", Metadata(Snapshot(expires=expires, meta=meta)), keys["snapshot"])
    write("timestamp", Metadata(Timestamp(expires=expires, snapshot_meta=MetaFile(1))), keys["timestamp"])
    built = Built(directory, root_bytes)
    stored_consistent = consistent if rotate_to is None else rotate_to
    for path, data in CONTENT.items():
        *dirs, name = path.split("/")
        if stored_consistent:  # the first hash listed; serialize() sorts the keys
            name = f"{sorted(infos[path].hashes.items())[0][1]}.{name}"
        f = tg_dir.joinpath(*dirs, name)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        built.stored[path] = "/" + f.relative_to(directory).as_posix()
    return built


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    servers: list[ControlledRepo] = []

    def start(built: Built) -> tuple[ControlledRepo, TrustedRepo]:
        srv = ControlledRepo(built.directory).__enter__()
        servers.append(srv)
        source = Source(f"{srv.url}/metadata/", f"{srv.url}/targets/", built.root)
        return srv, TrustedRepo(source, tmp_path / f"cache{len(servers)}", HttpFetcher())

    yield start
    for srv in servers:
        srv.__exit__(None, None, None)


def download(repo: TrustedRepo, name: str) -> bytes:
    return b"".join(repo.stream(name))


# --- every kind of target downloads and verifies ---------------------------------------------------


@pytest.mark.parametrize("consistent", [True, False], ids=["consistent", "plain"])
@pytest.mark.parametrize("name", [X86, ARM, NOTES, PLAIN])
def test_targets_in_subdirectories_delegated_and_sha512_only(tmp_path: Path, serve: Any, consistent: bool,
                                                             name: str) -> None:
    """Defects reproduced (before the fix): `dir/x` was fetched from `HASH.dir/x` (404:
    RepositoryUnreachable), and a target without sha256 was refused ("has no sha256")."""
    built = build(tmp_path / "repo", consistent=consistent)
    srv, repo = serve(built)
    assert download(repo, name) == CONTENT[name]
    assert srv.requests[-1] == built.stored[name]
    assert ("/" in name) == ("/" in built.stored[name].removeprefix("/targets/"))


def test_the_flag_is_read_from_the_newest_trusted_root(tmp_path: Path, serve: Any) -> None:
    """Root v1 says plain paths, the v2 it rotates to says consistent snapshots: v2 wins."""
    built = build(tmp_path / "repo", consistent=False, rotate_to=True)
    srv, repo = serve(built)
    assert download(repo, X86) == CONTENT[X86]
    assert srv.requests[-1] == built.stored[X86]
    assert built.stored[X86].endswith(f"/{hashlib.sha512(CONTENT[X86]).hexdigest()}.kiln-2.0.0.img")


def test_every_listed_hash_is_checked(tmp_path: Path, serve: Any) -> None:
    """sha256 right, sha512 wrong: checking only one of them would accept the bytes."""
    good = hashes(CONTENT[NOTES], ["sha256"])
    built = build(tmp_path / "repo", consistent=False, entries={NOTES: {**good, "sha512": "ab" * 64}})
    _, repo = serve(built)
    with pytest.raises(UntrustedUpdate, match=f"target {NOTES}: sha512 .* does not match the signed abab"):
        download(repo, NOTES)


@pytest.mark.parametrize("signed", [
    {"md5": hashlib.md5(CONTENT[PLAIN]).hexdigest()},
    {"sha1": hashlib.sha1(CONTENT[PLAIN]).hexdigest()},
    {"blake3": "00" * 32},
    {"shake_128": "00" * 16},
], ids=["md5", "sha1", "unknown", "shake"])
def test_target_without_a_strong_hash_is_refused(tmp_path: Path, serve: Any, signed: dict[str, str]) -> None:
    built = build(tmp_path / "repo", consistent=False, entries={PLAIN: signed})
    srv, repo = serve(built)
    with pytest.raises(UntrustedUpdate, match=f"target {PLAIN} lists no hash Kiln can verify"):
        download(repo, PLAIN)
    assert not any(r.startswith("/targets/") for r in srv.requests), "refused before downloading"


def test_unknown_algorithm_beside_a_strong_one_is_ignored(tmp_path: Path, serve: Any) -> None:
    """blake3 is listed first, so (as with ngclient) its value names the file; sha512 vouches."""
    entry = {**hashes(CONTENT[PLAIN], ["sha512"]), "blake3": "00" * 32}
    built = build(tmp_path / "repo", consistent=True, entries={PLAIN: entry})
    _, repo = serve(built)
    assert download(repo, PLAIN) == CONTENT[PLAIN]


# --- a mirror that lies about a delegated target ------------------------------------------------------


def flip(path: str, data: bytes | None) -> bytes:
    assert data
    return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest.mark.parametrize("consistent", [True, False], ids=["consistent", "plain"])
@pytest.mark.parametrize(("hook", "words"), [
    (flip, "sha512 .* does not match the signed"),
    (lambda p, d: (d or b"") + b"\0" * 10, "the server sent more than the signed 30000 bytes"),
    (lambda p, d: (d or b"")[:-10], "the server sent 29990 bytes, not the signed 30000"),
    (lambda p, d: None, None),  # 404: not a lie, the network's (or the mirror's) fault
], ids=["bytes", "longer", "shorter", "missing"])
def test_tampered_delegated_target_is_refused(tmp_path: Path, serve: Any, consistent: bool,
                                              hook: Any, words: str | None) -> None:
    built = build(tmp_path / "repo", consistent=consistent)
    srv, repo = serve(built)
    srv.hooks[built.stored[ARM]] = hook
    error = UntrustedUpdate if words else RepositoryUnreachable
    with pytest.raises(error, match=f"{ARM}: {words or '.*HTTP 404'}") as info:
        download(repo, ARM)
    assert type(info.value) is error


def test_a_cut_connection_is_unreachable(tmp_path: Path, serve: Any) -> None:
    """A body that ends before its Content-Length is a network failure (retry later), not a
    lie: only a whole response of the wrong length is."""
    built = build(tmp_path / "repo", consistent=True)
    srv, repo = serve(built)
    data = CONTENT[ARM]
    srv.raw[built.stored[ARM]] = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data[:-10]
    with pytest.raises(RepositoryUnreachable, match="connection closed after 29990 bytes, 10 before the end"):
        download(repo, ARM)


# --- the offline check at boot (cached migrations) resolves delegations too ---------------------------


def test_offline_check_of_a_delegated_target(tmp_path: Path, serve: Any) -> None:
    built = build(tmp_path / "repo", consistent=True)
    _, repo = serve(built)
    assert download(repo, ARM) == CONTENT[ARM]
    repo.snapshot_metadata(tmp_path / "copy")
    targets = offline_targets(built.root, tmp_path / "copy", time.time())
    for name in (ARM, PLAIN):
        check_bytes(targets, name, CONTENT[name])
    with pytest.raises(UntrustedUpdate, match="does not match its signed length/hash: sha512"):
        check_bytes(targets, ARM, flip("", CONTENT[ARM]))
    with pytest.raises(UntrustedUpdate, match="not in the signed targets"):
        check_bytes(targets, "images/aarch64/other.img", b"")
    (tmp_path / "copy" / "images.json").unlink()  # ngclient's cache of the delegated role
    with pytest.raises(UntrustedUpdate, match="cached metadata incomplete"):
        check_bytes(offline_targets(built.root, tmp_path / "copy", time.time()), ARM, CONTENT[ARM])


# --- URLs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "consistent", "url"), [
    ("a/b/c.img", True, "http://h/t/a/b/H.c.img"),
    ("a/b/c.img", False, "http://h/t/a/b/c.img"),
    ("kiln-1.0.0+x86.root.zst", True, "http://h/t/H.kiln-1.0.0+x86.root.zst"),  # as ngclient: unescaped
    ("dir with space/x?y#z%", False, "http://h/t/dir%20with%20space/x%3Fy%23z%25"),
])
def test_target_url(path: str, consistent: bool, url: str) -> None:
    info = TargetFile(1, {"sha512": "H", "sha256": "other"}, path)
    assert target_url("http://h/t/", info, consistent_snapshot=consistent) == url


@pytest.mark.parametrize("path", ["../metadata/root.json", "a/../../x", "a//b", "/abs", "a/./b", "dir/"])
def test_target_path_leaving_the_targets_directory_is_refused(path: str) -> None:
    info = TargetFile(1, {"sha512": "H"}, path)
    with pytest.raises(UntrustedUpdate, match="not a relative path inside the targets directory"):
        target_url("http://h/t", info, consistent_snapshot=False)


def test_hash_prefix_is_one_path_segment() -> None:
    info = TargetFile(1, {"sha512": "../../metadata/x"}, "a/b")
    segment = quote("../../metadata/x", safe="")
    assert target_url("http://h/t", info, consistent_snapshot=True) == f"http://h/t/a/{segment}.b"
