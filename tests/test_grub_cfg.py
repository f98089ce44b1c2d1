"""GRUB's slot choice: the real grub.cfg, run by GRUB itself (grub-emu), agrees with the
Python state machine (kiln.host.slot.state: next_boot, will_boot, grub_boot).

grub-emu is Debian's user-space GRUB: the same script engine, `load_env`/`save_env`,
`regexp`, `source`, GPT and FAT code as the EFI image, reading a small Kiln disk image
through a device map. The disk is made by the build's own code: the ESP with the
generated grub.cfg and grubenv, slot A's and slot B's BOOT partitions with their kiln.cfg.
For each slot state a grubenv made by `grub-editenv` is written over the ESP's, GRUB
runs, and the test compares the slot it boots, the kernel command line it passes, and
the grubenv it leaves (read back by `grub-editenv`) with what the Python model says.

Two things change in the script GRUB runs, and only these: stand-in functions for
`linux` and `initrd` come first (grub-emu has no Linux loader; they print their
arguments and the kernel file, then `halt`; like the real commands they fail when `cat`
cannot read the file, which with signatures enforced includes a file that does not
verify), and each `sleep N` (the pauses for an
operator to read the console, 30 s and 5 s) calls a function that prints N instead of
waiting (`sleep` is built into grub-emu, and commands cannot be shadowed). A `reboot`
is the real one: grub-emu exits.
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import os
import re
import select
import shutil
import struct
import subprocess
import termios
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.build import bootloader, disk
from kiln.build.signing import BootSigner
from kiln.core.errors import KilnError
from kiln.core.run import which
from kiln.host.slot import Slots
from kiln.host.slot.disk import Disk, GrubenvStore
from kiln.host.slot.state import TRANSITIONS, Flags, SlotError, SlotState, grub_boot
from kiln.image import layout
from kiln.image.verity import VerityResult
from kiln.variant import Partitions, Variant, load_variant

MiB = 1 << 20
MTIME = 1700000000
KEYS = ("A_PRIO", "A_TRIES", "A_OK", "B_PRIO", "B_TRIES", "B_OK")
TOOL_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}
SILENCE = 60  # seconds without output before a run counts as hung (a run takes ~0.06 s)
WORKERS = 2  # grub-emu runs in parallel, each on its own copy of the disk

STANDINS = """\
# tests/test_grub_cfg.py: grub-emu cannot start a kernel; these say what would boot.
function linux { echo "kiln-test: linux $*"; if cat "$1"; then echo; else return 1; fi; }
function initrd { echo "kiln-test: initrd $*"; if cat "$1"; then echo; echo "kiln-test: boot"; halt; fi; return 1; }
function kiln_test_sleep { echo "kiln-test: sleep $1"; }
"""


def runnable(cfg: str) -> str:
    """The generated grub.cfg as grub-emu runs it here: the stand-ins, then the script with
    every `sleep N` recorded instead of waited. Nothing else differs."""
    body, n = re.subn(r"^(\s*)sleep (\d+)$", r"\1kiln_test_sleep \2", cfg, flags=re.M)
    assert n == len(re.findall(r"\bsleep\b", cfg)) and n > 0, "a sleep the rewrite missed"
    return STANDINS + body


@dataclass(frozen=True)
class SlotBuild:
    """What one slot's BOOT partition holds."""

    version: str
    vres: VerityResult

    @property
    def kernel(self) -> str:
        return f"kiln test kernel {self.version}"

    @property
    def initrd(self) -> str:
        return f"kiln test initrd {self.version}"

    def linux_args(self, v: Variant, slot: str, extra: tuple[str, ...] = ()) -> list[str]:
        """The `linux` line grub.cfg must give: kiln.cfg's command line, the slot, `extra`
        (kiln.skipped=, the signed GRUB's kiln.bootsig= and lockdown=), the table."""
        part = layout.part_number(layout.part_name("boot", slot))
        cfg = bootloader.slot_cfg(v.with_version(self.version), self.vres)
        values = dict(re.findall(r'^set (KILN_\w+)="([^"]*)"$', cfg, re.M))
        return [f"(hd0,gpt{part})/vmlinuz", *values["KILN_CMDLINE"].split(), f"kiln.slot={slot}", *extra,
                values["KILN_VERITY"]]


BUILDS = {
    "A": SlotBuild("1.0.0", VerityResult("a1" * 32, "5a" * 32, 2560, 4096 * 21, "1")),
    "B": SlotBuild("2.0.0", VerityResult("b2" * 32, "5b" * 32, 3072, 4096 * 25, "2")),
}


@dataclass
class GrubRun:
    """What GRUB did with one grubenv."""

    output: str
    booted: str | None  # the slot whose kernel and initrd it loaded; None: it rebooted
    linux: list[str]
    kernel: str
    initrd: str
    paused: list[int]
    env_before: bytes
    env_after: bytes
    hung: bool = False

    @property
    def errors(self) -> list[str]:
        return re.findall(r"^error: .*$", self.output, re.M)


class GrubDisk:
    """A small Kiln disk image (no ROOT/HASH contents: GRUB never reads them) and grub-emu."""

    def __init__(self, path: Path, v: Variant, prefix: str = "/EFI/BOOT") -> None:
        self.path = path
        self.v = v
        self.prefix = prefix  # where grub-emu reads its first grub.cfg
        self.devmap = path.with_suffix(".map")
        self.devmap.write_text(f"(hd0) {path}\n")
        self.grubenv = GrubenvStore(Disk.from_image(path)).offset

    @classmethod
    def build(cls, path: Path, work: Path, signer: BootSigner | None = None) -> GrubDisk:
        """The disk; with `signer`, signed as `kiln build --keys` signs it, and grub-emu starts
        where the signed EFI image does: its embedded configuration (grub-early.cfg, with
        the key `trust`ed, as `--pubkey` does) runs first, from /EMU."""
        v = dataclasses.replace(
            load_variant(), partitions=Partitions(efi=8 * MiB, boot=MiB, root=MiB, hash=MiB, private=MiB, data=MiB))
        work.mkdir(parents=True)
        esp = work / "esp.img"
        bootloader.esp_partition(esp, v.partitions.efi, mtime=MTIME, work=work / "esp", signer=signer)
        generated = work / "grub.cfg.generated"
        subprocess.run([which("mcopy"), "-n", "-i", esp, "::/EFI/BOOT/grub.cfg", generated], env=TOOL_ENV,
                       check=True)
        assert generated.read_text() == bootloader.grub_cfg(), "the ESP holds the generated grub.cfg"
        (work / "grub.cfg").write_text(runnable(generated.read_text()))
        subprocess.run([which("mcopy"), "-o", "-i", esp, work / "grub.cfg", "::/EFI/BOOT/grub.cfg"], env=TOOL_ENV,
                       check=True)
        if signer:  # the runnable script is what GRUB reads here, so it carries the signature
            [sig] = signer.sign_for_grub(work / "grub.cfg")
            early = work / "emu-early.cfg"
            pause = 'function kiln_test_sleep { echo "kiln-test: sleep $1"; }\n'
            embedded = re.sub(r"^sleep (\d+)$", r"kiln_test_sleep \1", bootloader.early_cfg(),
                              flags=re.M)
            early.write_text(f"trust $prefix/boot-key.pub\nset prefix=($root)/EFI/BOOT\n{pause}{embedded}")
            subprocess.run([which("mmd"), "-i", esp, "::/EMU"], env=TOOL_ENV, check=True)
            for src, dest in ((sig, "::/EFI/BOOT/grub.cfg.sig"), (early, "::/EMU/grub.cfg"),
                              (work / "esp" / "boot-key.pub", "::/EMU/boot-key.pub")):
                subprocess.run([which("mcopy"), "-o", "-i", esp, src, dest], env=TOOL_ENV, check=True)
        boots = {}
        for slot, b in BUILDS.items():
            (work / f"vmlinuz-{slot}").write_text(b.kernel)
            (work / f"initrd-{slot}").write_text(b.initrd)
            boots[slot] = work / f"boot-{slot}.img"
            bootloader.boot_partition(boots[slot], v.with_version(b.version), work / f"vmlinuz-{slot}",
                                      work / f"initrd-{slot}", b.vres, mtime=MTIME, work=work / f"boot-{slot}",
                                      signer=signer)
        disk.assemble(path, v, "grub-test", {"efi": esp, "boot": boots["A"]})
        # Slot B's BOOT goes in as an update writes it (the initial grubenv has B cleared).
        Slots.open(image=path, active="A").write_image("B", "boot", [boots["B"].read_bytes()])
        return cls(path, v, "/EMU" if signer else "/EFI/BOOT")

    def copy(self, dest: Path) -> GrubDisk:
        subprocess.run(["cp", "--sparse=always", self.path, dest], check=True)
        return GrubDisk(dest, self.v, self.prefix)

    def mtools(self, key: str, slot: str | None = None) -> str:
        """The mtools image spec (`-i`) of one FAT partition of this disk."""
        return f"{self.path}@@{Disk.from_image(self.path).region(layout.part_name(key, slot)).offset}"

    def write_env(self, block: bytes) -> None:
        assert len(block) == 1024
        with open(self.path, "r+b") as f:
            f.seek(self.grubenv)
            f.write(block)

    def read_env(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.grubenv)
            return f.read(1024)

    def boot(self, block: bytes) -> GrubRun:
        """Write `block` as the grubenv, power on, and watch GRUB until it exits."""
        self.write_env(block)
        argv: list[str | Path] = [which("grub-emu"), "-m", self.devmap, "-r", "hd0,gpt1", "-d", self.prefix]
        # A terminal 1000 columns wide: on a pipe GRUB wraps its output at 80.
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 100, 1000, 0, 0))
        try:
            proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave)
        finally:
            os.close(slave)
        raw, hung = b"", False
        try:
            while True:
                ready, _, _ = select.select([master], [], [], SILENCE)
                try:
                    chunk = os.read(master, 65536) if ready else b""
                except OSError:  # EIO: grub-emu exited and the terminal is closed
                    chunk = b""
                raw += chunk
                # The script ran to its end without booting or rebooting: GRUB's prompt waits.
                if (ready and chunk and b"grub> " in raw) or not ready:
                    hung = True
                    proc.kill()
                    break
                if not chunk:
                    break
        finally:
            proc.wait()
            os.close(master)
        return _parse(_text(raw), block, self.read_env(), hung)


def _text(raw: bytes) -> str:
    """grub-emu's terminal output as lines: cursor moves become line breaks; the progress
    lines GRUB draws while it reads a file ("[ kiln.cfg 340B 100% ]") and blank lines go."""
    text = re.sub(rb"\x1b\[[0-9;]*H", b"\n", raw)
    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", text).replace(b"\r", b"")
    lines = text.decode("utf-8", "replace").splitlines()
    return "".join(f"{line}\n" for line in lines if line.strip() and not re.fullmatch(r"\s*\[ .* \]\s*", line))


def _last(matches: Iterator[re.Match[str]]) -> re.Match[str] | None:
    found = None
    for found in matches:  # noqa: B007 (the last one is the point)
        pass
    return found


def _parse(text: str, before: bytes, after: bytes, hung: bool) -> GrubRun:
    # The last load counts: after a slot that failed to load, grub.cfg tries the other.
    linux = _last(re.finditer(r"^kiln-test: linux (.*)\n(.*)$", text, re.M))
    initrd = _last(re.finditer(r"^kiln-test: initrd (.*)\n(.*)$", text, re.M))
    booted = None
    if re.search(r"^kiln-test: boot$", text, re.M):
        assert linux and initrd, text
        kernel = re.fullmatch(r"\(hd0,gpt(\d+)\)/vmlinuz", linux[1].split()[0])
        assert kernel, text
        part = int(kernel[1])
        booted = next(s for s in layout.SLOTS if layout.part_number(layout.part_name("boot", s)) == part)
        assert initrd[1] == f"(hd0,gpt{part})/initrd.img", text
    return GrubRun(text, booted, linux[1].split() if linux else [], linux[2] if linux else "",
                   initrd[2] if initrd else "", [int(n) for n in re.findall(r"^kiln-test: sleep (\d+)$", text, re.M)],
                   before, after, hung)


def editenv(tmp: Path, values: dict[str, str], name: str = "grubenv") -> bytes:
    """A grubenv block made by GRUB's own tool."""
    path = tmp / name
    path.unlink(missing_ok=True)
    subprocess.run([which("grub-editenv"), path, "create"], check=True)
    if values:
        subprocess.run([which("grub-editenv"), path, "set", *(f"{k}={v}" for k, v in values.items())], check=True)
    return path.read_bytes()


def editenv_list(tmp: Path, block: bytes, name: str = "grubenv.after") -> dict[str, str]:
    path = tmp / name
    path.write_bytes(block)
    out = subprocess.run([which("grub-editenv"), path, "list"], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grub_disks(tmp_path_factory: pytest.TempPathFactory) -> list[GrubDisk]:
    base = tmp_path_factory.mktemp("grub")
    first = GrubDisk.build(base / "disk0.img", base / "work")
    return [first, *(first.copy(base / f"disk{i}.img") for i in range(1, WORKERS))]


@pytest.fixture
def grub(grub_disks: list[GrubDisk]) -> GrubDisk:
    return grub_disks[0]


def run_states(disks: list[GrubDisk], tmp: Path, states: Iterable[SlotState]) -> Iterator[tuple[SlotState, GrubRun]]:
    """Boot each state's grubenv (made by grub-editenv), the disks sharing the work."""
    todo = list(dict.fromkeys(SlotState(st.a, st.b, None) for st in states))
    blocks = [editenv(tmp, {k: v for k, v in st.to_env().items() if k in KEYS}) for st in todo]

    def worker(i: int) -> list[GrubRun]:
        return [disks[i].boot(block) for block in blocks[i::len(disks)]]

    with ThreadPoolExecutor(len(disks)) as pool:
        parts = list(pool.map(worker, range(len(disks))))
    runs = [parts[i % len(disks)][i // len(disks)] for i in range(len(todo))]
    return zip(todo, runs, strict=True)


def check_agrees(v: Variant, tmp: Path, st: SlotState, run: GrubRun) -> None:
    """GRUB did what the model says for `st`: the same slot (or a reboot when none would
    boot), the try spent, nothing else in the grubenv touched, that slot's own kernel."""
    where = f"{st.a} {st.b}:\n{run.output[-1500:]}"
    assert not run.hung, f"GRUB fell through to its prompt: {where}"
    assert not run.errors, where
    assert f"kiln-grub: A prio={st.a.priority} tries={st.a.tries_left} ok={int(st.a.successful)}; " \
           f"B prio={st.b.priority} tries={st.b.tries_left} ok={int(st.b.successful)}" in run.output, where
    if st.next_boot is None:
        assert run.booted is None and "kiln-grub: no bootable slot" in run.output, where
        assert run.paused == [30], where  # the operator's pause, then the real reboot
        assert run.env_after == run.env_before, where
        return
    after = grub_boot(st)
    assert run.booted == st.next_boot, where
    assert f"kiln-grub: booting slot {st.next_boot}\n" in run.output, where
    build = BUILDS[st.next_boot]
    assert run.linux == build.linux_args(v, st.next_boot), where
    assert (run.kernel, run.initrd) == (build.kernel, build.initrd), where
    assert run.paused == [], where
    seen = editenv_list(tmp, run.env_after)
    assert {k: seen[k] for k in KEYS} == {k: v for k, v in after.to_env().items() if k in KEYS}, where
    if after == SlotState(st.a, st.b, st.next_boot):  # no try to spend: GRUB writes nothing
        assert run.env_after == run.env_before, where


def reachable() -> set[SlotState]:
    """Every state a freshly built image reaches through slot commands and boots (the
    search in tests/test_slot_state.py), as GRUB sees it (flags only)."""
    start = SlotState(Flags(1, 0, True), Flags(0, 0, False), "A")
    seen = {start}
    queue = deque([start])
    while queue:
        st = queue.popleft()
        steps = [*TRANSITIONS.values(), grub_boot] if st.next_boot else list(TRANSITIONS.values())
        for step in steps:
            try:
                nxt = step(st)
            except SlotError:
                continue
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return {SlotState(s.a, s.b, None) for s in seen}


# --- the tests -----------------------------------------------------------------------------------


def test_grub_runs_the_generated_script_with_only_the_pauses_changed() -> None:
    cfg = bootloader.grub_cfg()
    ran = runnable(cfg)
    assert ran.startswith(STANDINS)
    changed = [(a, b) for a, b in zip(cfg.splitlines(), ran[len(STANDINS):].splitlines(), strict=True) if a != b]
    assert changed == [("  sleep 30", "  kiln_test_sleep 30"), ("sleep 5", "kiln_test_sleep 5")]


def test_fresh_image_boots_slot_a(grub: GrubDisk, tmp_path: Path) -> None:
    """The grubenv exactly as the build writes it."""
    block = grub.read_env()
    run = grub.boot(block)
    check_agrees(grub.v, tmp_path, SlotState.from_env(editenv_list(tmp_path, block), None), run)
    assert run.booted == "A"
    assert run.linux[-1].startswith("kiln.verity=0,") and run.linux[-1].endswith(",1,restart_on_corruption")


def test_every_reachable_state(grub_disks: list[GrubDisk], tmp_path: Path) -> None:
    states = reachable()
    assert len(states) >= 20
    outcomes = set()
    for st, run in run_states(grub_disks, tmp_path, states):
        check_agrees(grub_disks[0].v, tmp_path, st, run)
        outcomes.add(run.booted)
    assert outcomes == {"A", "B"}


BOUNDARY = [Flags(0, 0, False), Flags(0, 15, True), Flags(1, 0, False), Flags(2, 0, True), Flags(2, 1, False),
            Flags(14, 1, True), Flags(15, 0, False), Flags(15, 15, True)]


def test_boundaries(grub_disks: list[GrubDisk], tmp_path: Path) -> None:
    """Priorities 0, 1, 2, 14, 15 against each other (ties included), tries 0, 1, 15,
    with and without the successful flag: beyond what the slot commands ever write."""
    states = [SlotState(a, b, None) for a, b in itertools.product(BOUNDARY, BOUNDARY)]
    outcomes = set()
    for st, run in run_states(grub_disks, tmp_path, states):
        check_agrees(grub_disks[0].v, tmp_path, st, run)
        outcomes.add(run.booted)
    assert outcomes == {"A", "B", None}


def test_every_try_count_is_spent_by_one(grub_disks: list[GrubDisk], tmp_path: Path) -> None:
    """grub.cfg counts down with a table (GRUB has no arithmetic): every entry, each slot."""
    states = [SlotState(Flags(3, t, False), Flags(1, 0, True), None) for t in range(1, 16)]
    states += [SlotState(Flags(1, 0, True), Flags(3, t, False), None) for t in range(1, 16)]
    for st, run in run_states(grub_disks, tmp_path, states):
        check_agrees(grub_disks[0].v, tmp_path, st, run)


@pytest.mark.parametrize("damage", ["garbage", "no-header", "missing"])
def test_an_unreadable_grubenv_boots_slot_a(grub: GrubDisk, tmp_path: Path, damage: str) -> None:
    """No slot state at all: GRUB boots the factory slot A, writes nothing (A has no tries);
    kiln.host.boot.ready then rewrites the grubenv (Slots.reset_to_active)."""
    work = grub.copy(tmp_path / "disk.img")
    if damage == "missing":
        esp = Disk.from_image(work.path).region(layout.part_name("efi")).offset
        subprocess.run(["mdel", "-i", f"{work.path}@@{esp}", "::/EFI/BOOT/grubenv"], env=TOOL_ENV, check=True)
        block = work.read_env()  # the freed sectors, still as they were
    else:
        good = editenv(tmp_path, {"A_PRIO": "0", "B_PRIO": "2", "B_OK": "1"})
        block = bytes(1024) if damage == "garbage" else b"X" + good[1:]
    run = work.boot(block)
    assert "kiln-grub: grubenv unreadable; falling back to slot A" in run.output
    assert run.booted == "A" and run.linux == BUILDS["A"].linux_args(work.v, "A"), run.output
    assert run.env_after == block
    with pytest.raises(KilnError):
        Slots.open(image=work.path, active="A").state()


@pytest.mark.parametrize(
    ("values", "grub_boots", "int_reading_boots"),
    [
        ({"A_PRIO": "9", "A_OK": "1", "B_PRIO": "010", "B_OK": "1"}, "A", "B"),  # octal 8 to GRUB
        ({"A_PRIO": "15", "A_OK": "1", "B_PRIO": "0x10", "B_OK": "1"}, "B", None),  # 16 to GRUB
        ({"A_PRIO": "2", "A_OK": "01", "B_PRIO": "1", "B_OK": "1"}, "B", "A"),  # "01" is not "1"
    ],
    ids=["octal", "hex", "ok-01"],
)
def test_grub_reads_non_canonical_numbers_its_own_way(grub: GrubDisk, tmp_path: Path, values: dict[str, str],
                                                       grub_boots: str, int_reading_boots: str | None) -> None:
    """Why SlotState.from_env refuses such values: GRUB and int() read them differently
    (None: int() cannot read it at all)."""
    env = {k: "0" for k in KEYS} | values
    run = grub.boot(editenv(tmp_path, env))
    assert run.booted == grub_boots, run.output
    try:
        n = {k: int(v, 10) for k, v in env.items()}
    except ValueError:
        assert int_reading_boots is None
    else:
        st = SlotState(Flags(n["A_PRIO"], n["A_TRIES"], n["A_OK"] == 1),
                       Flags(n["B_PRIO"], n["B_TRIES"], n["B_OK"] == 1), None)
        assert st.next_boot == int_reading_boots
    with pytest.raises(KilnError):
        SlotState.from_env(env, None)


def test_grub_emu_is_installed_by_make_setup() -> None:
    """The Makefile installs grub-emu; which() names the package when it is missing."""
    from tests.toolcheck import apt_packages

    assert "grub-emu" in apt_packages()
    assert shutil.which("grub-emu") == which("grub-emu")
