"""`kiln build`: the whole pipeline from a variant to a disk image and update artifacts.

variant -> apt closure -> rootfs tree -> erofs + dm-verity -> initramfs -> BOOT/ESP FAT
images -> GPT disk (slot A written, slot B empty) -> compressed update artifacts.
Everything happens in a temporary directory next to the output, renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.build import apt, bootloader, disk, initramfs, kernel, rootfs, settings, tools, wheels
from kiln.build.signing import BootSigner
from kiln.core.errors import KilnError
from kiln.core.fs import atomic_dir
from kiln.core.progress import Progress
from kiln.image import verity
from kiln.secureboot.keys import KeySet
from kiln.secureboot.keys import load as load_keys
from kiln.secureboot.varstore import VARS_NAME, make_vars
from kiln.variant import Variant

ARCH = "amd64"
NAMESPACE = uuid.UUID("4b494c4e-6275-696c-6400-000000000000")  # for derived, reproducible ids


def default_cache() -> Path:
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


def source_date_epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))


@dataclass(frozen=True)
class BuildOptions:
    variant: Variant
    output: Path
    cache: Path = field(default_factory=default_cache)
    debug_console: bool = False
    sde: int = field(default_factory=source_date_epoch)
    update_root: Path | None = None  # TUF root to trust (a `kiln repo` directory or root.json)
    update_url: str | None = None  # the repository's base URL (metadata/ and targets/ below it)
    admin_image: str | None = None  # default settings.host-containers.admin.source
    keys: Path | None = None  # a `kiln keys init` directory: sign the boot chain for Secure Boot


@dataclass
class BuildResult:
    output: Path
    disk: Path
    manifest: Path
    artifacts: dict[str, Path]
    root_hash: str
    sizes: dict[str, int]
    timings: dict[str, float]
    secure_boot_vars: Path | None = None  # signed builds: OVMF variables with the key set enrolled

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "disk": str(self.disk),
            "secure_boot_vars": str(self.secure_boot_vars) if self.secure_boot_vars else None,
            "manifest": str(self.manifest),
            "artifacts": {k: str(v) for k, v in self.artifacts.items()},
            "root_hash": self.root_hash,
            "sizes": self.sizes,
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _digest_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _build_id(v: Variant, packages: list[apt.Package], opts: BuildOptions, keys: KeySet | None) -> str:
    """Identifies the inputs (package versions, variant file, Kiln version, build flags);
    the disk and partition GUIDs and os-release's BUILD_ID derive from it."""
    from kiln import __version__

    inputs = {
        "packages": [[p.name, p.version] for p in packages],
        "variant": v.source.read_text() if v.source.is_file() else v.name,
        "version": v.version,
        "kiln": __version__,
        "debug_console": opts.debug_console,
        "update_url": opts.update_url,
        "admin_image": opts.admin_image,
        "update_root": _digest_files([_root_file(opts.update_root)]) if opts.update_root else None,
        "files": _digest_files(
            [*v.files.values(), *v.settings_defaults, *(f for d in v.templates for f in sorted(d.iterdir()))]
        ),
        "in_image_code": _digest_files(sorted(rootfs.HOST_SRC.joinpath("host").rglob("*.py"))),
    }
    if keys:  # only signed builds carry the key (unsigned builds keep their ids)
        inputs["signing_keys"] = [keys.owner_guid, keys.created, keys.db_crt.read_text()]
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def _root_file(source: Path) -> Path:
    return source / "metadata" / "root.json" if source.is_dir() else source


def build(opts: BuildOptions, progress: Progress) -> BuildResult:
    v = opts.variant
    if os.geteuid() != 0:
        raise KilnError("kiln build must run as root", hint="it unpacks packages with their owners and runs chroot")
    start = time.monotonic()
    extra_defaults = settings.option_defaults(opts.update_url, opts.admin_image)  # bad options fail first
    keys = load_keys(opts.keys) if opts.keys else None
    signer = BootSigner(keys, opts.sde) if keys else None
    opts.cache.mkdir(parents=True, exist_ok=True)
    what = f"variant {v.name} ({v.source})"
    work = Path(
        tempfile.mkdtemp(prefix=".kiln-build-", dir=opts.output.parent if opts.output.parent.exists() else None)
    )
    try:
        a = apt.Apt(opts.cache / "apt", ARCH)
        with progress.step("packages", "resolving and downloading the Debian closure"):
            a.update()
            pkgs = a.download(list(v.packages), f"{what}: packages.include")
            kpkgs = a.download([v.kernel_package], f"{what}: packages.kernel")
            ipkgs = a.download(list(v.initramfs_packages), f"{what}: packages.initramfs")
        root = work / "rootfs"
        with progress.step("rootfs", f"{len(pkgs)} packages"):
            rootfs.extract(pkgs, root)
            rootfs.merge_usr(root)
            krn = kernel.unpack(kpkgs, work / "kernel", f"{what}: packages.kernel")
            kernel.install_modules(krn, root, v.rootfs_modules, f"{what}: kernel.rootfs-modules")
            rootfs.users_and_groups(root, opts.sde)
            rootfs.install_kiln(root, Path(__file__).resolve().parents[1] / "host" / "units")
            wheels.vendor(wheels.read_requirements(), root / rootfs.PY_SITE, opts.cache / "wheels")
            rootfs.install_files(root, v)
            settings.install(root, v, extra_defaults)
            if opts.update_root:
                settings.install_update_root(root, opts.update_root)
            rootfs.configure_systemd(root, v, opts.debug_console)
            build_id = _build_id(v, pkgs + kpkgs, opts, keys)
            osr = rootfs.OsRelease(v.version, v.name, build_id, opts.debug_console)
            rootfs.finish(root, v, osr, pkgs + kpkgs)
            tree_bytes = rootfs.tree_size(root)
        images = work / "images"
        images.mkdir()
        root_img, hash_img = images / "root.img", images / "hash.img"
        with progress.step("erofs", tools.EROFS_COMPRESSOR):
            tools.mkfs_erofs(root_img, root, mtime=opts.sde, fs_uuid=uuid.uuid5(NAMESPACE, f"root:{build_id}"))
            if root_img.stat().st_size > v.partitions.root:
                raise KilnError(
                    f"{what}: the root filesystem ({root_img.stat().st_size // 2**20} MiB) does not fit "
                    f"partitions.root ({v.partitions.root // 2**20} MiB)",
                    hint="raise partitions.root in the variant or drop packages",
                )
        with progress.step("verity"):
            salt = hashlib.sha256(b"kiln-verity-salt:" + _sha256(root_img).encode()).digest()
            vres = verity.build_hash_tree(root_img, hash_img, salt=salt, uuid=uuid.uuid5(NAMESPACE, salt.hex()))
            if vres.hash_size > v.partitions.hash:
                raise KilnError(f"{what}: the verity tree ({vres.hash_size} bytes) does not fit partitions.hash")
        with progress.step("initramfs"):
            istage = work / "initramfs-stage"
            rootfs.extract(ipkgs, istage)
            mods = krn.resolve(v.initramfs_modules, f"{what}: kernel.initramfs-modules")
            initrd = images / "initrd.img"
            initramfs.build(istage, krn, mods, initrd, opts.sde)
        with progress.step("boot", "GRUB, ESP and BOOT partitions"):
            boot_img = images / "boot.img"
            bootloader.boot_partition(
                boot_img, v, krn.vmlinuz, initrd, vres, mtime=opts.sde, work=work / "boot-files", signer=signer)
            esp_img = images / "esp.img"
            bootloader.esp_partition(esp_img, v.partitions.efi, mtime=opts.sde, work=work / "esp-files", signer=signer)
        with atomic_dir(opts.output) as out:
            with progress.step("disk", "GPT A/B image"):
                disk_path = out / "disk.img"
                disk.assemble(
                    disk_path, v, build_id, {"efi": esp_img, "boot": boot_img, "root": root_img, "hash": hash_img}
                )
            if keys:  # public certificates only: what a VM platform enrolls (EC2's --uefi-data)
                make_vars(keys, out / VARS_NAME)
            with progress.step("artifacts", "compressed update images"):
                manifest = write_artifacts(
                    out / "artifacts",
                    v.name,
                    v.version,
                    vres,
                    {"boot": boot_img, "root": root_img, "hash": hash_img},
                    krn.release,
                    build_id,
                )
            sizes = {
                "rootfs_tree": tree_bytes,
                "root": root_img.stat().st_size,
                "hash": hash_img.stat().st_size,
                "initrd": initrd.stat().st_size,
                "boot": boot_img.stat().st_size,
                "disk": disk_path.stat().st_size,
                "disk_allocated": disk_path.stat().st_blocks * 512,
            }
            progress.timings["total"] = time.monotonic() - start
            result = BuildResult(
                output=opts.output,
                disk=opts.output / "disk.img",
                manifest=opts.output / "artifacts" / "manifest.json",
                artifacts={k: opts.output / "artifacts" / f for k, f in manifest["images"].items()},
                root_hash=vres.root_hash,
                sizes=sizes,
                timings=dict(progress.timings),
                secure_boot_vars=opts.output / VARS_NAME if keys else None,
            )
            (out / "build.json").write_text(json.dumps({**result.to_json(), "timings": None}, indent=2) + "\n")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_artifacts(
    dest: Path, variant: str, version: str, vres: verity.VerityResult, images: dict[str, Path], kver: str, build_id: str
) -> dict[str, Any]:
    """Compressed boot/root/hash images plus a manifest an update agent can check
    (`kiln repo add` publishes this directory)."""
    dest.mkdir(parents=True)
    entries: dict[str, Any] = {}
    names: dict[str, str] = {}
    for key, src in images.items():
        name = f"kiln-{variant}-{ARCH}-{version}-{key}.img.zst"
        tools.zstd(src, dest / name)
        names[key] = name
        entries[key] = {
            "file": name,
            "size": (dest / name).stat().st_size,
            "sha256": _sha256(dest / name),
            "uncompressed_size": src.stat().st_size,
            "uncompressed_sha256": _sha256(src),
        }
    manifest = {
        "variant": variant,
        "arch": ARCH,
        "version": version,
        "build_id": build_id,
        "kernel": kver,
        "compression": "zstd",
        "verity": {
            "root_hash": vres.root_hash,
            "salt": vres.salt,
            "data_blocks": vres.data_blocks,
            "hash_algorithm": "sha256",
            "data_block_size": 4096,
            "hash_block_size": 4096,
        },
        "images": entries,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {"images": names}
