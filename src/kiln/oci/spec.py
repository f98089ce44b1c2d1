"""Image specs: a small TOML file saying what goes into an OCI image and how it runs.

    [image]
    name = "kiln/admin"          # repository name (index.json's io.kiln.image.name)
    tag = "1"                    # org.opencontainers.image.ref.name; `--tag` overrides it
    epoch = 0                    # mtime of every file and the config's `created`

    [packages]
    include = ["busybox-static"] # Debian packages, with their whole dependency closure

    [busybox]
    links = ["/bin", "/usr/bin"] # applet symlinks from `busybox --list`, made at build time

    [files]                      # image path = host path relative to this file, or a table
    "/usr/bin/sheltie" = { source = "admin/sheltie", mode = "0755" }

    [config]
    entrypoint = ["/usr/bin/admin-init"]
    env = { PATH = "/usr/sbin:/usr/bin:/sbin:/bin" }   # or ["PATH=..."]
    labels = { "org.opencontainers.image.title" = "kiln-admin" }

The loader is as strict as the variant loader (it shares its table reader,
`kiln.variant.TomlTable`): an unknown key or a bad value is an error naming the file and
the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.oci.layout import NAME_RE, TAG_RE, ImageConfig
from kiln.variant import PACKAGE_NAME_RE, TomlTable

_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PORT_RE = re.compile(r"^[0-9]{1,5}(/(tcp|udp|sctp))?$")
_MODE_RE = re.compile(r"^0?[0-7]{3,4}$")


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute path inside the image
    source: Path
    mode: int | None  # None: 0755 if the source is executable, else 0644


@dataclass(frozen=True)
class ImageSpec:
    name: str
    tag: str
    packages: tuple[str, ...]
    busybox_links: tuple[str, ...]  # directories that get one symlink per busybox applet
    busybox_binary: str  # where the package puts busybox inside the image
    files: tuple[FileEntry, ...]
    config: ImageConfig
    epoch: int | None  # None: 0 unless SOURCE_DATE_EPOCH is set
    source: Path


def image_path(value: str, where: str) -> str:
    """An absolute, normalised path inside the image (no `..`, not `/` itself)."""
    parts = value.split("/")
    if not value.startswith("/") or value == "/" or ".." in parts or "" in parts[1:] or "." in parts:
        raise KilnError(f"{where}: '{value}' must be an absolute path inside the image (no '..', '.' or '//')")
    return value


def check_tag(tag: str, where: str) -> str:
    if not TAG_RE.match(tag):
        raise KilnError(f"{where}: invalid tag '{tag}' (letters, digits, '_', '.', '-'; at most 128)")
    return tag


def check_name(name: str, where: str) -> str:
    if not NAME_RE.match(name):
        raise KilnError(f"{where}: invalid image name '{name}' (lower-case path components like kiln/admin)")
    return name


def parse_env(value: Any, where: str) -> tuple[str, ...]:
    """`env` as a table (KEY = "value") or a list of "KEY=value" strings."""
    pairs: list[tuple[Any, Any]]
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        pairs = [(v.partition("=")[0], v.partition("=")[2] if "=" in v else None) for v in value]
    else:
        raise KilnError(f"{where}: expected a table or a list of \"KEY=VALUE\" strings")
    out = []
    for key, val in pairs:
        if not isinstance(key, str) or not _ENV_KEY_RE.match(key):
            raise KilnError(f"{where}: invalid variable name {key!r}")
        if not isinstance(val, str):
            raise KilnError(f"{where}.{key}: expected a string value")
        out.append(f"{key}={val}")
    return tuple(out)


def _string_table(t: TomlTable, key: str) -> dict[str, str]:
    value = t.get(key, dict, {})
    for k, v in value.items():
        if not isinstance(v, str):
            raise KilnError(f"{t.where}.{key}.{k}: expected str, got {type(v).__name__}")
    return dict(value)


def _config(t: TomlTable) -> ImageConfig:
    env = parse_env(t.get("env", object, {}), f"{t.where}.env")
    workdir = t.get("workdir", str, "")
    if workdir and workdir != "/":
        image_path(workdir, f"{t.where}.workdir")
    ports = t.strings("exposed-ports", default=())
    for i, port in enumerate(ports):
        if not _PORT_RE.match(port):
            raise KilnError(f"{t.where}.exposed-ports[{i}]: '{port}' is not PORT or PORT/tcp|udp|sctp")
    config = ImageConfig(
        entrypoint=t.strings("entrypoint", default=()),
        cmd=t.strings("cmd", default=()),
        env=env,
        workdir=workdir,
        user=t.get("user", str, ""),
        labels=_string_table(t, "labels"),
        exposed_ports=tuple(p if "/" in p else f"{p}/tcp" for p in ports),
        stop_signal=t.get("stop-signal", str, ""),
    )
    t.done()
    return config


def _files(t: TomlTable, base: Path) -> tuple[FileEntry, ...]:
    entries = []
    for dest in list(t.data):
        where = f"{t.where}.\"{dest}\""
        image_path(dest, where)
        value = t.get(dest, object)
        if isinstance(value, str):
            value = {"source": value}
        ft = TomlTable(value, where)
        ft.where = where
        src = (base / ft.get("source", str)).resolve()
        mode_text = ft.get("mode", str, "")
        ft.done()
        if not _MODE_RE.match(mode_text or "0644"):
            raise KilnError(f"{where}.mode: '{mode_text}' is not an octal mode like \"0755\"")
        if not src.is_file():
            raise KilnError(f"{where}.source: '{src}' does not exist or is not a file")
        entries.append(FileEntry(dest, src, int(mode_text, 8) if mode_text else None))
    t.done()
    return tuple(entries)


def parse_spec(data: Mapping[str, Any], source: Path) -> ImageSpec:
    """Validate a parsed spec; errors name `source` and the dotted key."""
    top = TomlTable(data, str(source))

    def table(key: str, required: bool = False) -> TomlTable:
        t = top.table(key, required)
        t.where = f"{source}: {key}"
        return t

    im = table("image", required=True)
    name = im.get("name", str, check=lambda s: None if NAME_RE.match(s) else f"invalid image name '{s}'")
    tag = im.get("tag", str, "latest", check=lambda s: None if TAG_RE.match(s) else f"invalid tag '{s}'")
    epoch = im.get("epoch", int, None, check=lambda n: None if n >= 0 else "must not be negative")
    im.done()

    pk = table("packages")
    packages = pk.strings("include", PACKAGE_NAME_RE, ())
    pk.done()

    bb = table("busybox")
    links = tuple(image_path(d, f"{bb.where}.links") for d in bb.strings("links", default=()))
    binary = image_path(bb.get("binary", str, "/bin/busybox"), f"{bb.where}.binary")
    bb.done()

    files = _files(table("files"), source.parent)
    config = _config(table("config"))
    top.done()
    return ImageSpec(name, tag, packages, links, binary, files, config, epoch, source)


def load_spec(path: Path) -> ImageSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KilnError(f"image spec '{path}' not found") from None
    except OSError as e:
        raise KilnError(f"image spec '{path}': {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise KilnError(f"{path}: malformed TOML: {e}") from None
    return parse_spec(data, path.resolve())


def resolve_epoch(spec_epoch: int | None) -> int:
    """SOURCE_DATE_EPOCH when set (the reproducible-builds convention), else the spec's, else 0."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env is not None and env != "":
        if not env.isdigit():
            raise KilnError(f"SOURCE_DATE_EPOCH: '{env}' is not a number of seconds")
        return int(env)
    return spec_epoch if spec_epoch is not None else 0
