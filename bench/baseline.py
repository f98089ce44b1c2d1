"""The anchors boot_time.py measures Kiln against, built from the same kernel as Kiln's image.

- the floor: a busybox initramfs whose /init prints `floor: ready` and powers off;
- the general-purpose Debian server: debootstrap minbase + systemd, udev, python3, containerd,
  runc, openssh-server, ifupdown, isc-dhcp-client and the kernel's modules, in an ext4 image
  with a busybox initramfs that mounts it (built once, cached under bench/.cache/), and the
  GPT disk it boots from: an ESP holding Kiln's own GRUB EFI image
  (kiln.build.bootloader.grub_efi) with a grub.cfg that loads the same kernel, that
  initramfs and the command line given, beside the ext4 root as partition 2. The same disk
  boots through OVMF + GRUB and by direct kernel boot (-kernel/-initrd, `root=/dev/vda2`).

The kernel and busybox come from Kiln's apt cache (what Kiln's image is built from).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _bench as B

from kiln.build import bootloader, tools
from kiln.build.apt import Package
from kiln.build.kernel import Kernel
from kiln.build.pipeline import default_cache
from kiln.image import gpt, layout

FLOOR_MARKER = "floor: ready"
GENERAL_MARKER = "general: ready"
GENERAL_INCLUDE = (
    "systemd,systemd-sysv,udev,python3,containerd,runc,openssh-server,ifupdown,isc-dhcp-client"
)
GENERAL_FORMAT = 3  # bump when the way the general-purpose image is made changes
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
MIRROR = "http://deb.debian.org/debian"
# The general-purpose GPT disk: ESP (GRUB, its grub.cfg, the kernel and the initramfs, all read
# by GRUB from FAT as Kiln's GRUB reads its BOOT partition), then the ext4 root. Partition 2 is
# what the initramfs mounts, however the kernel was started.
GENERAL_ROOT = "/dev/vda2"
LINUX_DATA_TYPE = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")  # not the discoverable root type
NAMESPACE = uuid.UUID("6b696c6e-6265-6e63-6800-67656e657261")
MTIME = 1_700_000_000  # the build's default SOURCE_DATE_EPOCH

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
# Benchmark initramfs: load virtio and ext4, mount root= (default /dev/vda), hand over to /sbin/init.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
ROOT=/dev/vda
for a in $($B cat /proc/cmdline); do case "$a" in root=*) ROOT="${a#root=}" ;; esac; done
for m in $($B cat /etc/modules-order); do $B insmod /lib/modules/$m || exit 1; done
i=0
while [ ! -b "$ROOT" ] && [ $i -lt 400 ]; do $B sleep 0.05; i=$((i + 1)); done
if ! $B mount -t ext4 -o rw "$ROOT" /root; then
    $B echo "bench-init: cannot mount $ROOT" > /dev/console
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
    root: Path  # the ext4 root filesystem image
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
        return General(dest / "root.ext4", dest / "initrd.img", json.loads((dest / "meta.json").read_text()))
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
        # The disk has an ESP now: without this, systemd-gpt-auto-generator adds an ESP automount
        # at /boot that fails on the direct boot (minbase has no kmod to load vfat), work the
        # ext4-only disk never made. A Debian install lists its ESP in fstab instead.
        generators = etc / "systemd" / "system-generators"
        generators.mkdir(parents=True, exist_ok=True)
        (generators / "systemd-gpt-auto-generator").symlink_to("/dev/null")
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
        disk = work / "root.ext4"
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
    return General(dest / "root.ext4", dest / "initrd.img", meta)



GRUB_CFG = """set timeout=0
echo "general-grub: booting"
linux /vmlinuz {cmdline}
initrd /initrd.img
boot
"""


def general_disk(g: General, k: Kernel, cmdline: str, esp_size: int, out: Path, work: Path) -> Path:
    """The GPT disk both general-purpose boots use: an ESP with Kiln's GRUB EFI image
    (kiln.build.bootloader.grub_efi, the same modules) whose grub.cfg loads `k`'s kernel and
    the general initramfs with `cmdline` (which names `GENERAL_ROOT`), then the ext4 root.

    Written with Kiln's own GPT, FAT and sparse-copy code; takes seconds, so it is made per
    run (the command line is the variant's)."""
    work.mkdir(parents=True, exist_ok=True)
    efi = work / "BOOTX64.EFI"
    bootloader.grub_efi(efi, mtime=MTIME, work=work)
    cfg = work / "grub.cfg"
    cfg.write_text(GRUB_CFG.format(cmdline=cmdline))
    vmlinuz, initrd = work / "vmlinuz", work / "initrd.img"
    shutil.copy(k.vmlinuz, vmlinuz)
    shutil.copy(g.initrd, initrd)
    esp = work / "esp.img"
    files = {"EFI/BOOT/BOOTX64.EFI": efi, "EFI/BOOT/grub.cfg": cfg, "vmlinuz": vmlinuz, "initrd.img": initrd}
    tools.mkfs_fat(esp, esp_size, label="GENERAL-EFI", volume_id=0x47454E45, files=files, mtime=MTIME)
    root_size = g.root.stat().st_size
    specs: list[gpt.PartSpec] = [
        ("EFI system partition", layout.ESP_TYPE, uuid.uuid5(NAMESPACE, "esp"), esp_size),
        ("general root", LINUX_DATA_TYPE, uuid.uuid5(NAMESPACE, "root"), root_size),
    ]
    table = gpt.plan(uuid.uuid5(NAMESPACE, "disk"), 2 * gpt.MiB + esp_size + root_size, specs)
    with open(out, "wb") as f:
        f.truncate(table.disk_size)
        gpt.write_gpt(f, table)
        f.flush()
        for part, image in zip(table.partitions, (esp, g.root), strict=True):
            tools.copy_sparse(image, f.fileno(), part.offset)
        os.fsync(f.fileno())
    return out
