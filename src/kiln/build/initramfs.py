"""The initramfs: busybox, dmsetup and mke2fs with their libraries, kernel modules, init.

Binaries come from Debian packages unpacked into a staging tree; their shared libraries are
found by reading each ELF's DT_NEEDED entries (readelf), so nothing from the build host
leaks in. The archive is a deterministic newc cpio, zstd-compressed.
"""

from __future__ import annotations

import io
import re
import stat
from pathlib import Path

from kiln.build.kernel import Kernel
from kiln.core.errors import KilnError
from kiln.core.run import run
from kiln.image import cpio

INIT = Path(__file__).with_name("data") / "init"
BINARIES = {"bin/busybox": "busybox", "usr/sbin/dmsetup": "dmsetup", "usr/sbin/mke2fs": "mke2fs"}
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64")
LOADER = "lib64/ld-linux-x86-64.so.2"


def _find(stage: Path, name: str) -> Path:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin"):
        if (stage / d / name).is_file():
            return stage / d / name
    raise KilnError(
        f"initramfs: '{name}' not found in the initramfs packages",
        hint="the variant's packages.initramfs must include busybox-static, dmsetup, e2fsprogs",
    )


def _needed(path: Path) -> list[str]:
    out = run(["readelf", "-d", path]).stdout.decode()
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _lib(stage: Path, soname: str) -> Path:
    for d in LIB_DIRS:
        if (stage / d / soname).exists():
            return (stage / d / soname).resolve()
    raise KilnError(f"initramfs: shared library {soname} not found in the initramfs packages")


def build(stage: Path, kernel: Kernel, modules: list[str], out: Path, mtime: int) -> int:
    """Write the gzip'd cpio to `out`; returns its size."""
    files: dict[str, tuple[int, bytes]] = {}
    todo = [(dest, _find(stage, name)) for dest, name in BINARIES.items()]
    seen: set[str] = set()
    while todo:
        dest, src = todo.pop()
        files[dest] = (0o755, src.read_bytes())
        for soname in _needed(src):
            if soname not in seen:
                seen.add(soname)
                todo.append((f"lib/{soname}", _lib(stage, soname)))
    if any(_needed(_find(stage, n)) for n in BINARIES.values()):
        loader = (stage / LOADER).resolve()
        if not loader.is_file():
            raise KilnError("initramfs: the dynamic loader is missing from the initramfs packages (libc6)")
        files[LOADER] = (0o755, loader.read_bytes())
    for mod in modules:
        files[f"lib/modules/{mod}"] = (0o644, (kernel.moddir / mod).read_bytes())
    files["etc/kiln/modules"] = (0o644, "".join(m + "\n" for m in modules).encode())
    files["init"] = (0o755, INIT.read_bytes())

    entries: dict[str, cpio.Entry] = {}
    for d in ("dev", "proc", "sys", "run", "sysroot", "etc", "tmp", "lib64"):
        entries[d] = cpio.Entry(d, stat.S_IFDIR | 0o755)
    entries["dev/console"] = cpio.Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    for path, (mode, data) in files.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            entries.setdefault(d, cpio.Entry(d, stat.S_IFDIR | 0o755))
        entries[path] = cpio.Entry(path, stat.S_IFREG | mode, data)
    # The loader path must resolve: lib64/ld-linux... is a file we placed; libs go in lib/.
    buf = io.BytesIO()
    cpio.write(buf, [entries[k] for k in sorted(entries)], mtime=mtime)
    # zstd: the kernel unpacks it several times faster than gzip, which matters under TCG.
    raw = out.with_suffix(".cpio")
    raw.write_bytes(buf.getvalue())
    run(["zstd", "-q", "-f", "-12", "--no-progress", raw, "-o", out])
    raw.unlink()
    return out.stat().st_size
