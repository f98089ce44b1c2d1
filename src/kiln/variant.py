"""Variants: declarative TOML descriptions of an image (Bottlerocket's variant directories).

A variant names the Debian packages, kernel, kernel command line, initramfs modules, systemd
units, extra files and partition sizes of an image. The loader is strict: an unknown key, a
wrong type or a missing field is an error naming the file and the key, so a typo never
silently builds a different image.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError

VARIANTS_DIR = Path(__file__).resolve().parents[2] / "variants"
DEFAULT_VARIANT = "container-host"
MiB = 1024 * 1024

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
PACKAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9@_.:\\-]+\.(service|socket|target|timer|mount|automount|path|slice|device|swap)$")


@dataclass(frozen=True)
class Partitions:
    """Sizes in bytes. The ESP and PRIVATE are shared; boot/root/hash exist once per slot."""

    efi: int
    boot: int
    root: int
    hash: int
    private: int
    data: int  # initial size; DATA grows to fill the disk on first boot


@dataclass(frozen=True)
class Variant:
    name: str
    version: str
    description: str
    packages: tuple[str, ...]
    kernel_package: str
    initramfs_packages: tuple[str, ...]
    cmdline: tuple[str, ...]
    initramfs_modules: tuple[str, ...]
    rootfs_modules: tuple[str, ...]
    enable_units: tuple[str, ...]
    mask_units: tuple[str, ...]
    files: Mapping[str, Path] = field(default_factory=dict)
    prune: tuple[str, ...] = ()  # absolute paths removed from the root after unpacking
    # Settings defaults files, merged in order (later wins), and template directories.
    settings_defaults: tuple[Path, ...] = ()
    templates: tuple[Path, ...] = ()
    partitions: Partitions = Partitions(32 * MiB, 48 * MiB, 160 * MiB, 4 * MiB, 16 * MiB, 64 * MiB)
    source: Path = Path()

    def with_version(self, version: str) -> Variant:
        _check_version(version, f"{self.source}: --version")
        return dataclasses.replace(self, version=version)


def _check_version(value: str, where: str) -> None:
    """One version grammar for the project: the update agent's (kiln.host.update.manifest.
    Version), which the repository, the agent and the migrator order releases by. A
    pre-release or build suffix would build, then fail at `kiln repo add` and leave the
    boot-time migrator unable to place the version: refused here, before anything is built."""
    from kiln.host.update.manifest import ManifestError, Version

    try:
        canonical = str(Version.parse(value))
    except ManifestError:
        canonical = None
    if canonical != value:
        raise KilnError(f"{where}: version '{value}' is not of the form MAJOR.MINOR.PATCH",
                        hint="plain numbers without leading zeros, e.g. 1.2.0 (no pre-release or build suffix)")


class TomlTable:
    """Reads one TOML table, remembering which keys were used so leftovers are errors."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        if not isinstance(data, Mapping):
            raise KilnError(f"{where}: expected a table, got {_typename(data)}")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def get(self, key: str, kind: type, default: Any = ..., check: Callable[[Any], str | None] | None = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise KilnError(f"{self.where}.{key}: required key is missing")
            return default
        value = self.data[key]
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise KilnError(
                f"{self.where}.{key}: expected {kind.__name__}, got {_typename(value)} ({value!r})"
            )
        if check is not None and (problem := check(value)):
            raise KilnError(f"{self.where}.{key}: {problem}")
        return value

    def strings(self, key: str, pattern: re.Pattern[str] | None = None, default: Any = ...) -> tuple[str, ...]:
        items = self.get(key, list, default)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise KilnError(f"{self.where}.{key}[{i}]: expected str, got {_typename(item)}")
            if pattern is not None and not pattern.match(item):
                raise KilnError(f"{self.where}.{key}[{i}]: invalid value '{item}'")
        return tuple(items)

    def table(self, key: str, required: bool = True) -> TomlTable:
        self.used.add(key)
        if key not in self.data and not required:
            return TomlTable({}, f"{self.where}.{key}")
        if key not in self.data:
            raise KilnError(f"{self.where}: required table [{key}] is missing")
        return TomlTable(self.data[key], f"{self.where}.{key}" if self.where else key)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise KilnError(
                f"{self.where or 'variant'}: unknown key '{unknown[0]}'",
                hint=f"known keys here: {', '.join(sorted(self.used))}",
            )


def _typename(value: Any) -> str:
    return {str: "str", int: "int", float: "float", bool: "bool", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


def _positive(value: int) -> str | None:
    return None if value > 0 else f"must be a positive number of MiB, got {value}"


def parse_variant(data: Mapping[str, Any], source: Path) -> Variant:
    """Validate a parsed TOML document; errors name `source` and the dotted key."""
    top = TomlTable(data, "")
    top.where = str(source)
    v = top.table("variant")
    v.where = f"{source}: variant"
    name = v.get("name", str, check=lambda s: None if _NAME_RE.match(s) else f"invalid name '{s}'")
    version = v.get("version", str)
    _check_version(version, f"{v.where}.version")
    description = v.get("description", str, "")
    v.done()

    p = top.table("packages")
    p.where = f"{source}: packages"
    packages = p.strings("include", PACKAGE_NAME_RE)
    if not packages:
        raise KilnError(f"{p.where}.include: must list at least one package")
    kernel = p.get("kernel", str)
    initramfs_packages = p.strings("initramfs", PACKAGE_NAME_RE, ())
    p.done()

    k = top.table("kernel")
    k.where = f"{source}: kernel"
    cmdline = k.strings("cmdline", default=())
    for arg in cmdline:
        if arg.split("=", 1)[0] in {"roothash", "root", "systemd.verity_root_data"}:
            raise KilnError(
                f"{k.where}.cmdline: '{arg}' is set by Kiln's boot chain and may not be given",
                hint="systemd takes over roothash=; Kiln passes kiln.* parameters itself",
            )
    initramfs_modules = k.strings("initramfs-modules", default=())
    rootfs_modules = k.strings("rootfs-modules", default=())
    k.done()

    s = top.table("systemd", required=False)
    s.where = f"{source}: systemd"
    enable = s.strings("enable", _UNIT_RE, ())
    mask = s.strings("mask", _UNIT_RE, ())
    s.done()

    f = top.table("files", required=False)
    f.where = f"{source}: files"
    files: dict[str, Path] = {}
    for dest in list(f.data):
        src = f.get(dest, str)
        if not dest.startswith("/") or ".." in dest.split("/"):
            raise KilnError(f"{f.where}.{dest}: destination must be an absolute path inside the image")
        path = (source.parent / src).resolve()
        if not path.is_file():
            raise KilnError(f"{f.where}.{dest}: source file '{path}' does not exist")
        files[dest] = path
    f.done()

    r = top.table("rootfs", required=False)
    r.where = f"{source}: rootfs"
    prune = r.strings("prune", default=())
    for i, path in enumerate(prune):
        if not path.startswith("/") or ".." in path.split("/") or path.rstrip("/") in ("", "/usr", "/etc"):
            raise KilnError(f"{r.where}.prune[{i}]: '{path}' must be an absolute path below /usr or /etc")
    r.done()

    st = top.table("settings", required=False)
    st.where = f"{source}: settings"
    defaults = tuple(
        _existing(source, st.where, "defaults", p, Path.is_file) for p in st.strings("defaults", default=())
    )
    templates = tuple(
        _existing(source, st.where, "templates", p, Path.is_dir) for p in st.strings("templates", default=())
    )
    st.done()

    pt = top.table("partitions")
    pt.where = f"{source}: partitions"
    sizes = {
        key: pt.get(key, int, check=_positive) * MiB
        for key in ("efi", "boot", "root", "hash", "private", "data")
    }
    pt.done()
    top.done()
    return Variant(
        name=name,
        version=version,
        description=description,
        packages=packages,
        kernel_package=kernel,
        initramfs_packages=initramfs_packages,
        cmdline=cmdline,
        initramfs_modules=initramfs_modules,
        rootfs_modules=rootfs_modules,
        enable_units=enable,
        mask_units=mask,
        files=files,
        prune=prune,
        settings_defaults=defaults,
        templates=templates,
        partitions=Partitions(**sizes),
        source=source,
    )


def _existing(source: Path, where: str, key: str, rel: str, check: Callable[[Path], bool]) -> Path:
    path = (source.parent / rel).resolve()
    if not check(path):
        raise KilnError(f"{where}.{key}: '{path}' does not exist")
    return path


def load_variant(name_or_path: str | None = None, variants_dir: Path = VARIANTS_DIR) -> Variant:
    """Load a variant by name (from `variants/`) or by path to a TOML file."""
    ref = name_or_path or DEFAULT_VARIANT
    path = Path(ref) if ref.endswith(".toml") else variants_dir / f"{ref}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in variants_dir.glob("*.toml"))
        raise KilnError(f"variant '{ref}' not found ({path})", hint=f"known variants: {', '.join(known)}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise KilnError(f"{path}: malformed TOML: {e}") from None
    variant = parse_variant(data, path)
    if path.stem != variant.name and not ref.endswith(".toml"):
        raise KilnError(f"{path}: variant.name '{variant.name}' does not match the file name")
    return variant
