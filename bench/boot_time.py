#!/usr/bin/env python3
"""Boot time: QEMU start to a marker on the serial console, Kiln against two anchors.

Measured side by side in one run, at each vCPU count (--cpus, default 1,2), N runs each
(--runs, default 3), medians reported. QEMU is always TCG (no usable KVM here). Kiln and
the general-purpose system are each booted both ways, so firmware cost is compared fairly:

- floor:           the same kernel as Kiln's image with a tiny busybox initramfs whose /init
                   prints `floor: ready` and powers off; direct kernel boot (-kernel/-initrd)
                   with SeaBIOS (no OVMF, no GRUB).
- kiln:            the default image (built here unless --image), booted with kiln.vm.qemu's
                   Vm/VmConfig(accel="tcg", overlay=True) through OVMF -> GRUB -> initramfs
                   -> systemd, to `kiln: ready ...`. Every overlay boot is a first boot (the
                   initramfs creates DATA and PRIVATE), so a second boot of the same disk
                   after a clean power-off is measured too (kiln-2nd).
- kiln-direct:     the same disk, direct kernel boot (SeaBIOS) of slot A's vmlinuz and
                   initrd.img from its BOOT partition with the command line GRUB would give
                   (kiln.cfg's, kiln.slot=A, the kiln.verity= table); kiln-direct-2nd boots
                   the disk kiln's first boot left.
- general:         a general-purpose Debian server (bench/baseline.py: debootstrap minbase +
                   systemd, udev, python3, containerd, runc, openssh-server, ifupdown,
                   isc-dhcp-client, the same kernel's modules) on a GPT disk (ESP + ext4
                   root), direct kernel boot of the same kernel and command line with a
                   busybox initramfs, to `general: ready` printed once multi-user.target is
                   reached. The root image is built once, cached under bench/.cache/.
- general-grub:    the same disk through OVMF -> Kiln's GRUB EFI image, whose grub.cfg
                   loads that kernel, initramfs and command line, booted as kiln is.

The machine options are those of Kiln's VmConfig.argv (q35, -cpu max, -m 1024, virtio disk,
virtio-net, virtio-rng); the direct boots drop only the firmware flash.

A timeline run (not part of the medians; --no-timeline skips it) boots Kiln (OVMF + GRUB)
and the general image (direct) once more with kernel and systemd messages on the console,
and reports the phases and the slowest units. Writes bench/results/boot_time.json. Run as
root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _bench as B
import baseline as BL
from _bench import Boot, boot_vm, clean_workdir, kiln_milestones, power_off

from kiln.build.kernel import Kernel
from kiln.build.pipeline import BuildOptions, build
from kiln.core.progress import Progress
from kiln.image import gpt, layout
from kiln.variant import Variant, load_variant
from kiln.vm.qemu import READY_RE, Vm, VmConfig

# The timeline run swaps Kiln's quiet console settings for these.
QUIET_ARGS = re.compile(r"^(quiet|loglevel=\S*|systemd\.show_status=\S*)$")
VERBOSE_ARGS = (
    "printk.time=1",
    "printk.devkmsg=on",
    "systemd.log_target=kmsg",
    "systemd.log_level=info",
    "systemd.show_status=no",
)
TIMEOUTS = {"floor": 90.0, "kiln": 420.0, "general": 420.0}  # by the system's first word
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}

# Direct boots are split at SeaBIOS's last line (Kiln's milestones: _bench.kiln_milestones).
SEABIOS_HANDOFF_RE = r"Booting from ROM"  # SeaBIOS jumps to the option ROM that loads -kernel


# ------------------------------------------------------------------ QEMU
def direct_argv(
    workdir: Path, cpus: int, kernel: Path, initrd: Path, append: str, disk: Path | None
) -> list[str]:
    """Kiln's VmConfig.argv without the firmware flash (SeaBIOS), plus direct kernel boot.

    With `disk`, a qcow2 overlay of it is the virtio disk (as VmConfig(overlay=True) does)."""
    overlay = workdir / "overlay.qcow2"
    if disk is not None:
        overlay.unlink(missing_ok=True)
        B.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", disk.resolve(), overlay]
        )
    cfg = VmConfig(disk or overlay, workdir, cpus=cpus, accel="tcg", overlay=True)
    argv = cfg.argv(overlay, workdir / "unused-vars.fd")
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "-drive" and (argv[i + 1].startswith("if=pflash") or disk is None):
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return [*out, "-kernel", str(kernel), "-initrd", str(initrd), "-append", append]


def boot_direct(
    system: str, argv: list[str], pattern: str, cpus: int, run: int, log_path: Path
) -> tuple[Boot, B.SerialClock]:
    """A direct kernel boot to the first match of the regular expression `pattern`."""
    b = Boot(system, cpus, run, loadavg=os.getloadavg()[0])
    with B.direct_vm(argv) as vm:
        try:
            b.marker_s = vm.wait_for(pattern, TIMEOUTS[system.split("-")[0]])
        except (TimeoutError, RuntimeError) as e:
            b.error = str(e)
        clock = vm.clock
    log_path.write_text(clock.text())
    handoff = clock.first(SEABIOS_HANDOFF_RE)
    b.milestones = {
        "kernel_handoff": handoff,
        "marker": b.marker_s,
        "firmware_s": handoff,
        "kernel_to_marker_s": None
        if handoff is None or b.marker_s is None
        else b.marker_s - handoff,
    }
    return b, clock


# ------------------------------------------------------------------ Kiln image
def build_kiln(variant: Variant, dest: Path) -> tuple[Path, str | None]:
    B.log(f"building the {variant.name} image (kiln.build.pipeline.build, debug_console=False)")
    t0 = time.monotonic()
    res = build(BuildOptions(variant, dest, debug_console=False), Progress(quiet=True))
    B.log(f"built in {time.monotonic() - t0:.0f} s: {res.disk}")
    return res.disk, kernel_release(res.disk)


def kernel_release(disk: Path) -> str | None:
    manifest = disk.parent / "artifacts" / "manifest.json"
    if manifest.is_file():
        value = json.loads(manifest.read_text()).get("kernel")
        return str(value) if value else None
    return None


def boot_a(disk: Path) -> str:
    """mtools' name for slot A's BOOT partition inside `disk` (found with kiln.image.gpt)."""
    name = layout.part_name("boot", "A")
    with open(disk, "rb") as f:
        table = gpt.read_gpt(f, disk.stat().st_size)
    for part in table.partitions:
        if part.name == name:
            return f"{disk}@@{part.offset}"
    raise SystemExit(f"{disk}: no partition {name}")


CFG_LINE = re.compile(r'^set (KILN_\w+)="([^"]*)"$', re.MULTILINE)


@dataclass(frozen=True)
class DirectKiln:
    """What GRUB loads for slot A, to start the same kernel by direct kernel boot."""

    vmlinuz: Path
    initrd: Path
    append: str  # as grub.cfg builds it: $KILN_CMDLINE kiln.slot=A $KILN_VERITY


def direct_kiln(disk: Path, dest: Path) -> DirectKiln:
    """Slot A's kernel and initramfs copied out of `disk`'s BOOT partition, with the command
    line from its kiln.cfg (the unsigned image: no kiln.bootsig)."""
    img = boot_a(disk)
    cfg = dict(CFG_LINE.findall(B.run(["mtype", "-i", img, "::kiln.cfg"], env=MTOOLS_ENV).stdout))
    if not cfg.get("KILN_CMDLINE") or not cfg.get("KILN_VERITY"):
        raise SystemExit(f"{disk}: kiln.cfg lacks KILN_CMDLINE or KILN_VERITY; direct boot needs updating")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinuz", "initrd.img"):
        B.run(["mcopy", "-o", "-i", img, f"::{name}", dest / name], env=MTOOLS_ENV)
    append = f"{cfg['KILN_CMDLINE']} kiln.slot=A {cfg['KILN_VERITY']}"
    return DirectKiln(dest / "vmlinuz", dest / "initrd.img", append)


def verbose_copy(disk: Path, out: Path) -> None:
    """A copy of the image whose slot A boots with kernel and systemd messages on the console.

    Only kiln.cfg on BOOT-A changes (the verity-protected root is untouched)."""
    B.run(["cp", "--sparse=always", disk, out])
    img = boot_a(out)
    cfg = B.run(["mtype", "-i", img, "::kiln.cfg"], env=MTOOLS_ENV).stdout

    def swap(m: re.Match[str]) -> str:
        args = [a for a in m.group(1).split() if not QUIET_ARGS.match(a)]
        return f'set KILN_CMDLINE="{" ".join([*args, *VERBOSE_ARGS])}"'

    new, n = re.subn(r'set KILN_CMDLINE="([^"]*)"', swap, cfg)
    if n != 1:
        raise SystemExit("kiln.cfg has no KILN_CMDLINE line; the timeline run needs updating")
    tmp = out.with_suffix(".cfg")
    tmp.write_text(new)
    B.run(["mcopy", "-o", "-i", img, tmp, "::kiln.cfg"], env=MTOOLS_ENV)
    tmp.unlink()


# ------------------------------------------------------------------ timeline
UNIT_RE = r"([\w@.:\\-]+\.(?:service|socket|target|mount|path|timer|device|slice|swap))"


def timeline(clock: B.SerialClock, marker: str | re.Pattern[str]) -> dict[str, Any]:
    """Phases and the slowest units from a verbose boot's console."""
    starting: dict[str, float] = {}
    spans: list[tuple[str, float, float]] = []
    for t, line in clock.stamped():
        m = re.search(r"systemd\[1\]: Starting " + UNIT_RE, line)
        if m:
            starting.setdefault(m.group(1), t)
            continue
        m = re.search(
            r"systemd\[1\]: (?:Started|Finished|Failed to start|Mounted) " + UNIT_RE, line
        )
        if m and m.group(1) in starting:
            spans.append((m.group(1), starting[m.group(1)], t))
    phases = {
        "kernel_first_line": clock.first(r"\] Linux version"),
        "run_init": clock.first(r"Run /init as init process"),
        "systemd_start": clock.first(r"systemd\[1\]: systemd \d+"),
        "default_target_queued": clock.first(r"Queued start job for default target"),
        "sysinit_target": clock.first(r"Reached target sysinit\.target"),
        "basic_target": clock.first(r"Reached target basic\.target"),
        "network_target": clock.first(r"Reached target network\.target"),
        "multi_user_target": clock.first(r"Reached target multi-user\.target"),
        "marker": clock.first(marker),
    }
    top = sorted(spans, key=lambda s: s[2] - s[1], reverse=True)[:12]
    cpu: dict[str, float] = {}
    for _t, line in clock.stamped():  # systemd reports this for units that have stopped
        m = re.search(r"systemd\[1\]: " + UNIT_RE + r": Consumed ([0-9.]+)s CPU time", line)
        if m:
            cpu[m.group(1)] = float(m.group(2))
    return {
        "phases": {k: None if v is None else round(v, 2) for k, v in phases.items()},
        "slowest_units": [
            {"unit": u, "start": round(a, 2), "end": round(z, 2), "seconds": round(z - a, 2)}
            for u, a, z in top
        ],
        "modprobe_units": sorted({u for u, _a, _z in spans if u.startswith("modprobe@")}),
        "cpu_seconds_of_finished_units": cpu,
    }


# ------------------------------------------------------------------ the benchmark
@dataclass
class Setup:
    variant: Variant
    kiln_disk: Path
    kiln_direct: DirectKiln
    kernel: Kernel
    floor_initrd: Path
    general: BL.General
    general_disk: Path  # GPT: ESP with GRUB, ext4 root; booted both ways
    general_append: str
    busybox: str


def prepare(args: argparse.Namespace, work: Path) -> Setup:
    variant = load_variant(args.variant)
    if args.image:
        disk = args.image / "disk.img" if args.image.is_dir() else args.image
        if not disk.is_file():
            raise SystemExit(f"no disk image at {disk}")
        release = kernel_release(disk)
    else:
        disk, release = build_kiln(variant, work / "kiln-image")
    k = BL.unpack_kernel(BL.find_kernel_deb(release))
    bb, bb_source = BL.busybox()
    initrd = work / "floor-initrd.img"
    BL.floor_initrd(initrd, bb)
    general = BL.general_image(k, bb, bb_source)
    append = " ".join([*variant.cmdline, f"root={BL.GENERAL_ROOT}", "rw"])
    B.log("general-purpose GPT disk: ESP with Kiln's GRUB EFI image, the kernel and initramfs; ext4 root")
    gdisk = BL.general_disk(general, k, append, variant.partitions.efi, work / "general.img", work / "general-esp")
    return Setup(variant, disk, direct_kiln(disk, work / "kiln-direct"), k, initrd, general, gdisk, append,
                 bb_source)


def measure(s: Setup, cpus: int, run: int, work: Path, logs: Path, second_boot: bool) -> list[Boot]:
    """One round: every system once at `cpus`, direct and firmware boots interleaved."""
    tag = f"{cpus}cpu-run{run}"
    kd = s.kiln_direct
    general, kiln = re.escape(BL.GENERAL_MARKER), READY_RE.pattern

    def direct(system: str, kernel: Path, initrd: Path, append: str, disk: Path | None, pattern: str) -> Boot:
        argv = direct_argv(clean_workdir(work / "vm"), cpus, kernel, initrd, append, disk)
        return boot_direct(system, argv, pattern, cpus, run, logs / f"{system}-{tag}.log")[0]

    def firmware(system: str, disk: Path, pattern: str, after: Callable[[Vm], str | None] | None = None) -> Boot:
        cfg = VmConfig(disk, clean_workdir(work / "vm"), cpus=cpus, accel="tcg", overlay=True)
        b, clock = boot_vm(system, cfg, pattern, cpus, run, logs / f"{system}-{tag}.log", after=after)
        b.milestones = kiln_milestones(clock, b.marker_s)
        return b

    out = [
        direct("floor", s.kernel.vmlinuz, s.floor_initrd, "console=ttyS0 quiet", None,
               re.escape(BL.FLOOR_MARKER)),
        direct("general", s.kernel.vmlinuz, s.general.initrd, s.general_append, s.general_disk, general),
        direct("kiln-direct", kd.vmlinuz, kd.initrd, kd.append, s.kiln_disk, kiln),
        firmware("general-grub", s.general_disk, general),
    ]
    first = firmware("kiln", s.kiln_disk, kiln, after=power_off if second_boot else None)
    out.append(first)
    if second_boot and first.error is None:  # then on the disk that first boot left, both ways
        booted = work / "kiln-booted-once.img"
        B.run(["qemu-img", "convert", "-O", "raw", work / "vm" / "overlay.qcow2", booted], timeout=600)
        out.append(firmware("kiln-2nd", booted, kiln))
        out.append(direct("kiln-direct-2nd", kd.vmlinuz, kd.initrd, kd.append, booted, kiln))
        for b in out[-2:]:
            b.note = f"second boot of the first boot's disk ({first.note})"
        booted.unlink()
    for x in out:
        what = f"{x.marker_s:.2f} s" if x.marker_s is not None else f"FAILED: {x.error}"
        B.log(f"  {x.system:<15} {cpus} vCPU run {run}: {what}")
    return out


def timeline_runs(s: Setup, cpus: int, work: Path, logs: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"cpus": cpus, "kernel_args": list(VERBOSE_ARGS)}
    verbose = work / "kiln-verbose.img"
    verbose_copy(s.kiln_disk, verbose)
    wd = clean_workdir(work / "vm")
    cfg = VmConfig(verbose, wd, cpus=cpus, accel="tcg", overlay=True)
    b, clock = boot_vm("kiln-timeline", cfg, READY_RE, cpus, 0, logs / "timeline-kiln.log")
    res["kiln"] = {
        **timeline(clock, READY_RE),
        **kiln_milestones(clock, b.marker_s),
        "error": b.error,
    }
    verbose.unlink()
    wd = clean_workdir(work / "vm")
    append = " ".join([*(a for a in s.general_append.split() if not QUIET_ARGS.match(a)), *VERBOSE_ARGS])
    argv = direct_argv(wd, cpus, s.kernel.vmlinuz, s.general.initrd, append, s.general_disk)
    b, clock = boot_direct(
        "general-timeline", argv, re.escape(BL.GENERAL_MARKER), cpus, 0, logs / "timeline-general.log"
    )
    res["general"] = {**timeline(clock, re.escape(BL.GENERAL_MARKER)), "error": b.error}
    return res


SYSTEMS = ("floor", "kiln", "kiln-2nd", "general", "general-grub", "kiln-direct", "kiln-direct-2nd")
# Like for like: Kiln's first and second boot against the general-purpose system booted the same way.
PATHS = {"grub": ("kiln", "kiln-2nd", "general-grub"), "direct": ("kiln-direct", "kiln-direct-2nd", "general")}


def summarize(boots: list[Boot], cpus_list: list[int]) -> dict[str, Any]:
    def med(cpus: int, system: str, key: str | None = None) -> float | None:
        vals: list[float | None] = []
        for b in boots:
            if b.system == system and b.cpus == cpus and b.error is None:
                vals.append(b.marker_s if key is None else (b.milestones or {}).get(key))
        return B.median(vals)

    out: dict[str, Any] = {}
    for cpus in cpus_list:
        m: dict[str, Any] = {name: med(cpus, name) for name in SYSTEMS}
        for name in SYSTEMS:
            for key in ("kernel_to_marker_s", "firmware_s", "grub_s"):
                m[f"{name}_{key}"] = med(cpus, name, key)
        m["failures"] = sum(1 for b in boots if b.cpus == cpus and b.error is not None)
        k_kern, g_kern, f_kern = (
            m["kiln_kernel_to_marker_s"],
            m["general_kernel_to_marker_s"],
            m["floor_kernel_to_marker_s"],
        )
        above_kiln = None if k_kern is None or f_kern is None else k_kern - f_kern
        above_gen = None if g_kern is None or f_kern is None else g_kern - f_kern
        m["ratios"] = {
            "kiln/general": B.ratio(m["kiln"], m["general"]),
            "kiln-2nd/general": B.ratio(m["kiln-2nd"], m["general"]),
            "kernel->marker kiln/general": B.ratio(k_kern, g_kern),
            "kernel->marker kiln-2nd/general": B.ratio(m["kiln-2nd_kernel_to_marker_s"], g_kern),
            "kiln/floor": B.ratio(m["kiln"], m["floor"]),
            "general/floor": B.ratio(m["general"], m["floor"]),
            "above-floor kiln/general": B.ratio(above_kiln, above_gen),
        }
        # kiln / general booted the same way: {path: {first|second: {whole|kernel: ratio}}}
        m["like_for_like"] = {
            path: {
                boot: {"whole": B.ratio(m[k], m[g]),
                       "kernel": B.ratio(m[f"{k}_kernel_to_marker_s"], m[f"{g}_kernel_to_marker_s"])}
                for boot, k in (("first", first), ("second", second))
            }
            for path, (first, second, g) in PATHS.items()
        }
        m["above_floor_s"] = {"kiln": above_kiln, "general": above_gen}
        r = m["ratios"]["kiln/general"]
        m["target"] = {"kiln/general": r, "max": 0.5, "ok": r is not None and r <= 0.5}
        out[str(cpus)] = m
    return out


def report(
    summary: dict[str, Any], runs: int, tl: dict[str, Any] | None, meta: dict[str, Any]
) -> str:
    cpus = list(summary)
    head = ["", *(f"{c} vCPU" for c in cpus)]

    def row(label: str, get: Callable[[dict[str, Any]], float | None], kind: str = "s") -> list[str]:
        return [label, *(B.fmt_ratio(get(summary[c])) if kind == "r" else B.fmt_s(get(summary[c]), 2)
                         for c in cpus)]

    def system(label: str, name: str, fw: str) -> list[list[str]]:
        rows = [row(f"{label}: QEMU -> marker", lambda m: m[name]),
                row(f"  {fw} (-> {'GRUB' if fw == 'OVMF' else 'kernel'})", lambda m: m[f"{name}_firmware_s"])]
        if fw == "OVMF":
            rows.append(row("  GRUB (-> kernel)", lambda m: m[f"{name}_grub_s"]))
        return [*rows, row("  kernel -> marker", lambda m: m[f"{name}_kernel_to_marker_s"])]

    def like(path: str, boot: str, what: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda m: m["like_for_like"][path][boot][what]

    rows = [
        *system("floor", "floor", "SeaBIOS"),
        *system("kiln, OVMF + GRUB, first boot", "kiln", "OVMF"),
        *system("kiln, OVMF + GRUB, second boot", "kiln-2nd", "OVMF"),
        *system("general, OVMF + GRUB", "general-grub", "OVMF"),
        *system("kiln, direct, first boot", "kiln-direct", "SeaBIOS"),
        *system("kiln, direct, second boot", "kiln-direct-2nd", "SeaBIOS"),
        *system("general, direct", "general", "SeaBIOS"),
        ["", *("" for _ in cpus)],
        *(row(f"kiln / general, {path}, {boot} boot, {what}", like(path, boot, what), "r")
          for path in PATHS for boot in ("first", "second") for what in ("whole", "kernel")),
        row("kiln (OVMF + GRUB) / general (direct)", lambda m: m["ratios"]["kiln/general"], "r"),
        row("above the floor: kiln / general", lambda m: m["ratios"]["above-floor kiln/general"], "r"),
        row("kiln / floor", lambda m: m["ratios"]["kiln/floor"], "r"),
        row("general / floor", lambda m: m["ratios"]["general/floor"], "r"),
        [
            "target: kiln / general <= 0.50",
            *("ok" if summary[c]["target"]["ok"] else "MISSED" for c in cpus),
        ],
    ]
    out = [
        f"boot time, QEMU start -> serial marker (TCG, -m 1024), median of {runs} run(s)",
        "",
        B.table(rows, head),
        "",
        "'whole' is QEMU start -> marker, 'kernel' kernel -> marker: from the firmware's hand-over",
        "(GRUB's last line under OVMF, SeaBIOS's 'Booting from ROM' for direct boots). The target",
        "compares kiln through OVMF + GRUB with general booted directly; 'above the floor'",
        "subtracts the floor's kernel -> marker from both.",
    ]
    fails = sum(summary[c]["failures"] for c in cpus)
    if fails:
        out.append(f"\n{fails} boot(s) failed: see per_boot in the JSON and bench/.cache/logs/")
    out.append(
        f"\ngeneral-purpose image: {meta.get('packages')} packages, "
        f"{B.fmt_mib(meta.get('tree_bytes'))} of files, {meta.get('setuid_files')} setuid files"
    )
    if tl:
        for name in ("kiln", "general"):
            t = tl.get(name) or {}
            out += [
                "",
                f"timeline, {name}, {tl['cpus']} vCPU, verbose console (not in the medians):",
            ]
            ph = [f"{k} {v:.1f}" for k, v in t.get("phases", {}).items() if v is not None]
            out += ["  " + ", ".join(ph[i : i + 4]) for i in range(0, len(ph), 4)]
            for u in t.get("slowest_units", [])[:8]:
                out.append(
                    f"  {u['seconds']:6.2f} s  {u['unit']}  ({u['start']:.2f} -> {u['end']:.2f})"
                )
            if t.get("error"):
                out.append(f"  error: {t['error']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--runs", type=int, default=3, help="boots per system and vCPU count (default 3)"
    )
    ap.add_argument("--cpus", default="1,2", help="comma-separated vCPU counts (default 1,2)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    ap.add_argument(
        "--image", type=Path, help="a Kiln disk image or build directory (default: build one)"
    )
    ap.add_argument("--variant", help="variant to build and whose kernel command line to use")
    ap.add_argument(
        "--no-second-boot", action="store_true", help="skip Kiln's second-boot measurement"
    )
    ap.add_argument("--no-timeline", action="store_true", help="skip the verbose timeline boots")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("boot_time.py must run as root (it builds images)", file=sys.stderr)
        return 2
    try:
        cpus_list = [int(c) for c in args.cpus.split(",") if c.strip()]
    except ValueError:
        ap.error("--cpus takes numbers such as 1,2")
    if args.runs < 1 or not cpus_list or min(cpus_list) < 1:
        ap.error("--runs and --cpus must be positive")
    info = B.machine()
    t0 = time.monotonic()
    logs = B.CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    B.CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="boot-", dir=B.CACHE))
    boots: list[Boot] = []
    tl: dict[str, Any] | None = None
    try:
        s = prepare(args, work)
        for run in range(args.runs):
            for cpus in cpus_list:
                B.log(f"run {run + 1}/{args.runs}, {cpus} vCPU")
                boots += measure(s, cpus, run, work, logs, not args.no_second_boot)
        if not args.no_timeline:
            B.log(f"timeline boots (verbose console), {cpus_list[0]} vCPU")
            tl = timeline_runs(s, cpus_list[0], work, logs)
    finally:
        B.remove_tree(work)
    summary = summarize(boots, cpus_list)
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "benchmark": "boot_time",
        "runs": args.runs,
        "cpus": cpus_list,
        "accel": "tcg",
        "memory_mib": 1024,
        "variant": s.variant.name,
        "kiln_image": str(s.kiln_disk) if args.image else "built for this run",
        "kernel": s.kernel.package.deb.name,
        "busybox": s.busybox,
        "general": s.general.meta,
        "general_append": s.general_append,
        "kiln_direct_append": s.kiln_direct.append,
        "machine": info,
        "wall_seconds": round(time.monotonic() - t0, 1),
        "summary": summary,
        "timeline": tl,
        "per_boot": [b.to_json() for b in boots],
    }
    path = B.write_result("boot_time", result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(report(summary, args.runs, tl, s.general.meta))
        print(
            f"\nmachine: {info['cpus']} x {info['cpu']}, load {info['loadavg_at_start']} -> "
            f"{info['loadavg_at_end']}; serial logs in {logs.relative_to(B.REPO)}; "
            f"wrote {path.relative_to(B.REPO)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
