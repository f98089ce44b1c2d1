"""The initramfs `init` (kiln/build/data/init) run for real under busybox, on the host.

Every failure it checks must end in a reboot (GRUB then falls back to the other slot):
never a shell, never a boot on a root dm-verity did not open. The VM tests prove the same
in minutes; these prove it in seconds, one run per failure the script knows.

The script runs unchanged in a scratch root (`unshare --user --map-root-user --mount
--root`): Debian's static busybox, a module list as the build writes it, fake
/proc/cmdline and /sys/class/block uevents, block device nodes that open nothing, and
/dev/console a pipe the test reads. Only the programs
whose real effect needs a real boot are stand-ins (`FAKE`): dmsetup, mount, mke2fs,
reboot, switch_root, and sleep (so a missing partition costs no 10 s). They record their
arguments and succeed, or fail when a test says so. Debian's busybox runs some applets
itself whatever PATH says (insmod, umount, mkdir, cp): those stay real. insmod can never
succeed here (loading modules needs the host's privileges), so the module list is empty
except in the case where a module must fail to load. Even if a real `mount` or `reboot`
ran, the user namespace has no right to affect this machine.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kiln.build import bootloader
from kiln.build.initramfs import INIT
from kiln.core.run import which
from kiln.image import layout
from kiln.image.verity import VerityResult, build_hash_tree, dm_table
from kiln.variant import load_variant

# The stand-in for every tool in STANDINS: one line per call (fields split by \x1f), then
# exit 1 when a glob in /fake/fail matches "name args". A real `reboot -f` never returns,
# so the stand-in kills its caller (the init), unless /fake/reboot-fails says to fail.
FAKE = r"""#!/bin/busybox sh
name=${0##*/}
printf '%s\037' "$name" "$@" >> /fake/calls
printf '\n' >> /fake/calls
line="$name $*"
while IFS= read -r rule; do
    case "$line" in $rule) exit 1 ;; esac
done < /fake/fail
if [ "$name" = reboot ]; then
    [ -e /fake/reboot-fails ] && exit 1
    kill -KILL $PPID
fi
exit 0
"""
STANDINS = ("dmsetup", "mount", "mke2fs", "reboot", "switch_root", "sleep")
MODULE = "kernel/drivers/md/dm-verity.ko"
RUN_TIMEOUT = 60  # a run takes ~0.1 s; a hang (a loop that never ends) must still fail


def device(name: str) -> str:
    """The /dev path of a Kiln partition on the scratch disk (vda, GPT entry order)."""
    return f"/dev/vda{layout.part_number(name)}"


@dataclass
class Outcome:
    returncode: int
    calls: list[list[str]]
    console: str
    sysrq: str

    def called(self, name: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == name]

    def index(self, predicate: Callable[[list[str]], bool]) -> int:
        return next(i for i, c in enumerate(self.calls) if predicate(c))

    def assert_rebooted(self, message: str) -> None:
        """Ended in `reboot -f` after saying why, with the root never handed over."""
        assert f"kiln-init: FATAL: {message}\n" in self.console, self.console
        assert self.calls and self.calls[-1] == ["reboot", "-f"], self.calls[-3:]
        assert self.returncode == -9, f"the init went on after reboot -f (exit {self.returncode})"
        assert not self.called("switch_root")


@dataclass
class Scratch:
    """A scratch root holding the init, as the initramfs lays it out, and a fake machine."""

    root: Path
    vres: VerityResult
    cmdline: str
    fail: list[str] = field(default_factory=list)  # globs over "name args" that make a stand-in fail
    reboot_fails: bool = False

    def run(self) -> Outcome:
        (self.root / "proc/cmdline").write_text(self.cmdline + "\n")
        (self.root / "fake/fail").write_text("".join(f"{r}\n" for r in self.fail))
        if self.reboot_fails:
            (self.root / "fake/reboot-fails").touch()
        argv = [which("unshare"), "--user", "--map-root-user", "--mount", f"--root={self.root}", "/init"]
        # Held open for reading and writing: the init's `> /dev/console` never blocks, and
        # what it said waits in the pipe (a file would keep only the last message).
        console = os.open(self.root / "dev/console", os.O_RDWR | os.O_NONBLOCK)
        try:
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT,
                                 env={"PATH": "/usr/sbin:/bin"}, check=False)
            said = b""
            while True:
                try:
                    chunk = os.read(console, 65536)
                except BlockingIOError:
                    break
                said += chunk
        finally:
            os.close(console)
        lines = (self.root / "fake/calls").read_text().splitlines()
        calls = [line.split("\x1f")[:-1] for line in lines]
        sysrq = self.root / "proc/sysrq-trigger"
        return Outcome(res.returncode, calls, said.decode(), sysrq.read_text() if sysrq.exists() else "")

    def remove_partition(self, name: str) -> None:
        (self.root / "sys/class/block" / device(name).removeprefix("/dev/") / "uevent").unlink()

    def remove_node(self, name: str) -> None:
        (self.root / device(name).removeprefix("/")).unlink()


def kernel_cmdline(slot: str, vres: VerityResult) -> str:
    """/proc/cmdline as GRUB makes it from the BOOT partition's kiln.cfg (slot_cfg)."""
    cfg = bootloader.slot_cfg(load_variant(), vres)
    values = dict(re.findall(r'^set (KILN_\w+)="([^"]*)"$', cfg, re.M))
    return f"BOOT_IMAGE=(hd0,gpt2)/vmlinuz {values['KILN_CMDLINE']} kiln.slot={slot} {values['KILN_VERITY']}"


@pytest.fixture(scope="module")
def vres(tmp_path_factory: pytest.TempPathFactory) -> VerityResult:
    """A real verity tree's parameters (data: 16 blocks)."""
    work = tmp_path_factory.mktemp("verity")
    (work / "root.img").write_bytes(bytes(range(256)) * 256)
    return build_hash_tree(work / "root.img", work / "hash.img", salt=b"kiln-test-salt", uuid=uuid.UUID(int=7))


@pytest.fixture
def scratch(tmp_path: Path, vres: VerityResult) -> Scratch:
    root = tmp_path / "root"
    for d in ("bin", "usr/sbin", "etc/kiln", "proc/sys/kernel/random", "sys/class/block", "dev", "run", "tmp",
              "sysroot/etc", "sysroot/var/log", "sysroot/usr/share/kiln", "sysroot/local", "sysroot/tmp", "fake"):
        (root / d).mkdir(parents=True)
    shutil.copy(which("busybox"), root / "bin/busybox")
    (root / "init").write_bytes(INIT.read_bytes())
    (root / "init").chmod(0o755)
    (root / "etc/kiln/modules").write_text("")  # see the module docstring
    for name in STANDINS:
        (root / "usr/sbin" / name).write_text(FAKE)
        (root / "usr/sbin" / name).chmod(0o755)
    (root / "fake/calls").touch()
    os.mkfifo(root / "dev/console")
    (root / "proc/sys/kernel/random/uuid").write_text("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n")
    (root / "sysroot/etc/hostname").write_text("kiln\n")
    (root / "sys/class/block/vda").mkdir()
    (root / "sys/class/block/vda/uevent").write_text("MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n")
    for spec in layout.PARTITIONS:
        dev = device(spec.name).removeprefix("/dev/")
        n = layout.part_number(spec.name)
        (root / "sys/class/block" / dev).mkdir()
        (root / "sys/class/block" / dev / "uevent").write_text(
            f"MAJOR=254\nMINOR={n}\nDEVNAME={dev}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME={spec.name}\n")
        # Block major 0 is no driver's: opening the node fails (ENXIO), so the init's
        # ext4 probe (od) reads nothing and this machine's disks are never touched.
        os.mknod(root / "dev" / dev, stat.S_IFBLK | 0o600, os.makedev(0, 200 + n))
    return Scratch(root, vres, kernel_cmdline("A", vres))


# --- the boot that works --------------------------------------------------------------------


@pytest.mark.parametrize("slot", ["A", "B"])
def test_opens_the_slots_root_with_dm_table_and_hands_over(scratch: Scratch, slot: str) -> None:
    """The table is dm_table()'s for this slot's partitions and root hash, with
    restart_on_corruption; the root is mounted from it, read-only, then switch_root."""
    scratch.cmdline = kernel_cmdline(slot, scratch.vres)
    out = scratch.run()
    assert out.returncode == 0, (out.console, out.calls)
    assert not out.called("reboot") and "FATAL" not in out.console
    want = dm_table(device(f"KILN-ROOT-{slot}"), device(f"KILN-HASH-{slot}"), scratch.vres)
    assert want.endswith(" 1 restart_on_corruption")
    assert f" sha256 {scratch.vres.root_hash} {scratch.vres.salt} " in want
    create = ["dmsetup", "create", "kiln-root", "--readonly", "--noudevsync", "--table", want]
    assert out.called("dmsetup")[0] == create
    opened = out.index(lambda c: c == create)
    mounted = out.index(lambda c: c[:2] == ["mount", "-t"] and c[-1] == "/sysroot")
    assert out.calls[mounted] == ["mount", "-t", "erofs", "-o", "ro", "/dev/mapper/kiln-root", "/sysroot"]
    assert opened < mounted
    assert out.calls[-1] == ["switch_root", "/sysroot", "/usr/lib/systemd/systemd"]
    # First boot: DATA and PRIVATE get their filesystems (no ext4 magic on the nodes).
    assert [c[-1] for c in out.called("mke2fs")] == [device("KILN-DATA"), device("KILN-PRIVATE")]
    assert (scratch.root / "run/kiln-etc/hostname").read_text() == "kiln\n"


def test_the_build_writes_dm_tables_line_for_the_init(vres: VerityResult) -> None:
    """One source of truth: kiln.cfg carries dm_table() itself (',' for ' ')."""
    arg = bootloader.verity_arg(vres)
    assert arg == "kiln.verity=" + dm_table("@ROOT@", "@HASH@", vres).replace(" ", ",")
    assert f'set KILN_VERITY="{arg}"' in bootloader.slot_cfg(load_variant(), vres)


# --- every failure ends in a reboot -------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    template: str  # the fail "..." message exactly as the init spells it
    message: str  # what it says in this case
    setup: Callable[[Scratch], None]


def _cmdline(edit: Callable[[str], str]) -> Callable[[Scratch], None]:
    def setup(s: Scratch) -> None:
        s.cmdline = edit(s.cmdline)
    return setup


def _failing(*rules: str) -> Callable[[Scratch], None]:
    def setup(s: Scratch) -> None:
        s.fail.extend(rules)
    return setup


def _module(s: Scratch) -> None:
    """A module the real insmod cannot load (as kiln.build.initramfs lists them)."""
    (s.root / "etc/kiln/modules").write_text(MODULE + "\n")


def _without_restart(s: Scratch) -> None:
    table = dm_table("@ROOT@", "@HASH@", s.vres, restart_on_corruption=False)
    s.cmdline = re.sub(r"kiln\.verity=\S+", "kiln.verity=" + table.replace(" ", ","), s.cmdline)


FAILURES = {
    "slot-missing": Failure("kiln.slot must be A or B, got '$SLOT'", "kiln.slot must be A or B, got ''",
                            _cmdline(lambda c: c.replace(" kiln.slot=A", ""))),
    "slot-unknown": Failure("kiln.slot must be A or B, got '$SLOT'", "kiln.slot must be A or B, got 'C'",
                            _cmdline(lambda c: c.replace("kiln.slot=A", "kiln.slot=C"))),
    "verity-missing": Failure("no dm-verity table (kiln.verity=) on the kernel command line",
                              "no dm-verity table (kiln.verity=) on the kernel command line",
                              _cmdline(lambda c: re.sub(r" kiln\.verity=\S+", "", c))),
    "verity-old-style": Failure("no dm-verity table (kiln.verity=) on the kernel command line",
                                "no dm-verity table (kiln.verity=) on the kernel command line",
                                _cmdline(lambda c: re.sub(r"kiln\.verity=\S+", "kiln.roothash=" + "ab" * 32, c))),
    "verity-no-restart": Failure("the dm-verity table does not restart on corruption",
                                 "the dm-verity table does not restart on corruption", _without_restart),
    "module": Failure("cannot load module $mod", f"cannot load module {MODULE}", _module),
    "root-missing": Failure("partition KILN-ROOT-$SLOT not found", "partition KILN-ROOT-A not found",
                            lambda s: s.remove_partition("KILN-ROOT-A")),
    "root-no-node": Failure("partition KILN-ROOT-$SLOT not found", "partition KILN-ROOT-A not found",
                            lambda s: s.remove_node("KILN-ROOT-A")),
    "hash-missing": Failure("partition KILN-HASH-$SLOT not found", "partition KILN-HASH-A not found",
                            lambda s: s.remove_partition("KILN-HASH-A")),
    "data-missing": Failure("partition KILN-DATA not found", "partition KILN-DATA not found",
                            lambda s: s.remove_partition("KILN-DATA")),
    "private-missing": Failure("partition KILN-PRIVATE not found", "partition KILN-PRIVATE not found",
                               lambda s: s.remove_partition("KILN-PRIVATE")),
    "verity-refused": Failure("dm-verity refused slot $SLOT's root", "dm-verity refused slot A's root",
                              _failing("dmsetup create *")),
    "root-mount": Failure("cannot mount slot $SLOT's root", "cannot mount slot A's root",
                          _failing("mount -t erofs *")),
    "data-mkfs": Failure("mke2fs $2 failed", "mke2fs KILN-DATA failed", _failing("mke2fs * KILN-DATA *")),
    "data-mount": Failure("cannot mount $2 ($1)", f"cannot mount KILN-DATA ({device('KILN-DATA')})",
                          _failing("mount -t ext4 * /sysroot/local")),
    "var-bind": Failure("cannot bind /var", "cannot bind /var", _failing("mount -o bind *")),
    "private-mkfs": Failure("mke2fs $2 failed", "mke2fs KILN-PRIVATE failed", _failing("mke2fs * KILN-PRIVATE *")),
    "private-mount": Failure("cannot mount $2 ($1)", f"cannot mount KILN-PRIVATE ({device('KILN-PRIVATE')})",
                             _failing("mount -t ext4 * /sysroot/var/lib/kiln")),
    "tmp": Failure("cannot mount /tmp", "cannot mount /tmp", _failing("mount * /sysroot/tmp")),
    "etc-tmpfs": Failure("cannot mount /etc tmpfs", "cannot mount /etc tmpfs", _failing("mount * /run/kiln-etc")),
    "etc-copy": Failure("cannot populate /etc", "cannot populate /etc",
                        lambda s: shutil.rmtree(s.root / "sysroot/etc")),
    "etc-move": Failure("cannot move /etc", "cannot move /etc", _failing("mount --move /run/kiln-etc *")),
}


@pytest.mark.parametrize("case", list(FAILURES), ids=list(FAILURES))
def test_every_failure_reboots(scratch: Scratch, case: str) -> None:
    failure = FAILURES[case]
    failure.setup(scratch)
    out = scratch.run()
    out.assert_rebooted(failure.message)
    if case in ("slot-missing", "slot-unknown", "verity-missing", "verity-old-style", "verity-no-restart", "module",
                "root-missing", "root-no-node", "hash-missing", "data-missing", "private-missing", "verity-refused"):
        assert not [c for c in out.called("mount") if "/sysroot" in c], "the root was mounted"


@pytest.mark.parametrize("case", ["verity-refused", "root-mount", "verity-no-restart"])
def test_a_failed_reboot_still_never_boots(scratch: Scratch, case: str) -> None:
    """If `reboot -f` returns, the init asks the kernel (sysrq b), then exits: PID 1 exiting
    panics the kernel, and the variant's panic= restarts the machine."""
    FAILURES[case].setup(scratch)
    scratch.reboot_fails = True
    out = scratch.run()
    assert f"kiln-init: FATAL: {FAILURES[case].message}\n" in out.console
    assert out.calls[-1] == ["reboot", "-f"], out.calls[-3:]
    assert out.sysrq == "b\n"
    assert out.returncode != 0 and not out.called("switch_root")
    assert any(re.fullmatch(r"panic=[1-9][0-9]*", a) for a in load_variant().cmdline)


def test_a_failed_switch_root_leaves_no_shell(scratch: Scratch) -> None:
    """switch_root is exec'd: if it fails, PID 1 exits (a panic, then panic= restarts)."""
    scratch.fail.append("switch_root *")
    out = scratch.run()
    assert out.calls[-1][0] == "switch_root" and out.returncode != 0
    assert any(re.fullmatch(r"panic=[1-9][0-9]*", a) for a in load_variant().cmdline)


def test_every_check_in_the_init_has_a_failure_case() -> None:
    """A new `|| fail` in the init needs a case above: the list is the script's own."""
    script = INIT.read_text()
    in_script = set(re.findall(r'\bfail "([^"]*)"', script))
    assert in_script == {f.template for f in FAILURES.values()}
    assert "exec sh" not in script and "/bin/sh" not in script.replace("#!/bin/busybox sh", "")
