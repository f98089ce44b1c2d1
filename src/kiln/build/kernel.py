"""The kernel: vmlinuz for the BOOT partition, modules for the initramfs and the root.

Debian's kernel .deb ships no modules.dep (depmod runs in its postinst), so Kiln runs
`depmod -b` itself and resolves module dependencies from the result.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from kiln.build.apt import Package
from kiln.core.errors import KilnError
from kiln.core.run import run


def _norm(name: str) -> str:
    return name.replace("-", "_")


@dataclass(frozen=True)
class Kernel:
    root: Path  # where the kernel package was unpacked
    release: str  # e.g. 6.1.0-56-cloud-amd64
    package: Package

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    def deps(self) -> dict[str, list[str]]:
        """module path -> paths of the modules it needs, from depmod's modules.dep."""
        out: dict[str, list[str]] = {}
        for line in (self.moddir / "modules.dep").read_text().splitlines():
            mod, _, needs = line.partition(":")
            out[mod] = needs.split()
        return out

    def builtin(self) -> set[str]:
        names = (self.moddir / "modules.builtin").read_text().split()
        return {_norm(Path(n).name.removesuffix(".ko")) for n in names}

    def resolve(self, names: tuple[str, ...], where: str) -> list[str]:
        """Module paths for `names` and their dependencies, each after what it needs."""
        deps = self.deps()
        by_name = {_norm(Path(p).name.removesuffix(".ko")): p for p in deps}
        builtin = self.builtin()
        order: list[str] = []

        def visit(path: str) -> None:
            if path in order:
                return
            for dep in deps.get(path, []):
                visit(dep)
            order.append(path)

        for name in names:
            key = _norm(name)
            if key in by_name:
                visit(by_name[key])
            elif key not in builtin:
                raise KilnError(f"{where}: kernel module '{name}' does not exist in {self.release}")
        return order


def unpack(packages: list[Package], dest: Path, where: str) -> Kernel:
    images = [p for p in packages if p.name.startswith("linux-image-") and p.name[12:13].isdigit()]
    if len(images) != 1:
        raise KilnError(
            f"{where}: expected exactly one linux-image-<release> package, found {[p.name for p in images] or 'none'}"
        )
    pkg = images[0]
    run(["dpkg-deb", "-x", pkg.deb, dest])
    releases = [d.name for d in (dest / "lib" / "modules").iterdir()] if (dest / "lib/modules").is_dir() else []
    if len(releases) != 1 or not (dest / "boot" / f"vmlinuz-{releases[0]}").is_file():
        raise KilnError(f"{where}: package {pkg.name} contains no kernel image (boot/vmlinuz-*)")
    kernel = Kernel(dest, releases[0], pkg)
    run(["depmod", "-b", dest, releases[0]])
    return kernel


def install_modules(kernel: Kernel, root: Path, subtrees: tuple[str, ...], where: str) -> None:
    """Copy the chosen module directories into the root filesystem and index them."""
    dest = root / "usr" / "lib" / "modules" / kernel.release
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "kernel").mkdir(parents=True)
    base = kernel.moddir / "kernel"
    for pattern in subtrees:  # a directory, a module file, or a glob such as drivers/net/*.ko
        matches = sorted(base.glob(pattern))
        if not matches:
            raise KilnError(f"{where}: 'kernel/{pattern}' matches nothing in {kernel.release}")
        for src in matches:
            target = dest / "kernel" / src.relative_to(base)
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, target)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (kernel.moddir / name).exists():
            shutil.copy(kernel.moddir / name, dest / name)
    run(["depmod", "-b", root / "usr", kernel.release])
