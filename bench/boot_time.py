#!/usr/bin/env python3
"""Boot time: QEMU start to a marker on the serial console, Kiln against two anchors.

Measured side by side in one run, at each vCPU count (--cpus, default 1,2), N runs each
(--runs, default 3), medians reported. QEMU is always TCG (no usable KVM here):

- floor:    the same kernel as Kiln's image with a tiny busybox initramfs whose /init
            prints `floor: ready` and powers off; direct kernel boot (-kernel/-initrd)
            with SeaBIOS (no OVMF, no GRUB).
- kiln:     the default image (built here unless --image), booted with kiln.vm.qemu's
            Vm/VmConfig(accel="tcg", overlay=True) through OVMF -> GRUB -> initramfs ->
            systemd, to `kiln: ready ...`. Every overlay boot is a first boot (the
            initramfs creates DATA and PRIVATE), so a second boot of the same disk after a
            clean power-off is measured too (kiln-2nd).
- general:  a general-purpose Debian server (debootstrap minbase + systemd, udev, python3,
            containerd, runc, openssh-server, ifupdown, isc-dhcp-client, the same kernel's
            modules) in an ext4 image, direct kernel boot of the same kernel and command
            line with a busybox initramfs, to `general: ready` printed once
            multi-user.target is reached. Built once, cached under bench/.cache/.

The machine options are those of Kiln's VmConfig.argv (q35, -cpu max, -m 1024, virtio disk,
virtio-net, virtio-rng); the direct-boot systems drop only the firmware flash.

A timeline run (not part of the medians; --no-timeline skips it) boots Kiln and the general
image once more with kernel and systemd messages on the console, and reports the phases
and the slowest units. Writes bench/results/boot_time.json. Run as root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _bench as B
from _bench import Boot, boot_vm, clean_workdir, kiln_milestones, power_off

from kiln.build.apt import Package
from kiln.build.kernel import Kernel
from kiln.build.pipeline import BuildOptions, build, default_cache
from kiln.core.progress import Progress
from kiln.variant import Variant, load_variant
from kiln.vm.qemu import READY_RE, VmConfig

FLOOR_MARKER = "floor: ready"
GENERAL_MARKER = "general: ready"
GENERAL_INCLUDE = (
    "systemd,systemd-sysv,udev,python3,containerd,runc,openssh-server,ifupdown,isc-dhcp-client"
)
GENERAL_FORMAT = 1  # bump when the way the general-purpose image is made changes
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
MIRROR = "http://deb.debian.org/debian"
# The timeline run swaps Kiln's quiet console settings for these.
QUIET_ARGS = re.compile(r"^(quiet|loglevel=\S*|systemd\.show_status=\S*)$")
VERBOSE_ARGS = (
    "printk.time=1",
    "printk.devkmsg=on",
    "systemd.log_target=kmsg",
    "systemd.log_level=info",
    "systemd.show_status=no",
)
TIMEOUTS = {"floor": 90.0, "kiln": 420.0, "general": 420.0}

# Direct boots are split at SeaBIOS's last line (Kiln's milestones: _bench.kiln_milestones).
SEABIOS_HANDOFF_RE = r"Booting from ROM"  # SeaBIOS jumps to the option ROM that loads -kernel


# ------------------------------------------------------------------ kernel and busybox
def find_kernel_deb(release: str | None) -> Path:
    archives = default_cache() / "apt" / "archives"
    pattern = f"linux-image-{release}_*.deb" if release else "linux-image-*-cloud-amd64_*.deb"
    debs = sorted(archives.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise SystemExit(f"no kernel package {pattern} in {archives}: run 'kiln build' once first")
    return debs[-1]


def unpack_deb(deb: Path, kind: str) -> Path:
    """dpkg-deb -x into bench/.cache/<kind>/<deb name>/ (once)."""
    dest = B.CACHE / kind / deb.stem
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{deb.stem}.", dir=dest.parent))
    try:
        B.run(["dpkg-deb", "-x", deb, tmp])
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def unpack_kernel(deb: Path) -> Kernel:
    root = unpack_deb(deb, "kernel")
    releases = [d.name for d in (root / "lib" / "modules").iterdir()]
    if len(releases) != 1:
        raise SystemExit(f"{deb.name}: expected one lib/modules/<release>, found {releases}")
    name, version, arch = deb.stem.split("_")
    k = Kernel(root, releases[0], Package(name, version.replace("%3a", ":"), arch, deb))
    if not (k.moddir / "modules.dep").is_file():
        B.run(["depmod", "-b", root, k.release])  # the .deb ships no modules.dep
    return k


def resolve_modules(k: Kernel, names: tuple[str, ...]) -> list[str]:
    """Module paths (relative to the module directory) for `names`, dependencies first."""
    order = k.resolve(names, "bench initramfs")
    bad = [p for p in order if not p.endswith(".ko")]
    if bad:
        raise SystemExit(f"compressed modules are not supported by this benchmark: {bad}")
    return order


def busybox() -> tuple[bytes, str]:
    """A static busybox: from Kiln's apt cache (what Kiln's initramfs uses), else the host's."""
    debs = sorted((default_cache() / "apt" / "archives").glob("busybox-static_*.deb"))
    if debs:
        root = unpack_deb(debs[-1], "busybox")
        return (root / "bin" / "busybox").read_bytes(), debs[-1].name
    host = Path("/bin/busybox")
    data = host.read_bytes()
    if b"ld-linux" in data[:4096]:
        raise SystemExit("no static busybox: apt-get install busybox-static")
    return data, str(host)


# ------------------------------------------------------------------ floor
FLOOR_INIT = f"""#!/bin/busybox sh
/bin/busybox echo "{FLOOR_MARKER}" > /dev/console
/bin/busybox poweroff -f
"""


def floor_initrd(out: Path, bb: bytes) -> None:
    B.write_initramfs(out, {"bin/busybox": (0o755, bb), "init": (0o755, FLOOR_INIT.encode())})


# ------------------------------------------------------------------ general-purpose Debian
GENERAL_INIT = """#!/bin/busybox sh
# Benchmark initramfs: load virtio and ext4, mount /dev/vda, hand over to /sbin/init.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /etc/modules-order); do $B insmod /lib/modules/$m || exit 1; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 400 ]; do $B sleep 0.05; i=$((i + 1)); done
if ! $B mount -t ext4 -o rw /dev/vda /root; then
    $B echo "bench-init: cannot mount /dev/vda" > /dev/console
    $B poweroff -f
fi
$B mount --move /dev /root/dev
$B mount --move /sys /root/sys
$B mount --move /proc /root/proc
exec $B switch_root /root /sbin/init
"""

MARKER_UNIT = f"""[Unit]
Description=Benchmark marker: multi-user.target reached
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "{GENERAL_MARKER}" > /dev/console'

[Install]
WantedBy=multi-user.target
"""

INTERFACES = """# As the Debian installer writes it.
auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
"""


@dataclass(frozen=True)
class General:
    disk: Path
    initrd: Path
    meta: dict[str, Any]


def general_image(k: Kernel, bb: bytes, bb_source: str) -> General:
    """The general-purpose Debian image for `k`, built once and cached."""
    key = hashlib.sha256(
        json.dumps(
            [GENERAL_FORMAT, GENERAL_INCLUDE, k.package.deb.name, bb_source, INITRD_MODULES]
        ).encode()
    ).hexdigest()[:12]
    dest = B.CACHE / f"general-{key}"
    if (dest / "meta.json").is_file():
        return General(
            dest / "disk.img", dest / "initrd.img", json.loads((dest / "meta.json").read_text())
        )
    B.CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".general-", dir=B.CACHE))
    root = work / "root"
    try:
        t0 = time.monotonic()
        debs = B.CACHE / "debootstrap-debs"
        debs.mkdir(exist_ok=True)
        B.log(f"general-purpose image: debootstrap minbase + {GENERAL_INCLUDE} (cached afterwards)")
        B.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={GENERAL_INCLUDE}",
                f"--cache-dir={debs}",
                "bookworm",
                root,
                MIRROR,
            ],
            timeout=3600,
        )
        for mnt in B.mounts_under(root):
            B.run(["umount", "-l", mnt])
        B.log("general-purpose image: kernel modules, configuration, ext4 image")
        mods = root / "usr" / "lib" / "modules" / k.release
        shutil.copytree(k.moddir, mods, symlinks=True)
        for link in ("build", "source"):
            (mods / link).unlink(missing_ok=True)
        B.run(["depmod", "-b", root, k.release])
        etc = root / "etc"
        (etc / "hostname").write_text("general\n")
        (etc / "fstab").write_text("# empty: the initramfs mounts / read-write\n")
        (etc / "network" / "interfaces").write_text(INTERFACES)
        mid = etc / "machine-id"
        if not mid.is_file() or len(mid.read_text().strip()) != 32:  # not a first boot each time
            mid.write_text(hashlib.sha256(key.encode()).hexdigest()[:32] + "\n")
        unit = etc / "systemd" / "system" / "bench-ready.service"
        unit.write_text(MARKER_UNIT)
        wants = etc / "systemd" / "system" / "multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / unit.name).unlink(missing_ok=True)
        (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")
        tree = B.tree_bytes(root)
        packages = sum(
            1
            for block in (root / "var/lib/dpkg/status").read_text().split("\n\n")
            if "Status: install ok installed" in block
        )
        setuid = sum(
            1
            for d, _s, files in os.walk(root)
            for f in files
            if stat.S_ISREG((st := os.lstat(os.path.join(d, f))).st_mode)
            and st.st_mode & stat.S_ISUID
        )
        size = (int(tree * 1.3) + 256 * B.MiB) // B.MiB * B.MiB
        disk = work / "disk.img"
        B.run(
            ["mkfs.ext4", "-q", "-F", "-L", "general", "-d", root, disk, f"{size // 1024}k"],
            timeout=1800,
        )
        modules = resolve_modules(k, INITRD_MODULES)
        files = {f"lib/modules/{m}": (0o644, (k.moddir / m).read_bytes()) for m in modules}
        files["etc/modules-order"] = (0o644, "".join(m + "\n" for m in modules).encode())
        files["bin/busybox"] = (0o755, bb)
        files["init"] = (0o755, GENERAL_INIT.encode())
        B.write_initramfs(work / "initrd.img", files)
        meta = {
            "include": GENERAL_INCLUDE,
            "kernel": k.package.deb.name,
            "packages": packages,
            "tree_bytes": tree,
            "image_bytes": size,
            "image_allocated_bytes": B.allocated_bytes(disk),
            "setuid_files": setuid,
            "initrd_modules": modules,
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        B.remove_tree(root)
        if dest.exists():
            B.remove_tree(dest)
        os.replace(work, dest)
    except BaseException:
        B.remove_tree(work)
        raise
    return General(dest / "disk.img", dest / "initrd.img", meta)


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
    system: str, argv: list[str], marker: str, cpus: int, run: int, log_path: Path
) -> tuple[Boot, B.SerialClock]:
    b = Boot(system, cpus, run, loadavg=os.getloadavg()[0])
    with B.direct_vm(argv) as vm:
        try:
            b.marker_s = vm.wait_for(
                re.escape(marker), TIMEOUTS["general" if system.startswith("general") else "floor"]
            )
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


def partition_offset(disk: Path, name: str) -> int:
    """Byte offset of the GPT partition called `name` (read from the primary header)."""
    with open(disk, "rb") as f:
        f.seek(512)
        hdr = f.read(92)
        if hdr[:8] != b"EFI PART":
            raise SystemExit(f"{disk}: no GPT")
        lba, count, size = struct.unpack_from("<QII", hdr, 72)
        f.seek(lba * 512)
        table = f.read(count * size)
    for i in range(count):
        e = table[i * size : (i + 1) * size]
        if e[56:128].decode("utf-16-le").rstrip("\0") == name:
            return int(struct.unpack_from("<Q", e, 32)[0]) * 512
    raise SystemExit(f"{disk}: no partition {name}")


def verbose_copy(disk: Path, out: Path) -> None:
    """A copy of the image whose slot A boots with kernel and systemd messages on the console.

    Only kiln.cfg on BOOT-A changes (the verity-protected root is untouched)."""
    B.run(["cp", "--sparse=always", disk, out])
    img = f"{out}@@{partition_offset(out, 'KILN-BOOT-A')}"
    env = {"MTOOLS_SKIP_CHECK": "1"}
    cfg = B.run(["mtype", "-i", img, "::kiln.cfg"], env=env).stdout

    def swap(m: re.Match[str]) -> str:
        args = [a for a in m.group(1).split() if not QUIET_ARGS.match(a)]
        return f'set KILN_CMDLINE="{" ".join([*args, *VERBOSE_ARGS])}"'

    new, n = re.subn(r'set KILN_CMDLINE="([^"]*)"', swap, cfg)
    if n != 1:
        raise SystemExit("kiln.cfg has no KILN_CMDLINE line; the timeline run needs updating")
    tmp = out.with_suffix(".cfg")
    tmp.write_text(new)
    B.run(["mcopy", "-o", "-i", img, tmp, "::kiln.cfg"], env=env)
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
    kernel: Kernel
    floor_initrd: Path
    general: General
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
    k = unpack_kernel(find_kernel_deb(release))
    bb, bb_source = busybox()
    initrd = work / "floor-initrd.img"
    floor_initrd(initrd, bb)
    general = general_image(k, bb, bb_source)
    return Setup(variant, disk, k, initrd, general, bb_source)


def measure(s: Setup, cpus: int, run: int, work: Path, logs: Path, second_boot: bool) -> list[Boot]:
    out: list[Boot] = []
    tag = f"{cpus}cpu-run{run}"
    # floor, SeaBIOS
    wd = clean_workdir(work / "vm")
    argv = direct_argv(wd, cpus, s.kernel.vmlinuz, s.floor_initrd, "console=ttyS0 quiet", None)
    b, _ = boot_direct("floor", argv, FLOOR_MARKER, cpus, run, logs / f"floor-{tag}.log")
    out.append(b)
    # general-purpose Debian
    wd = clean_workdir(work / "vm")
    append = " ".join([*s.variant.cmdline, "root=/dev/vda", "rw"])
    argv = direct_argv(wd, cpus, s.kernel.vmlinuz, s.general.initrd, append, s.general.disk)
    b, _ = boot_direct("general", argv, GENERAL_MARKER, cpus, run, logs / f"general-{tag}.log")
    out.append(b)
    # Kiln, first boot on a fresh overlay, then (optionally) a second boot of that disk
    wd = clean_workdir(work / "vm")
    cfg = VmConfig(s.kiln_disk, wd, cpus=cpus, accel="tcg", overlay=True)
    b, clock = boot_vm(
        "kiln",
        cfg,
        READY_RE,
        cpus,
        run,
        logs / f"kiln-{tag}.log",
        after=power_off if second_boot else None,
    )
    b.milestones = kiln_milestones(clock, b.marker_s)
    out.append(b)
    if second_boot and b.error is None:
        booted = work / "kiln-booted-once.img"
        B.run(["qemu-img", "convert", "-O", "raw", wd / "overlay.qcow2", booted], timeout=600)
        wd2 = clean_workdir(work / "vm2")
        cfg = VmConfig(booted, wd2, cpus=cpus, accel="tcg", overlay=True)
        b2, clock2 = boot_vm("kiln-2nd", cfg, READY_RE, cpus, run, logs / f"kiln-2nd-{tag}.log")
        b2.milestones = kiln_milestones(clock2, b2.marker_s)
        b2.note = f"second boot of the first boot's disk ({b.note})"
        out.append(b2)
        booted.unlink()
    for x in out:
        what = f"{x.marker_s:.2f} s" if x.marker_s is not None else f"FAILED: {x.error}"
        B.log(f"  {x.system:<10} {cpus} vCPU run {run}: {what}")
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
    args = [a for a in s.variant.cmdline if not QUIET_ARGS.match(a)]
    append = " ".join([*args, *VERBOSE_ARGS, "root=/dev/vda", "rw"])
    argv = direct_argv(wd, cpus, s.kernel.vmlinuz, s.general.initrd, append, s.general.disk)
    b, clock = boot_direct(
        "general-timeline", argv, GENERAL_MARKER, cpus, 0, logs / "timeline-general.log"
    )
    res["general"] = {**timeline(clock, re.escape(GENERAL_MARKER)), "error": b.error}
    return res


SYSTEMS = ("floor", "kiln", "kiln-2nd", "general")


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
            m[f"{name}_kernel_to_marker_s"] = med(cpus, name, "kernel_to_marker_s")
            m[f"{name}_firmware_s"] = med(cpus, name, "firmware_s")
        m["kiln_grub_s"] = med(cpus, "kiln", "grub_s")
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

    def row(
        label: str, get: Callable[[dict[str, Any]], float | None], kind: str = "s"
    ) -> list[str]:
        cells = []
        for c in cpus:
            v = get(summary[c])
            cells.append(B.fmt_ratio(v) if kind == "r" else B.fmt_s(v, 2))
        return [label, *cells]

    rows = [
        row("floor: QEMU -> marker", lambda m: m["floor"]),
        row("  SeaBIOS (-> kernel)", lambda m: m["floor_firmware_s"]),
        row("  kernel -> marker", lambda m: m["floor_kernel_to_marker_s"]),
        row("kiln: QEMU -> ready (first boot)", lambda m: m["kiln"]),
        row("  OVMF (-> GRUB)", lambda m: m["kiln_firmware_s"]),
        row("  GRUB (-> kernel)", lambda m: m["kiln_grub_s"]),
        row("  kernel -> ready", lambda m: m["kiln_kernel_to_marker_s"]),
        row("kiln: second boot of that disk", lambda m: m["kiln-2nd"]),
        row("  kernel -> ready", lambda m: m["kiln-2nd_kernel_to_marker_s"]),
        row("general-purpose: QEMU -> marker", lambda m: m["general"]),
        row("  SeaBIOS (-> kernel)", lambda m: m["general_firmware_s"]),
        row("  kernel -> marker", lambda m: m["general_kernel_to_marker_s"]),
        ["", *("" for _ in cpus)],
        row("kiln / general", lambda m: m["ratios"]["kiln/general"], "r"),
        row("kiln 2nd boot / general", lambda m: m["ratios"]["kiln-2nd/general"], "r"),
        row(
            "kernel->marker: kiln / general",
            lambda m: m["ratios"]["kernel->marker kiln/general"],
            "r",
        ),
        row(
            "kernel->marker: kiln 2nd / general",
            lambda m: m["ratios"]["kernel->marker kiln-2nd/general"],
            "r",
        ),
        row(
            "above the floor: kiln / general",
            lambda m: m["ratios"]["above-floor kiln/general"],
            "r",
        ),
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
        "kernel -> marker starts at the firmware's hand-over (GRUB's last line for kiln, SeaBIOS's",
        "'Booting from ROM' for the direct boots), so it leaves out OVMF and GRUB, which only kiln",
        "pays for. 'above the floor' subtracts the floor's kernel -> marker from both.",
    ]
    fails = sum(summary[c]["failures"] for c in cpus)
    if fails:
        out.append(f"\n{fails} boot(s) failed: see per_boot in the JSON and bench/.cache/logs/")
    out.append(
        f"\ngeneral-purpose image: {meta.get('packages')} packages, "
        f"{B.fmt_mib(meta.get('tree_bytes'))} of files, {meta.get('setuid_files')} setuid files"
    )
    if tl:
        for system in ("kiln", "general"):
            t = tl.get(system) or {}
            out += [
                "",
                f"timeline, {system}, {tl['cpus']} vCPU, verbose console (not in the medians):",
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
