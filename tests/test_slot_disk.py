"""A/B slots on a real built disk image: `kiln slot --image`, the grubenv on the ESP, and
`Slots.write_image`, all checked with the real tools (sfdisk, mcopy, grub-editenv,
fsck.vfat, zstd, veritysetup)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from kiln.build.pipeline import BuildResult
from kiln.core.errors import KilnError
from kiln.host.slot import Flags, SlotError, Slots, SlotState
from kiln.image import grubenv
from tests.helpers import zstd_chunks

KILN = Path(sys.executable).with_name("kiln")
MiB = 1 << 20
GRUBENV = "::/EFI/BOOT/grubenv"
INITIAL = {"A_PRIO": "1", "A_TRIES": "0", "A_OK": "1", "B_PRIO": "0", "B_TRIES": "0", "B_OK": "0"}
TOOL_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}


# --- helpers ------------------------------------------------------------------------------

def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=check, env=TOOL_ENV
    )


def regions(disk: Path) -> dict[str, tuple[int, int]]:
    """Partition name -> (byte offset, byte size), as sfdisk reads the GPT."""
    table = json.loads(run("sfdisk", "--json", disk).stdout)["partitiontable"]
    assert table["sectorsize"] == 512
    return {p["name"]: (p["start"] * 512, p["size"] * 512) for p in table["partitions"]}


def read_region(disk: Path, name: str) -> bytes:
    offset, size = regions(disk)[name]
    with open(disk, "rb") as f:
        f.seek(offset)
        return f.read(size)


def extract_region(disk: Path, name: str, dest: Path, length: int | None = None) -> Path:
    """Copy a partition (or its first `length` bytes) to a file, 1 MiB at a time."""
    offset, size = regions(disk)[name]
    left = size if length is None else length
    with open(disk, "rb") as src, open(dest, "wb") as out:
        src.seek(offset)
        while left:
            chunk = src.read(min(MiB, left))
            assert chunk, f"{disk} ends inside {name}"
            out.write(chunk)
            left -= len(chunk)
    return dest


def sha256_region(disk: Path, name: str) -> str:
    offset, size = regions(disk)[name]
    h = hashlib.sha256()
    with open(disk, "rb") as f:
        f.seek(offset)
        left = size
        while left:
            chunk = f.read(min(MiB, left))
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def mcopy_grubenv(disk: Path, dest: Path) -> Path:
    """The grubenv as mtools reads it from the ESP inside the disk image."""
    offset, _ = regions(disk)["KILN-EFI"]
    dest.unlink(missing_ok=True)
    run("mcopy", "-n", "-i", f"{disk}@@{offset}", GRUBENV, dest)
    assert dest.stat().st_size == 1024
    return dest


def editenv_list(path: Path) -> dict[str, str]:
    out = run("grub-editenv", path, "list").stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def grub_sees(disk: Path, tmp: Path) -> dict[str, str]:
    return editenv_list(mcopy_grubenv(disk, tmp / "grubenv.out"))


def fsck_esp(disk: Path, tmp: Path) -> None:
    esp = extract_region(disk, "KILN-EFI", tmp / "esp.img")
    res = run("fsck.vfat", "-n", esp, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    esp.unlink()


def kiln_slot(disk: Path, *args: str, active: str | None = "A") -> subprocess.CompletedProcess[str]:
    argv: list[str | Path] = [KILN, "slot", "--image", disk]
    if active is not None:
        argv += ["--active", active]
    return run(*argv, *args, check=False)


def status(disk: Path, active: str | None = "A") -> dict[str, Any]:
    res = kiln_slot(disk, "--json", "status", active=active)
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def grub_save_env(disk: Path, tmp: Path, **values: str) -> None:
    """Do what GRUB's `save_env` does at boot: rewrite the grubenv's sectors in place.

    The new block comes from grub-editenv (GRUB's own envblk code); it is written over the
    file's existing bytes, found by content in the ESP, leaving the FAT untouched."""
    env_file = mcopy_grubenv(disk, tmp / "grubenv.grub")
    old = env_file.read_bytes()
    run("grub-editenv", env_file, "set", *(f"{k}={v}" for k, v in values.items()))
    new = env_file.read_bytes()
    assert len(new) == 1024
    esp = read_region(disk, "KILN-EFI")
    assert esp.count(old) == 1
    esp_offset, _ = regions(disk)["KILN-EFI"]
    with open(disk, "r+b") as f:
        f.seek(esp_offset + esp.index(old))
        f.write(new)


def manifest(built: BuildResult) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(built.manifest.read_text())
    return data


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def disk(built: BuildResult, tmp_path: Path) -> Path:
    dest = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(built.disk), str(dest)], check=True)
    return dest


# --- status -----------------------------------------------------------------------------------

def test_status_of_a_fresh_image(disk: Path, tmp_path: Path) -> None:
    before = read_region(disk, "KILN-EFI")
    st = status(disk)
    assert st == {
        "A": {"priority": 1, "tries_left": 0, "successful": True, "will_boot": True},
        "B": {"priority": 0, "tries_left": 0, "successful": False, "will_boot": False},
        "active": "A",
        "next": "A",
        "ever_succeeded": False,
    }
    assert grub_sees(disk, tmp_path) == INITIAL
    assert read_region(disk, "KILN-EFI") == before  # status writes nothing


def test_status_text_and_unknown_active(disk: Path) -> None:
    res = kiln_slot(disk, "status", active=None)
    assert res.returncode == 0, res.stderr
    assert "Slot A: priority=1 tries_left=0 successful=true will_boot=true" in res.stdout
    assert "Slot B: priority=0 tries_left=0 successful=false will_boot=false" in res.stdout
    assert "Active: unknown" in res.stdout
    assert "Next boot: A" in res.stdout
    assert status(disk, active=None)["active"] is None


def test_has_boot_ever_succeeded(disk: Path) -> None:
    res = kiln_slot(disk, "has-boot-ever-succeeded")
    assert (res.returncode, res.stdout.strip()) == (0, "false")
    assert kiln_slot(disk, "mark-successful-boot").returncode == 0
    res = kiln_slot(disk, "--json", "has-boot-ever-succeeded")
    assert json.loads(res.stdout) == {"ever_succeeded": True}


def test_library_and_cli_agree(disk: Path) -> None:
    slots = Slots.open(image=disk, active="A")
    st = slots.state()
    assert st == SlotState(Flags(1, 0, True), Flags(0, 0, False), "A", False)
    assert status(disk) == st.to_json()
    parts = slots.partitions("B")
    for key, region in parts.items():
        assert (region.offset, region.size) == regions(disk)[f"KILN-{key.upper()}-B"]


# --- transitions through the CLI ----------------------------------------------------------

def _apply(disk: Path, tmp: Path, command: str, active: str, want: dict[str, str]) -> None:
    res = kiln_slot(disk, "--json", command, active=active)
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    seen = grub_sees(disk, tmp)
    for key, value in want.items():
        assert seen[key] == value, (command, key, seen)
    # What the CLI printed is what it wrote, and what it reads back.
    assert SlotState.from_env(seen, active).to_json() == printed
    assert status(disk, active) == printed
    fsck_esp(disk, tmp)


def test_update_lifecycle_success(disk: Path, tmp_path: Path) -> None:
    esp_before = read_region(disk, "KILN-EFI")
    _apply(disk, tmp_path, "mark-successful-boot", "A",
           {"A_PRIO": "1", "A_OK": "1", "EVER_OK": "1", "B_PRIO": "0"})
    _apply(disk, tmp_path, "clear-inactive", "A",
           {"B_PRIO": "0", "B_TRIES": "0", "B_OK": "0", "A_PRIO": "1", "A_OK": "1"})
    _apply(disk, tmp_path, "mark-inactive-valid", "A", {"B_PRIO": "0", "B_TRIES": "1", "B_OK": "0"})
    _apply(disk, tmp_path, "upgrade-to-inactive", "A",
           {"A_PRIO": "1", "A_TRIES": "0", "A_OK": "1", "B_PRIO": "2", "B_TRIES": "1", "B_OK": "0"})
    assert status(disk)["next"] == "B"

    # GRUB boots B and spends its try (save_env B_TRIES).
    grub_save_env(disk, tmp_path, B_TRIES="0")
    st = status(disk, "B")
    assert st["B"] == {"priority": 2, "tries_left": 0, "successful": False, "will_boot": False}
    assert st["next"] == "A"

    # B came up: the boot is marked successful and B stays.
    _apply(disk, tmp_path, "mark-successful-boot", "B",
           {"B_PRIO": "2", "B_TRIES": "0", "B_OK": "1"})
    st = status(disk, "B")
    assert st["next"] == "B" and st["B"]["will_boot"]

    _apply(disk, tmp_path, "rollback-to-inactive", "B", {"A_PRIO": "2", "A_OK": "1", "B_PRIO": "1"})
    assert status(disk, "B")["next"] == "A"

    # Only the grubenv's bytes changed on the ESP: same length, same place, FAT untouched.
    esp_after = read_region(disk, "KILN-EFI")
    assert len(esp_after) == len(esp_before)
    sectors = range(0, len(esp_before), 512)
    diff = [i for i in sectors if esp_before[i : i + 512] != esp_after[i : i + 512]]
    assert len(diff) == 1, diff  # one sector: the grubenv's first


def test_update_lifecycle_failure(disk: Path, tmp_path: Path) -> None:
    for command in ("clear-inactive", "mark-inactive-valid", "upgrade-to-inactive"):
        assert kiln_slot(disk, command).returncode == 0
    grub_save_env(disk, tmp_path, B_TRIES="0")
    st = status(disk, "B")  # B is running but never marks itself successful
    assert st["next"] == "A"
    assert not st["B"]["will_boot"]
    assert st["A"]["will_boot"]
    fsck_esp(disk, tmp_path)


def test_cancel_upgrade(disk: Path, tmp_path: Path) -> None:
    for command in ("clear-inactive", "mark-inactive-valid", "upgrade-to-inactive"):
        assert kiln_slot(disk, command).returncode == 0
    _apply(disk, tmp_path, "cancel-upgrade", "A", {"A_PRIO": "2", "B_PRIO": "0", "B_TRIES": "1"})
    assert status(disk)["next"] == "A"


def test_unrelated_grubenv_variables_survive(disk: Path, tmp_path: Path) -> None:
    grub_save_env(disk, tmp_path, saved_entry="kiln")
    assert kiln_slot(disk, "mark-inactive-valid").returncode == 0
    seen = grub_sees(disk, tmp_path)
    assert seen["saved_entry"] == "kiln"
    assert seen["B_TRIES"] == "1"


def test_unchanged_state_is_not_rewritten(disk: Path) -> None:
    # clear-inactive on an already cleared B changes nothing, so nothing is written
    # (the initial grubenv has no EVER_OK; a write would add it).
    before = read_region(disk, "KILN-EFI")
    assert kiln_slot(disk, "clear-inactive").returncode == 0
    assert read_region(disk, "KILN-EFI") == before


@pytest.mark.parametrize(
    ("command", "active", "message"),
    [
        ("upgrade-to-inactive", "A", "cannot upgrade to slot B"),
        ("rollback-to-inactive", "A", "cannot roll back to slot B: it would not boot"),
        ("clear-inactive", None, "the active slot is unknown"),
        ("mark-successful-boot", None, "the active slot is unknown"),
    ],
)
def test_refused_command_leaves_grubenv_identical(
    disk: Path, tmp_path: Path, command: str, active: str | None, message: str
) -> None:
    before = mcopy_grubenv(disk, tmp_path / "before").read_bytes()
    esp_before = read_region(disk, "KILN-EFI")
    res = kiln_slot(disk, command, active=active)
    assert res.returncode != 0
    assert res.stderr.startswith("kiln: error: ")
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    assert mcopy_grubenv(disk, tmp_path / "after").read_bytes() == before
    assert read_region(disk, "KILN-EFI") == esp_before


def test_refused_upgrade_after_clear(disk: Path, tmp_path: Path) -> None:
    """Cleared but not marked valid: still refused, and the cleared state stays on disk."""
    assert kiln_slot(disk, "clear-inactive").returncode == 0
    before = read_region(disk, "KILN-EFI")
    res = kiln_slot(disk, "upgrade-to-inactive")
    assert res.returncode == 1
    assert "tries_left=0" in res.stderr and "hint:" in res.stderr
    assert read_region(disk, "KILN-EFI") == before


@pytest.mark.parametrize(("key", "value"), [("A_PRIO", "x"), ("B_TRIES", "16"), ("A_OK", "2")])
def test_malformed_grubenv_is_a_clear_error(
    disk: Path, tmp_path: Path, key: str, value: str
) -> None:
    grub_save_env(disk, tmp_path, **{key: value})
    before = read_region(disk, "KILN-EFI")
    for command in ("status", "mark-successful-boot"):
        res = kiln_slot(disk, command)
        assert res.returncode == 1
        assert f"grubenv: {key}='{value}' is not a number" in res.stderr
        assert "Traceback" not in res.stderr
    assert read_region(disk, "KILN-EFI") == before


def test_not_a_kiln_disk(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(1 << 20))
    res = kiln_slot(junk, "status")
    assert res.returncode == 1
    assert res.stderr.startswith("kiln: error: no GPT")
    assert "Traceback" not in res.stderr


def test_cli_in_process(disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli.main import main

    assert main(["slot", "--image", str(disk), "--active", "A", "--json", "status"]) == 0
    assert json.loads(capsys.readouterr().out)["A"]["priority"] == 1
    assert main(["slot", "--image", str(disk), "--active", "A", "upgrade-to-inactive"]) == 1
    err = capsys.readouterr().err
    assert "cannot upgrade to slot B" in err


def test_unknown_command_in_library(disk: Path) -> None:
    slots = Slots.open(image=disk, active="A")
    with pytest.raises(KilnError, match="unknown slot command 'flip'"):
        slots.apply("flip")
    with pytest.raises(KilnError, match="active slot must be A or B"):
        Slots.open(image=disk, active="C")


# --- writing a slot -------------------------------------------------------------------------

def test_write_image_refuses_active_and_uncleared_slots(disk: Path) -> None:
    slots = Slots.open(image=disk, active="A")
    a_root = sha256_region(disk, "KILN-ROOT-A")
    with pytest.raises(SlotError, match="slot A: it is the running slot"):
        slots.write_image("A", "root", [b"x" * 4096])
    slots.apply("mark-inactive-valid")
    b_root = sha256_region(disk, "KILN-ROOT-B")
    with pytest.raises(SlotError, match="slot B: it is not cleared") as exc:
        slots.write_image("B", "root", [b"x" * 4096])
    assert exc.value.hint is not None and "clear-inactive" in exc.value.hint
    slots.apply("upgrade-to-inactive")
    with pytest.raises(SlotError, match="not cleared"):
        slots.write_image("B", "boot", [b"x" * 4096])
    assert sha256_region(disk, "KILN-ROOT-A") == a_root
    assert sha256_region(disk, "KILN-ROOT-B") == b_root


def test_write_image_into_slot_b_verifies(disk: Path, built: BuildResult, tmp_path: Path) -> None:
    slots = Slots.open(image=disk, active="A")
    for command in ("mark-inactive-valid", "upgrade-to-inactive"):
        slots.apply(command)  # leave B dirty first, as a failed earlier update would
    slots.apply("clear-inactive")
    assert slots.state().b == Flags(0, 0, False)
    untouched = {n: sha256_region(disk, n) for n in ("KILN-EFI", "KILN-BOOT-A", "KILN-ROOT-A",
                                                      "KILN-HASH-A", "KILN-PRIVATE", "KILN-DATA")}
    info = manifest(built)["images"]
    for key in ("boot", "root", "hash"):
        written, digest = slots.write_image("B", key, zstd_chunks(built.artifacts[key]))
        assert written == info[key]["uncompressed_size"]
        assert digest == info[key]["uncompressed_sha256"]

    root = extract_region(disk, "KILN-ROOT-B", tmp_path / "root-b.img")
    hash_ = extract_region(disk, "KILN-HASH-B", tmp_path / "hash-b.img")
    res = run("veritysetup", "verify", root, hash_, built.root_hash, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    # Slot B now holds exactly what slot A holds.
    assert sha256_region(disk, "KILN-ROOT-B") == sha256_region(disk, "KILN-ROOT-A")
    assert sha256_region(disk, "KILN-BOOT-B") == sha256_region(disk, "KILN-BOOT-A")
    assert sha256_region(disk, "KILN-HASH-B") == sha256_region(disk, "KILN-HASH-A")
    for name, digest in untouched.items():
        assert sha256_region(disk, name) == digest, name
    # A corrupted byte in ROOT-B is caught by verity against HASH-B.
    with open(root, "r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert run("veritysetup", "verify", root, hash_, built.root_hash, check=False).returncode != 0

    slots.apply("mark-inactive-valid")
    slots.apply("upgrade-to-inactive")
    assert slots.state().next_boot == "B"
    fsck_esp(disk, tmp_path)


def _chunks(total: int, size: int, fill: int) -> Iterable[bytes]:
    while total > 0:
        n = min(size, total)
        yield bytes([fill]) * n
        total -= n


def test_write_image_exact_fit(disk: Path) -> None:
    slots = Slots.open(image=disk, active="A")
    _, size = regions(disk)["KILN-HASH-B"]
    written, digest = slots.write_image("B", "hash", _chunks(size, 3 * MiB, 0x5A))
    assert written == size
    assert digest == hashlib.sha256(b"\x5a" * size).hexdigest()
    assert read_region(disk, "KILN-HASH-B") == b"\x5a" * size


@pytest.mark.parametrize("chunk", [MiB, 3 * MiB, 4096 + 1])
def test_write_image_too_large_writes_nothing_beyond(disk: Path, chunk: int) -> None:
    slots = Slots.open(image=disk, active="A")
    offset, size = regions(disk)["KILN-HASH-B"]
    after = {n: sha256_region(disk, n) for n in ("KILN-PRIVATE", "KILN-DATA", "KILN-ROOT-B")}
    with open(disk, "rb") as f:
        f.seek(offset + size)
        next_bytes = f.read(MiB)
    with pytest.raises(KilnError, match="does not fit partition"):
        slots.write_image("B", "hash", _chunks(size + 1, chunk, 0xA5))
    with open(disk, "rb") as f:
        f.seek(offset + size)
        assert f.read(MiB) == next_bytes
    for name, digest in after.items():
        assert sha256_region(disk, name) == digest, name
    # The slot is still cleared and would not boot; the partial image stays within it.
    assert slots.state().b == Flags(0, 0, False)


def test_write_image_does_not_grow_the_disk(disk: Path) -> None:
    size_before = disk.stat().st_size
    slots = Slots.open(image=disk, active="A")
    _, root_size = regions(disk)["KILN-ROOT-B"]
    with pytest.raises(KilnError):
        slots.write_image("B", "root", _chunks(root_size + MiB, MiB, 1))
    assert disk.stat().st_size == size_before


SHORT_WRITE = r"""
import resource, sys
from pathlib import Path
from kiln.host.slot.disk import Region, write_partition

limit = 3 << 19  # 1.5 MiB: the kernel completes only part of the second 1 MiB pwrite
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    n, h = write_partition(Region(Path(sys.argv[1]), 0, 4 << 20), [b"\1" * (1 << 20)] * 2)
except Exception as e:
    print("error", type(e).__name__, e)
else:
    print("ok", n, h)
"""


def test_write_partition_does_not_report_a_short_write_as_success(tmp_path: Path) -> None:
    """pwrite may write less than asked (a full filesystem, a file size limit). A write
    that did not complete must not come back with the full length and the full digest."""
    target = tmp_path / "part.img"
    target.write_bytes(b"")
    res = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(target)],
                         capture_output=True, text=True, check=True)
    on_disk = target.read_bytes()
    outcome = res.stdout.split()
    if outcome[0] == "ok":
        written, digest = int(outcome[1]), outcome[2]
        assert written == len(on_disk), f"reported {written} bytes written, {len(on_disk)} on disk"
        assert digest == hashlib.sha256(on_disk).hexdigest()
    else:
        assert outcome[1] == "KilnError", res.stdout


# --- torn grubenv writes --------------------------------------------------------------------

def _env(st: SlotState) -> dict[str, str]:
    return st.to_env()


@pytest.mark.parametrize("first_new", [True, False])
def test_torn_write_gives_one_whole_state(first_new: bool) -> None:
    old_state = SlotState(Flags(1, 0, True), Flags(0, 1, False), "A", True)
    new_state = SlotState(Flags(1, 0, True), Flags(2, 1, False), "A", True)
    old_env, new_env = dict(INITIAL) | _env(old_state), dict(INITIAL) | _env(new_state)
    assert grubenv.fits_first_sector(old_env) and grubenv.fits_first_sector(new_env)
    old, new = grubenv.serialize(old_env), grubenv.serialize(new_env)
    assert old != new
    torn = new[:512] + old[512:] if first_new else old[:512] + new[512:]
    parsed = grubenv.parse(torn)
    assert parsed in (old_env, new_env)
    assert parsed == (new_env if first_new else old_env)  # the first sector decides
    assert SlotState.from_env(parsed, "A") == (new_state if first_new else old_state)


def test_torn_write_would_mix_states_beyond_the_first_sector() -> None:
    """Why Kiln insists on the first sector: with the slot variables pushed across the
    sector boundary (A_PRIO before it, B_PRIO after it), a torn upgrade-to-inactive write
    yields a state that is neither the old nor the new one."""
    pad = {"padding": "p" * 460}
    before = SlotState(Flags(2, 0, True), Flags(0, 1, False), "A")
    after = SlotState(Flags(1, 0, True), Flags(2, 1, False), "A")
    old_env, new_env = pad | before.to_env(), pad | after.to_env()
    assert not grubenv.fits_first_sector(new_env)
    old, new = grubenv.serialize(old_env), grubenv.serialize(new_env)
    assert old.index(b"A_PRIO=") < 512 < old.index(b"B_PRIO=")
    for torn in (new[:512] + old[512:], old[:512] + new[512:]):
        parsed = grubenv.parse(torn)
        assert parsed not in (old_env, new_env)
        assert SlotState.from_env(parsed, "A") not in (before, after)


def test_store_refuses_state_beyond_the_first_sector(disk: Path) -> None:
    slots = Slots.open(image=disk, active="A")
    before = read_region(disk, "KILN-EFI")
    with pytest.raises(KilnError, match="first sector"):
        slots.store.write({"padding": "p" * 500, **INITIAL})
    assert read_region(disk, "KILN-EFI") == before


def test_reset_to_active_repairs_an_unreadable_grubenv(disk: Path, tmp_path: Path) -> None:
    slots = Slots.open(image=disk, active="A")
    with open(disk, "r+b") as f:
        f.seek(slots.store.offset)
        f.write(b"\xff" * 512)
    with pytest.raises(KilnError):
        slots.state()
    st = slots.reset_to_active()
    assert st.a == Flags(1, 0, True) and st.b == Flags(0, 0, False)
    assert grub_sees(disk, tmp_path)["A_OK"] == "1"
    fsck_esp(disk, tmp_path)
