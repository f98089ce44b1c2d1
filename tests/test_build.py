"""`kiln build` end to end: the disk layout, slot A's verity-protected root, the update
artifacts and their manifest, the initial grubenv, reproducibility, and failed builds that
leave nothing behind. Checked with sgdisk, sfdisk, fsck.erofs, veritysetup, mcopy,
grub-editenv and fsck.vfat.

Builds: the session's `images` build is shared with the other test files; this file adds
at most two complete builds (one through the CLI with --json, one through
`kiln.build.pipeline.build` for the reproducibility check) and a few that fail early.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.build.pipeline import BuildOptions, BuildResult, build, source_date_epoch
from kiln.core.errors import KilnError
from kiln.core.progress import Progress
from kiln.image.verity import VerityResult, dm_table
from kiln.variant import MiB, Variant, load_variant
from tests.conftest import UpdateRepo

KILN = Path(sys.executable).with_name("kiln")
NAMES = [
    "KILN-EFI", "KILN-BOOT-A", "KILN-ROOT-A", "KILN-HASH-A", "KILN-BOOT-B", "KILN-ROOT-B",
    "KILN-HASH-B", "KILN-PRIVATE", "KILN-DATA",
]
TOOL_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}
LEFTOVER_PATTERNS = (".kiln-build-*", "*.partial-*", "*.old-*")


# --- helpers --------------------------------------------------------------------------------

def run(
    *argv: str | Path, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=check, env=TOOL_ENV, cwd=cwd
    )


def partitions(disk: Path) -> list[dict[str, Any]]:
    table = json.loads(run("sfdisk", "--json", disk).stdout)["partitiontable"]
    assert table["label"] == "gpt" and table["sectorsize"] == 512
    parts: list[dict[str, Any]] = table["partitions"]
    return parts


def region(disk: Path, name: str) -> tuple[int, int]:
    for p in partitions(disk):
        if p["name"] == name:
            return p["start"] * 512, p["size"] * 512
    raise AssertionError(f"{name} not on {disk}")


def chunks_of(disk: Path, name: str, length: int | None = None) -> Iterator[bytes]:
    offset, size = region(disk, name)
    left = size if length is None else length
    with open(disk, "rb") as f:
        f.seek(offset)
        while left:
            chunk = f.read(min(MiB, left))
            assert chunk
            left -= len(chunk)
            yield chunk


def extract(disk: Path, name: str, dest: Path) -> Path:
    with open(dest, "wb") as out:
        for chunk in chunks_of(disk, name):
            out.write(chunk)
    return dest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def sha256_region(disk: Path, name: str, length: int | None = None) -> str:
    h = hashlib.sha256()
    for chunk in chunks_of(disk, name, length):
        h.update(chunk)
    return h.hexdigest()


def zstd_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with subprocess.Popen(["zstd", "-dc", str(path)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(MiB):
            h.update(chunk)
            size += len(chunk)
    assert proc.returncode == 0
    return size, h.hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for pattern in LEFTOVER_PATTERNS for p in directory.glob(pattern))


def snapshot(directory: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under `directory`: mode, size, mtime_ns and content digest."""
    out: dict[str, tuple[int, int, int, str]] = {}
    for p in sorted(directory.rglob("*")):
        st = p.lstat()
        digest = sha256_file(p) if stat.S_ISREG(st.st_mode) else ""
        out[str(p.relative_to(directory))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    st = directory.lstat()
    out["."] = (st.st_mode, 0, st.st_mtime_ns, "")
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """Path -> type, owner, mode, mtime and content (or link target) of an extracted tree."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = sha256_file(p)
            else:
                what = ""
            out[str(p.relative_to(root))] = (
                f"{st.st_mode:o} {st.st_uid}:{st.st_gid} {st.st_mtime_ns} {what}"
            )
    return out


def explain_difference(a: Path, b: Path, work: Path) -> str:
    """Which partitions of two disk images differ, and for the erofs root which files."""
    lines = []
    for name in NAMES:
        if sha256_region(a, name) != sha256_region(b, name):
            lines.append(f"partition {name} differs")
            if name.startswith("KILN-ROOT"):
                trees = []
                for i, disk in enumerate((a, b)):
                    img = extract(disk, name, work / f"root{i}.img")
                    dest = work / f"root{i}"
                    res = run("fsck.erofs", f"--extract={dest}", img, check=False)
                    lines.append(f"  fsck.erofs --extract: exit {res.returncode}")
                    trees.append(tree_digest(dest))
                diff = sorted(k for k in trees[0].keys() | trees[1].keys()
                              if trees[0].get(k) != trees[1].get(k))
                lines += [f"  {k}: {trees[0].get(k)} != {trees[1].get(k)}" for k in diff[:30]]
                if not diff:
                    lines.append("  (same files, metadata and contents: the erofs layout differs)")
            if name in ("KILN-EFI", "KILN-BOOT-A"):
                listings = []
                for i, disk in enumerate((a, b)):
                    img = extract(disk, name, work / f"fat{i}.img")
                    dest = work / f"fat{i}"
                    dest.mkdir()
                    run("mcopy", "-s", "-n", "-m", "-i", img, "::/", dest)
                    listings.append(tree_digest(dest))
                diff = sorted(k for k in listings[0].keys() | listings[1].keys()
                              if listings[0].get(k) != listings[1].get(k))
                lines += [f"  {k}: {listings[0].get(k)} != {listings[1].get(k)}" for k in diff]
    return "\n".join(lines) or "all partitions are identical (the difference is outside them)"


def output_digests(result_dir: Path) -> dict[str, str]:
    """sha256 of disk.img and every artifact; build.json with its own paths neutralised."""
    out = {"disk.img": sha256_file(result_dir / "disk.img")}
    for p in sorted((result_dir / "artifacts").iterdir()):
        out[f"artifacts/{p.name}"] = sha256_file(p)
    build_json = (result_dir / "build.json").read_text().replace(str(result_dir), "<output>")
    out["build.json"] = hashlib.sha256(build_json.encode()).hexdigest()
    return out


def manifest_of(result: BuildResult) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(result.manifest.read_text())
    return data


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory: pytest.TempPathFactory, update_repo: UpdateRepo) -> tuple[Path, dict[str, Any]]:
    """Extra build #1: `kiln build --json`, run as a user would (trusting the session's
    update repository, as the session's images do)."""
    base = tmp_path_factory.mktemp("cli-build")
    out = base / "out"
    res = run(KILN, "build", "--json", "--output", out, "--update-repo", update_repo.path,
              "--update-url", update_repo.guest_url, check=False, cwd=base)
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return out, data


@pytest.fixture(scope="module")
def second_build(tmp_path_factory: pytest.TempPathFactory, update_repo: UpdateRepo) -> BuildResult:
    """Extra build #2: the same inputs as `built`, into another directory."""
    out = tmp_path_factory.mktemp("second-build") / "elsewhere" / "container-host"
    variant = load_variant().with_version("1.0.0")
    opts = BuildOptions(variant, out, debug_console=False, sde=source_date_epoch(),
                        update_root=update_repo.path, update_url=update_repo.guest_url)
    return build(opts, Progress(quiet=True))


@pytest.fixture(scope="module")
def default_variant() -> Variant:
    return load_variant()


# --- the disk ---------------------------------------------------------------------------------

def test_sgdisk_verify(built: BuildResult) -> None:
    res = run("sgdisk", "-v", built.disk, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No problems found" in res.stdout


def test_partition_table(built: BuildResult, default_variant: Variant) -> None:
    parts = partitions(built.disk)
    assert [p["name"] for p in parts] == NAMES
    assert parts[0]["type"].lower() == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"  # an ESP
    sizes = dataclasses.asdict(default_variant.partitions)
    for p in parts:
        assert p["start"] % 2048 == 0, p  # 1 MiB aligned
        key = p["name"].removeprefix("KILN-").split("-")[0].lower()
        if key != "data":
            assert p["size"] * 512 == sizes[key], p
    for a, b in itertools.pairwise(parts):
        assert a["start"] + a["size"] <= b["start"]
    # DATA fills the rest of the disk (it grows further on first boot).
    assert parts[-1]["size"] * 512 >= sizes["data"]
    # The A and B slots have the same types and sizes.
    by_name = {p["name"]: p for p in parts}
    for key in ("BOOT", "ROOT", "HASH"):
        a, b = by_name[f"KILN-{key}-A"], by_name[f"KILN-{key}-B"]
        assert (a["type"], a["size"]) == (b["type"], b["size"])
        assert a["uuid"] != b["uuid"]


def test_root_a_is_erofs_verified_by_hash_a(built: BuildResult, tmp_path: Path) -> None:
    root = extract(built.disk, "KILN-ROOT-A", tmp_path / "root-a.img")
    hash_ = extract(built.disk, "KILN-HASH-A", tmp_path / "hash-a.img")
    res = run("fsck.erofs", root, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    res = run("veritysetup", "verify", root, hash_, built.root_hash, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    res = run("veritysetup", "dump", hash_)
    assert built.root_hash not in res.stdout  # the root hash lives on BOOT, not with the tree
    m = manifest_of(built)["verity"]
    assert re.search(rf"^Data blocks:\s+{m['data_blocks']}$", res.stdout, re.M)
    assert re.search(rf"^Salt:\s+{m['salt']}$", res.stdout, re.M)
    assert run("veritysetup", "verify", root, hash_, "00" * 32, check=False).returncode != 0


def test_boot_a_names_the_root_hash(built: BuildResult, tmp_path: Path) -> None:
    offset, _ = region(built.disk, "KILN-BOOT-A")
    image = f"{built.disk}@@{offset}"
    listing = run("mdir", "-b", "-i", image, "::/").stdout.split()
    assert sorted(listing) == ["::/initrd.img", "::/kiln.cfg", "::/vmlinuz"]
    cfg = tmp_path / "kiln.cfg"
    run("mcopy", "-n", "-i", image, "::/kiln.cfg", cfg)
    m = manifest_of(built)["verity"]
    text = cfg.read_text()
    # The table the initramfs opens: dm_table()'s, for this build's tree, ',' for ' '.
    vres = VerityResult(built.root_hash, m["salt"], m["data_blocks"], 0, "")
    table = dm_table("@ROOT@", "@HASH@", vres)
    assert f'set KILN_VERITY="kiln.verity={table.replace(" ", ",")}"' in text
    assert table.endswith(f" sha256 {built.root_hash} {m['salt']} 1 restart_on_corruption")
    assert "kiln.version=1.0.0" in text


def test_slot_b_is_empty(built: BuildResult) -> None:
    for name in ("KILN-BOOT-B", "KILN-ROOT-B", "KILN-HASH-B"):
        for chunk in chunks_of(built.disk, name):
            assert chunk == bytes(len(chunk)), f"{name} is not all zero"


def test_disk_is_sparse(built: BuildResult) -> None:
    st = built.disk.stat()
    assert st.st_blocks * 512 < st.st_size


def test_slot_a_holds_the_artifacts(built: BuildResult) -> None:
    images = manifest_of(built)["images"]
    for key in ("boot", "root", "hash"):
        size = images[key]["uncompressed_size"]
        name = f"KILN-{key.upper()}-A"
        assert sha256_region(built.disk, name, size) == images[key]["uncompressed_sha256"]


# --- artifacts and manifest -----------------------------------------------------------------

def test_manifest(built: BuildResult) -> None:
    m = manifest_of(built)
    assert m["variant"] == "container-host"
    assert m["arch"] == "amd64"
    assert m["version"] == "1.0.0"
    assert m["compression"] == "zstd"
    assert m["kernel"] and m["build_id"]
    v = m["verity"]
    assert v["root_hash"] == built.root_hash
    assert len(v["root_hash"]) == 64 and int(v["root_hash"], 16) >= 0
    assert len(v["salt"]) == 64 and int(v["salt"], 16) >= 0
    assert v["hash_algorithm"] == "sha256"
    assert v["data_block_size"] == v["hash_block_size"] == 4096
    assert set(m["images"]) == {"boot", "root", "hash"}
    assert v["data_blocks"] * 4096 == m["images"]["root"]["uncompressed_size"]
    artifacts = built.manifest.parent
    assert sorted(p.name for p in artifacts.iterdir()) == sorted(
        ["manifest.json"] + [e["file"] for e in m["images"].values()]
    )
    for key, entry in m["images"].items():
        path = artifacts / entry["file"]
        assert built.artifacts[key] == path
        assert entry["file"] == f"kiln-container-host-amd64-1.0.0-{key}.img.zst"
        assert path.stat().st_size == entry["size"]
        assert sha256_file(path) == entry["sha256"]
        assert zstd_sha256(path) == (entry["uncompressed_size"], entry["uncompressed_sha256"])


def test_build_json(built: BuildResult) -> None:
    data = json.loads((built.output / "build.json").read_text())
    assert data["disk"] == str(built.disk)
    assert data["root_hash"] == built.root_hash
    assert data["timings"] is None
    assert data["sizes"]["disk"] == built.disk.stat().st_size


def test_esp_grubenv(built: BuildResult, tmp_path: Path) -> None:
    offset, _ = region(built.disk, "KILN-EFI")
    out = tmp_path / "grubenv"
    run("mcopy", "-n", "-i", f"{built.disk}@@{offset}", "::/EFI/BOOT/grubenv", out)
    assert out.stat().st_size == 1024
    env = dict(line.split("=", 1) for line in run("grub-editenv", out, "list").stdout.splitlines())
    assert env["A_PRIO"] == "1"
    assert env["A_OK"] == "1"
    assert env["B_PRIO"] == "0"
    assert env == {"A_PRIO": "1", "A_TRIES": "0", "A_OK": "1",
                   "B_PRIO": "0", "B_TRIES": "0", "B_OK": "0"}
    listing = run("mdir", "-b", "-i", f"{built.disk}@@{offset}", "::/EFI/BOOT").stdout
    for name in ("BOOTX64.EFI", "grub.cfg", "grubenv"):
        assert f"::/EFI/BOOT/{name}" in listing
    esp = extract(built.disk, "KILN-EFI", tmp_path / "esp.img")
    res = run("fsck.vfat", "-n", esp, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_leftovers_next_to_the_output(built: BuildResult) -> None:
    assert leftovers(built.output.parent) == []
    assert leftovers(built.output) == []
    assert sorted(p.name for p in built.output.iterdir()) == ["artifacts", "build.json", "disk.img"]


# --- the CLI ------------------------------------------------------------------------------------

def test_cli_build_json(cli_build: tuple[Path, dict[str, Any]], built: BuildResult) -> None:
    out, data = cli_build
    assert data["output"] == str(out)
    assert data["disk"] == str(out / "disk.img")
    assert Path(data["disk"]).is_file()
    assert data["manifest"] == str(out / "artifacts" / "manifest.json")
    assert set(data["artifacts"]) == {"boot", "root", "hash"}
    assert all(Path(p).is_file() for p in data["artifacts"].values())
    manifest = json.loads(Path(data["manifest"]).read_text())
    assert data["root_hash"] == manifest["verity"]["root_hash"]
    assert data["root_hash"] == built.root_hash  # same inputs, same root hash
    assert data["sizes"]["disk"] == Path(data["disk"]).stat().st_size
    assert leftovers(out.parent) == []
    assert not (out.parent / "build").exists()  # --output was honoured


def test_cli_build_unknown_variant(tmp_path: Path) -> None:
    res = run(KILN, "build", "--variant", "no-such-variant", "--output", tmp_path / "out",
              check=False, cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.startswith("kiln: error: variant 'no-such-variant' not found")
    assert "known variants: container-host" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_build_bad_admin_image(tmp_path: Path) -> None:
    """Checked before anything is downloaded or written."""
    res = run(KILN, "build", "--admin-image", "not a reference", "--output", tmp_path / "out",
              check=False, cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.startswith("kiln: error: --admin-image not a reference: settings.host-containers.admin.source")
    assert list(tmp_path.iterdir()) == []


# --- reproducibility --------------------------------------------------------------------------

def test_reproducible(
    built: BuildResult, second_build: BuildResult, cli_build: tuple[Path, dict[str, Any]],
    tmp_path: Path,
) -> None:
    first = output_digests(built.output)
    second = output_digests(second_build.output)
    differing = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
    detail = ""
    if "disk.img" in differing:
        detail = explain_difference(built.disk, second_build.disk, tmp_path)
    assert differing == [], f"outputs differ: {differing}\n{detail}"
    assert second_build.root_hash == built.root_hash
    # The CLI build (a third build of the same inputs) agrees too.
    assert output_digests(cli_build[0]) == first
    assert leftovers(second_build.output.parent) == []


# --- failed builds ------------------------------------------------------------------------------

def _fails(variant: Variant, output: Path) -> KilnError:
    with pytest.raises(KilnError) as exc:
        build(BuildOptions(variant, output), Progress(quiet=True))
    return exc.value


def test_unknown_package(default_variant: Variant, tmp_path: Path) -> None:
    packages = (*default_variant.packages, "kiln-no-such-pkg")
    v = dataclasses.replace(default_variant, packages=packages)
    out = tmp_path / "out"
    e = _fails(v, out)
    assert "packages.include: unknown Debian package 'kiln-no-such-pkg'" in str(e)
    assert str(default_variant.source) in str(e)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unknown_kernel_package(default_variant: Variant, tmp_path: Path) -> None:
    v = dataclasses.replace(default_variant, kernel_package="linux-image-kiln-does-not-exist")
    out = tmp_path / "out"
    e = _fails(v, out)
    assert "packages.kernel: unknown Debian package 'linux-image-kiln-does-not-exist'" in str(e)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_root_partition_too_small(default_variant: Variant, tmp_path: Path) -> None:
    parts = dataclasses.replace(default_variant.partitions, root=20 * MiB)
    v = dataclasses.replace(default_variant, partitions=parts)
    out = tmp_path / "out"
    e = _fails(v, out)
    assert "does not fit partitions.root (20 MiB)" in str(e)
    assert "the root filesystem" in str(e)
    assert e.hint is not None and "partitions.root" in e.hint
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def _existing_output(path: Path) -> dict[str, tuple[int, int, int, str]]:
    (path / "artifacts").mkdir(parents=True)
    (path / "disk.img").write_bytes(b"the previous build's disk\n")
    (path / "artifacts" / "manifest.json").write_text('{"version": "0.9.0"}\n')
    os.utime(path / "disk.img", (1_600_000_000, 1_600_000_000))
    return snapshot(path)


def test_existing_output_untouched_when_packages_fail(
    default_variant: Variant, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    before = _existing_output(out)
    v = dataclasses.replace(default_variant, packages=("kiln-no-such-pkg",))
    _fails(v, out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_output_untouched_when_the_kernel_is_not_a_kernel(
    default_variant: Variant, tmp_path: Path
) -> None:
    """Fails after the root filesystem is unpacked: a late failure still leaves the old
    output as it was and no work directory behind."""
    out = tmp_path / "out"
    before = _existing_output(out)
    v = dataclasses.replace(default_variant, kernel_package="base-files")
    e = _fails(v, out)
    assert "packages.kernel: expected exactly one linux-image-<release> package" in str(e)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
