"""Stage the root filesystem tree from .debs, doing what maintainer scripts would have done.

Packages are unpacked with `dpkg-deb -x` (no maintainer scripts run); Kiln then applies the
few effects an image needs itself: merged /usr, users and groups (base-passwd + sysusers),
the linker cache, unit presets, Kiln's units and code, precompiled bytecode, and pruning of
what a read-only container host never reads (docs, man pages, locales, the package manager).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.build.apt import Package
from kiln.core.errors import KilnError
from kiln.core.run import run
from kiln.variant import Variant

HOST_SRC = Path(__file__).resolve().parents[1]  # src/kiln
PY_SITE = "usr/lib/python3/dist-packages"
# Packages copied into the image: the in-image code and the pure formats it reads.
IN_IMAGE_PACKAGES = ("core", "image", "host")
PRUNE = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/fish",
    "usr/share/gtk-doc",
    "usr/share/common-licenses",
    "var/cache/debconf",
    "var/lib/dpkg",
    "var/log",
    "usr/share/pixmaps",
    "usr/share/applications",
    "usr/share/menu",
    "usr/share/perl5",
    "usr/share/perl",
    "usr/lib/x86_64-linux-gnu/perl",
    "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/bin/perl",
    "usr/bin/perl5.36.0",
)
# The package manager and its front ends: a Kiln host is changed by image updates only.
PACKAGE_MANAGER = (
    "usr/bin/dpkg",
    "usr/bin/dpkg-deb",
    "usr/bin/dpkg-query",
    "usr/bin/dpkg-split",
    "usr/bin/dpkg-divert",
    "usr/bin/dpkg-trigger",
    "usr/bin/dpkg-statoverride",
    "usr/bin/dpkg-maintscript-helper",
    "usr/bin/dpkg-realpath",
    "usr/sbin/dpkg-preconfigure",
    "usr/sbin/dpkg-reconfigure",
    "usr/bin/debconf",
    "usr/bin/debconf-apt-progress",
    "usr/bin/debconf-communicate",
    "usr/bin/debconf-copydb",
    "usr/bin/debconf-escape",
    "usr/bin/debconf-set-selections",
    "usr/bin/debconf-show",
    "usr/sbin/adduser",
    "usr/sbin/addgroup",
    "usr/sbin/deluser",
    "usr/sbin/delgroup",
    "usr/bin/login",
    "usr/bin/su",
    "usr/sbin/sulogin",
    "usr/sbin/agetty",
    "usr/sbin/getty",
)


@dataclass(frozen=True)
class OsRelease:
    version: str
    variant: str
    build_id: str
    debug_console: bool

    def render(self) -> str:
        return (
            'NAME="Kiln"\n'
            "ID=kiln\n"
            "ID_LIKE=debian\n"
            f'PRETTY_NAME="Kiln {self.version} ({self.variant})"\n'
            f"VERSION_ID={self.version}\n"
            f"VARIANT_ID={self.variant}\n"
            f"BUILD_ID={self.build_id}\n"
            f"KILN_DEBUG_CONSOLE={'yes' if self.debug_console else 'no'}\n"
            'HOME_URL="https://example.invalid/kiln"\n'
        )


def extract(debs: Sequence[Package], root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for pkg in debs:
        run(["dpkg-deb", "-x", pkg.deb, root])


def merge_usr(root: Path) -> None:
    """bookworm .debs still ship /bin, /sbin, /lib*: fold them into /usr and link."""
    for d in ("bin", "sbin", "lib", "lib64"):
        top = root / d
        if top.is_symlink():
            continue
        if top.is_dir():
            dest = root / "usr" / d
            dest.mkdir(parents=True, exist_ok=True)
            for entry in sorted(top.iterdir()):
                target = dest / entry.name
                if target.is_dir() and not target.is_symlink() and entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, target, symlinks=True, dirs_exist_ok=True)
                    shutil.rmtree(entry)
                else:
                    if target.exists() or target.is_symlink():
                        if target.is_dir() and not target.is_symlink():
                            shutil.rmtree(target)
                        else:
                            target.unlink()
                    os.rename(entry, target)
            top.rmdir()
        if (root / "usr" / d).exists():
            top.symlink_to(f"usr/{d}")


def _chroot(root: Path, *argv: str) -> None:
    run(["chroot", root, *argv], env={"PATH": "/usr/sbin:/usr/bin", "HOME": "/"})


def users_and_groups(root: Path, source_date_epoch: int) -> None:
    """base-passwd's static users, then sysusers.d; no account gets a login shell."""
    etc = root / "etc"
    shutil.copy(root / "usr/share/base-passwd/passwd.master", etc / "passwd")
    shutil.copy(root / "usr/share/base-passwd/group.master", etc / "group")
    _chroot(root, "/usr/sbin/pwconv")
    _chroot(root, "/usr/sbin/grpconv")
    # Groups Debian's maintainer scripts would add (udev rules and tmpfiles refer to them).
    (root / "usr/lib/sysusers.d/kiln.conf").write_text(
        "# Kiln: groups Debian creates in maintainer scripts\ng kvm - -\ng render - -\ng sgx - -\n"
        "# Kiln: members may use the API socket (/run/kiln/api.sock)\ng api - -\n"
    )
    _chroot(root, "/usr/bin/systemd-sysusers")
    day = str(source_date_epoch // 86400)
    for name in ("passwd", "shadow"):
        path = etc / name
        lines = []
        for line in path.read_text().splitlines():
            f = line.split(":")
            if name == "passwd":
                f[6] = "/usr/sbin/nologin"
            else:
                f[1] = "!*" if f[1] in ("", "*") or f[0] == "root" else f[1]
                f[2] = day  # "last changed" would otherwise be the build date
            lines.append(":".join(f))
        path.write_text("\n".join(lines) + "\n")
    for name in ("passwd-", "group-", "shadow-", "gshadow-"):
        (etc / name).unlink(missing_ok=True)


def install_kiln(root: Path, units_dir: Path) -> None:
    """Kiln's in-image Python code, its units and the `kiln` command."""
    site = root / PY_SITE / "kiln"
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    shutil.copy(HOST_SRC / "__init__.py", site / "__init__.py")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sub in IN_IMAGE_PACKAGES:
        shutil.copytree(HOST_SRC / sub, site / sub, ignore=ignore)
    unit_dest = root / "usr/lib/systemd/system"
    for unit in sorted(units_dir.iterdir()):
        shutil.copy(unit, unit_dest / unit.name)
    kiln_bin = root / "usr/bin/kiln"
    kiln_bin.write_text("#!/usr/bin/python3 -I\nfrom kiln.host.cli import main\nraise SystemExit(main())\n")
    kiln_bin.chmod(0o755)
    # containerd's binary logger for every container (ctr run --log-uri binary://…): the shim runs it.
    libexec = root / "usr/libexec/kiln"
    libexec.mkdir(parents=True, exist_ok=True)
    shutil.copy(HOST_SRC / "host/containers/container-log", libexec / "container-log")
    (libexec / "container-log").chmod(0o755)


def install_files(root: Path, variant: Variant) -> None:
    """The variant's extra files (before unit configuration, so they may replace units)."""
    for dest, src in variant.files.items():
        target = root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        shutil.copy(src, target)


def configure_systemd(root: Path, variant: Variant, debug_console: bool) -> None:
    run(["systemctl", f"--root={root}", "preset-all"])
    units = [
        *variant.enable_units,
        "kiln-agent.socket",
        "kiln-agent.service",
        "kiln-ready.target",
        "kiln-lockdown.service",
        "kiln-containers.service",
    ]
    if debug_console:
        units.append("kiln-debug-shell.service")
    missing = [u for u in units if not _unit_exists(root, u)]
    if missing:
        raise KilnError(f"{variant.source}: systemd.enable: unit '{missing[0]}' is not in the image")
    run(["systemctl", f"--root={root}", "enable", *units])
    masked = list(variant.mask_units)
    if masked:
        run(["systemctl", f"--root={root}", "mask", *masked])
    run(["systemctl", f"--root={root}", "set-default", "multi-user.target"])


def _unit_exists(root: Path, unit: str) -> bool:
    return any((root / d / unit).exists() for d in ("usr/lib/systemd/system", "etc/systemd/system"))


def finish(root: Path, variant: Variant, osr: OsRelease, packages: Sequence[Package]) -> None:
    """Everything after the units: os-release, caches, pruning, bytecode."""
    (root / "usr/lib/os-release").unlink(missing_ok=True)
    (root / "usr/lib/os-release").write_text(osr.render())
    (root / "etc/os-release").unlink(missing_ok=True)
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "etc/hostname").write_text("kiln\n")
    (root / "etc/machine-id").write_text("")  # the initramfs provides a persistent one
    (root / "etc/fstab").write_text("# Kiln: the initramfs mounts everything; see kiln-init.\n")
    inventory = [{"name": p.name, "version": p.version, "arch": p.arch} for p in packages]
    share = root / "usr/share/kiln"
    share.mkdir(parents=True, exist_ok=True)
    (share / "packages.json").write_text(json.dumps(inventory, indent=1) + "\n")
    for rel in (*PRUNE, *PACKAGE_MANAGER, *(p.lstrip("/") for p in variant.prune)):
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for d in ("local", "var", "efi", "var/lib/kiln", "tmp", "srv"):
        (root / d).mkdir(parents=True, exist_ok=True)
    # ConditionNeedsUpdate= units compare these with /usr: equal mtimes mean "up to date".
    (root / "etc/.updated").write_text("")
    (root / "var/.updated").write_text("")
    _chroot(root, "/usr/sbin/ldconfig")
    (root / "var/cache/ldconfig/aux-cache").unlink(missing_ok=True)
    _compile_python(root)


def _compile_python(root: Path) -> None:
    """Precompile all Python: the root is read-only and erofs -T0 zeroes mtimes."""
    dirs = [f"/{d.relative_to(root)}" for d in sorted((root / "usr/lib").glob("python3*")) if d.is_dir()]
    _chroot(root, "/usr/bin/python3", "-m", "compileall", "-q", "-j1", "--invalidation-mode", "unchecked-hash", *dirs)


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total
