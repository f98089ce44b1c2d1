"""`kiln oci build`: an image spec, or a plain directory, to a reproducible OCI image layout.

spec -> apt closure (the image builder's private apt and cache) -> `dpkg-deb -x` into a
staging tree -> busybox applet links -> extra files -> one layer -> config, manifest, index.
No maintainer script runs and nothing is mounted. The whole dependency closure of the
listed packages goes in, since an image has no base to provide it (busybox-static's
closure is itself). The layout is written next to `output` and renamed into place whole.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.build import apt, rootfs
from kiln.build.pipeline import ARCH, default_cache
from kiln.core.errors import KilnError
from kiln.core.fs import atomic_dir
from kiln.core.progress import Progress
from kiln.core.run import run
from kiln.oci.layout import Descriptor, ImageConfig, Layer, LayoutWriter, tagged
from kiln.oci.spec import ImageSpec, check_name, check_tag, resolve_epoch

_APPLET_RE = re.compile(r"^[A-Za-z0-9_.\[\]-]+$")


@dataclass(frozen=True)
class BuildResult:
    output: Path
    name: str
    tag: str
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Layer, ...]
    packages: tuple[apt.Package, ...]
    epoch: int
    timings: Mapping[str, float] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "name": self.name,
            "tag": self.tag,
            "digest": self.manifest.digest,
            "size": self.manifest.size,
            "config": self.config.digest,
            "layers": [
                {"digest": x.descriptor.digest, "size": x.descriptor.size, "diff_id": x.diff_id, "entries": x.entries}
                for x in self.layers
            ],
            "packages": [{"name": p.name, "version": p.version, "arch": p.arch} for p in self.packages],
            "epoch": self.epoch,
            "timings": dict(self.timings),
        }


def _check_output(output: Path) -> None:
    """Refuse to replace anything but an OCI layout or an empty directory."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise KilnError(f"--output {output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / "oci-layout").is_file():
        raise KilnError(f"--output {output}: not empty and not an OCI image layout; refusing to replace it")


def _stage_path(stage: Path, path: str, where: str) -> Path:
    """`path` inside the staging tree, its parent directories made (0755). A symlink on the
    way is refused: following it could leave the tree."""
    current = stage
    parts = path.strip("/").split("/")
    for part in parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise KilnError(f"{where}: '{path}' passes through the symlink /{current.relative_to(stage)}")
        if not current.exists():
            current.mkdir()
            current.chmod(0o755)  # not the umask's choice: the layer must not depend on it
        elif not current.is_dir():
            raise KilnError(f"{where}: '{path}' needs /{current.relative_to(stage)} to be a directory")
    return current / parts[-1]


def busybox_links(stage: Path, binary: str, dirs: Sequence[str], where: str) -> int:
    """One symlink per applet of the staged busybox in each of `dirs` (the static binary
    runs on the build host and lists its applets); existing names are left alone."""
    exe = _stage_path(stage, binary, where)
    if exe.is_symlink() or not exe.is_file():
        raise KilnError(f"{where}: {binary} is not in the image", hint="add busybox-static to [packages] include")
    names = sorted(set(run([exe, "--list"], timeout=30).stdout.decode().split()))
    bad = [n for n in names if not _APPLET_RE.match(n)]
    if bad or not names:
        raise KilnError(f"{where}: '{binary} --list' printed unexpected applet names: {bad[:3] or 'none'}")
    made = 0
    for d in dirs:
        target = _stage_path(stage, d, where)
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise KilnError(f"{where}: {d} is not a directory in the image")
        if not target.exists():
            target.mkdir()
            target.chmod(0o755)
        rel = os.path.relpath(binary, d)
        for name in names:
            link = target / name
            if not os.path.lexists(link):
                link.symlink_to(rel)
                made += 1
    return made


def install_files(stage: Path, spec: ImageSpec) -> None:
    for f in spec.files:
        where = f"{spec.source}: files.\"{f.path}\""
        dest = _stage_path(stage, f.path, where)
        if dest.is_dir() and not dest.is_symlink():
            raise KilnError(f"{where}: {f.path} is a directory in the image")
        if os.path.lexists(dest):
            dest.unlink()
        shutil.copyfile(f.source, dest)
        mode = f.mode if f.mode is not None else (0o755 if f.source.stat().st_mode & 0o111 else 0o644)
        dest.chmod(mode)


def fetch_packages(packages: Sequence[str], what: str, cache: Path) -> tuple[apt.Package, ...]:
    """The closure of `packages` from the image builder's apt cache (downloaded if missing)."""
    a = apt.Apt(cache / "apt", ARCH)
    a.update()
    return tuple(a.download(list(packages), what))


def _write(
    stage: Path, output: Path, *, name: str, tag: str, config: ImageConfig, epoch: int, created_by: str,
    packages: tuple[apt.Package, ...], progress: Progress,
) -> BuildResult:
    comment = ", ".join(f"{p.name} {p.version}" for p in packages)
    with progress.step("layout", str(output)), atomic_dir(output) as tmp:
        writer = LayoutWriter(tmp)
        layer = writer.layer(stage, epoch)
        history = [{"created_by": created_by, **({"comment": comment} if comment else {})}]
        manifest, cfg = writer.image(config, [layer], created=epoch, arch=ARCH, history=history)
        writer.finish([tagged(manifest, tag, name)])
    return BuildResult(output, name, tag, manifest, cfg, (layer,), packages, epoch, dict(progress.timings))


def build_spec(
    spec: ImageSpec, output: Path, *, tag: str | None = None, cache: Path | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Build the image `spec` describes into the OCI layout `output` (replaced whole)."""
    progress = progress or Progress(quiet=True)
    output = Path(output).absolute()
    tag = check_tag(tag, "--tag") if tag is not None else spec.tag
    epoch = resolve_epoch(spec.epoch)
    _check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    packages: tuple[apt.Package, ...] = ()
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.stage-", dir=output.parent) as tmp:
        stage = Path(tmp) / "rootfs"
        stage.mkdir()
        if spec.packages:
            with progress.step("packages", ", ".join(spec.packages)):
                packages = fetch_packages(spec.packages, f"{spec.source}: packages.include", cache or default_cache())
                rootfs.extract(packages, stage)
        if spec.busybox_links:
            with progress.step("busybox applets", ", ".join(spec.busybox_links)):
                busybox_links(stage, spec.busybox_binary, spec.busybox_links, f"{spec.source}: busybox")
        install_files(stage, spec)
        return _write(
            stage, output, name=spec.name, tag=tag, config=spec.config, epoch=epoch,
            created_by=f"kiln oci build {spec.source.name}", packages=packages, progress=progress,
        )


def build_dir(
    tree: Path, output: Path, config: ImageConfig, *, name: str = "", tag: str = "latest",
    epoch: int | None = None, progress: Progress | None = None,
) -> BuildResult:
    """Build a one-layer image of the directory `tree` as it is (every entry owned by 0:0)."""
    progress = progress or Progress(quiet=True)
    tree, output = Path(tree).absolute(), Path(output).absolute()
    if not tree.is_dir():
        raise KilnError(f"--from-dir {tree}: not a directory")
    if output.resolve().is_relative_to(tree.resolve()):
        raise KilnError(f"--output {output}: must not be inside --from-dir {tree}")
    if name:
        check_name(name, "--name")
    check_tag(tag, "--tag")
    _check_output(output)
    return _write(
        tree, output, name=name, tag=tag, config=config, epoch=resolve_epoch(epoch),
        created_by="kiln oci build --from-dir", packages=(), progress=progress,
    )

