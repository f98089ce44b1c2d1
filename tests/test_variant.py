"""kiln.variant: the strict TOML loader names the file and the key in every error."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.core.errors import KilnError
from kiln.variant import (
    DEFAULT_VARIANT,
    VARIANTS_DIR,
    MiB,
    Partitions,
    Variant,
    load_variant,
    parse_variant,
)

BASE: dict[str, Any] = {
    "variant": {"name": "tiny", "version": "1.2.3", "description": "a test variant"},
    "packages": {
        "include": ["base-files", "systemd", "python3"],
        "kernel": "linux-image-cloud-amd64",
        "initramfs": ["busybox-static"],
    },
    "kernel": {
        "cmdline": ["console=ttyS0", "quiet"],
        "initramfs-modules": ["virtio_blk"],
        "rootfs-modules": ["fs/erofs"],
    },
    "systemd": {"enable": ["containerd.service"], "mask": ["getty.target"]},
    "partitions": {"efi": 16, "boot": 40, "root": 160, "hash": 4, "private": 16, "data": 64},
}


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string for what we use here
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(doc: dict[str, Any]) -> str:
    """Just enough TOML: top-level scalars, then one [table] per dict of scalars."""
    lines = [f"{json.dumps(k)} = {_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"\n[{json.dumps(name)}]")
            lines += [f"{json.dumps(k)} = {_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, doc: dict[str, Any], name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(to_toml(doc))
    return path


def variant_of(tmp_path: Path, change: Callable[[dict[str, Any]], None] | None = None) -> Path:
    doc = copy.deepcopy(BASE)
    if change is not None:
        change(doc)
    return write(tmp_path, doc)


def error(path: Path) -> KilnError:
    with pytest.raises(KilnError) as exc:
        load_variant(str(path))
    assert "Traceback" not in str(exc.value)
    return exc.value


# --- the valid baseline -----------------------------------------------------------------

def test_baseline_loads(tmp_path: Path) -> None:
    path = variant_of(tmp_path)
    v = load_variant(str(path))
    assert v.name == "tiny"
    assert v.version == "1.2.3"
    assert v.description == "a test variant"
    assert v.packages == ("base-files", "systemd", "python3")
    assert v.kernel_package == "linux-image-cloud-amd64"
    assert v.initramfs_packages == ("busybox-static",)
    assert v.cmdline == ("console=ttyS0", "quiet")
    assert v.initramfs_modules == ("virtio_blk",)
    assert v.rootfs_modules == ("fs/erofs",)
    assert v.enable_units == ("containerd.service",)
    assert v.mask_units == ("getty.target",)
    assert v.files == {}
    assert v.partitions == Partitions(16 * MiB, 40 * MiB, 160 * MiB, 4 * MiB, 16 * MiB, 64 * MiB)
    assert v.source == path
    # parse_variant is the same validation on an already parsed document.
    assert parse_variant(copy.deepcopy(BASE), path) == v


def test_optional_tables_and_keys(tmp_path: Path) -> None:
    def drop(doc: dict[str, Any]) -> None:
        del doc["systemd"]
        del doc["variant"]["description"]
        del doc["packages"]["initramfs"]
        doc["kernel"] = {}

    v = load_variant(str(variant_of(tmp_path, drop)))
    assert v.description == ""
    assert v.initramfs_packages == ()
    assert v.cmdline == v.initramfs_modules == v.rootfs_modules == ()
    assert v.enable_units == v.mask_units == ()


def test_files_entry(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "motd").write_text("hello\n")

    def add(doc: dict[str, Any]) -> None:
        doc["files"] = {"/etc/motd": "files/motd"}

    v = load_variant(str(variant_of(tmp_path, add)))
    assert v.files == {"/etc/motd": (tmp_path / "files" / "motd").resolve()}


# --- errors -------------------------------------------------------------------------------

def test_malformed_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[variant]\nname = "tiny"\nversion = \n')
    e = error(path)
    assert str(path) in str(e)
    assert "malformed TOML" in str(e)
    assert "line 3" in str(e)


def test_malformed_toml_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.toml"
    path.write_text(to_toml(BASE) + '\n[variant]\nname = "again"\n')
    e = error(path)
    assert str(path) in str(e) and "malformed TOML" in str(e)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = variant_of(tmp_path, lambda d: d.update(packagse={"include": ["x"]}))
    e = error(path)
    assert str(e).startswith(f"{path}: ")
    assert "unknown key 'packagse'" in str(e)
    assert e.hint is not None and "packages" in e.hint


def test_unknown_top_level_scalar(tmp_path: Path) -> None:
    path = variant_of(tmp_path, lambda d: d.update(verison="1.0.0"))
    e = error(path)
    assert str(path) in str(e) and "unknown key 'verison'" in str(e)


@pytest.mark.parametrize(
    ("table", "key", "known"),
    [
        ("variant", "nmae", "name"),
        ("packages", "kernal", "kernel"),
        ("packages", "exclude", "include"),
        ("partitions", "swap", "root"),
        ("kernel", "modules", "cmdline"),
        ("systemd", "disable", "enable"),
    ],
)
def test_unknown_key_in_table(tmp_path: Path, table: str, key: str, known: str) -> None:
    def add(doc: dict[str, Any]) -> None:
        doc[table][key] = 1 if table == "partitions" else "x"

    path = variant_of(tmp_path, add)
    e = error(path)
    assert str(e).startswith(f"{path}: {table}: unknown key '{key}'")
    assert e.hint is not None and known in e.hint


@pytest.mark.parametrize(
    ("table", "key", "value", "message"),
    [
        ("variant", "version", 1, "variant.version: expected str, got int (1)"),
        ("variant", "name", ["tiny"], "variant.name: expected str, got array"),
        ("variant", "description", 3.5, "variant.description: expected str, got float"),
        ("packages", "include", "systemd", "packages.include: expected list, got str ('systemd')"),
        ("packages", "include", ["systemd", 7], "packages.include[1]: expected str, got int"),
        ("packages", "kernel", ["linux-image-amd64"], "packages.kernel: expected str, got array"),
        ("packages", "initramfs", "busybox", "packages.initramfs: expected list, got str"),
        ("kernel", "cmdline", "quiet", "kernel.cmdline: expected list, got str"),
        ("systemd", "enable", [True], "systemd.enable[0]: expected str, got bool"),
        ("partitions", "root", "160", "partitions.root: expected int, got str ('160')"),
        ("partitions", "root", 160.0, "partitions.root: expected int, got float"),
        ("partitions", "hash", True, "partitions.hash: expected int, got bool"),
        ("partitions", "data", [64], "partitions.data: expected int, got array"),
    ],
)
def test_wrong_types(tmp_path: Path, table: str, key: str, value: Any, message: str) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc[table][key] = value

    path = variant_of(tmp_path, change)
    e = error(path)
    assert str(e).startswith(f"{path}: ")
    assert message in str(e)


@pytest.mark.parametrize("size", [-1, 0, -160])
def test_non_positive_partition_size(tmp_path: Path, size: int) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["partitions"]["root"] = size

    e = error(variant_of(tmp_path, change))
    assert f"partitions.root: must be a positive number of MiB, got {size}" in str(e)


@pytest.mark.parametrize("version", ["1.0", "1", "v1.0.0", "1.0.0.0", "1.0.x", "", "1.0.0-", "1.0.0-rc1", "1.0.0-rc.1",
                                     "1.0.0+build.5", "01.0.0", "1.0.0\n", "１.0.0"])
def test_bad_version(tmp_path: Path, version: str) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["variant"]["version"] = version

    path = variant_of(tmp_path, change)
    e = error(path)
    assert str(path) in str(e)
    assert f"variant.version: version '{version}' is not of the form MAJOR.MINOR.PATCH" in str(e)


@pytest.mark.parametrize("version", ["0.0.1", "10.20.30", "0.0.0", "1.2.30"])
def test_good_versions(tmp_path: Path, version: str) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["variant"]["version"] = version

    assert load_variant(str(variant_of(tmp_path, change))).version == version


def test_with_version(tmp_path: Path) -> None:
    v = load_variant(str(variant_of(tmp_path)))
    assert v.with_version("2.0.0").version == "2.0.0"
    assert v.version == "1.2.3"
    with pytest.raises(KilnError, match=r"--version: version '2\.0' is not of the form") as exc:
        v.with_version("2.0")
    assert str(v.source) in str(exc.value)


@pytest.mark.parametrize("name", ["Tiny", "1tiny", "tiny_host", "tiny host", "", "t" * 41])
def test_bad_variant_name(tmp_path: Path, name: str) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["variant"]["name"] = name

    e = error(variant_of(tmp_path, change))
    assert f"variant.name: invalid name '{name}'" in str(e)


@pytest.mark.parametrize(
    ("key", "package", "index"),
    [
        ("include", "Systemd", 1),
        ("include", "python3 ", 1),
        ("include", "x", 1),  # Debian names have at least two characters
        ("include", "-systemd", 1),
        ("include", "sys_temd", 1),
        ("include", "systemd=252", 1),
        ("initramfs", "BusyBox", 0),
    ],
)
def test_bad_package_name(tmp_path: Path, key: str, package: str, index: int) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["packages"][key][index] = package

    path = variant_of(tmp_path, change)
    e = error(path)
    assert str(e).startswith(f"{path}: ")
    assert f"packages.{key}[{index}]: invalid value '{package}'" in str(e)


def test_empty_package_list(tmp_path: Path) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["packages"]["include"] = []

    e = error(variant_of(tmp_path, change))
    assert "packages.include: must list at least one package" in str(e)


@pytest.mark.parametrize(
    "arg",
    ["roothash=" + "ab" * 32, "roothash", "root=/dev/dm-0", "systemd.verity_root_data=/dev/vda3"],
)
def test_cmdline_parameters_kiln_sets_are_refused(tmp_path: Path, arg: str) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["kernel"]["cmdline"] = ["quiet", arg]

    path = variant_of(tmp_path, change)
    e = error(path)
    assert str(e).startswith(f"{path}: kernel.cmdline: '{arg}' is set by Kiln's boot chain")
    assert e.hint is not None


def test_cmdline_parameter_names_are_matched_exactly(tmp_path: Path) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["kernel"]["cmdline"] = ["rootwait", "roothashsig=x", "kiln.debug=1"]

    assert load_variant(str(variant_of(tmp_path, change))).cmdline[0] == "rootwait"


@pytest.mark.parametrize("unit", ["containerd", "getty@.servic", "../evil.service", "a b.service"])
def test_bad_unit_name(tmp_path: Path, unit: str) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["systemd"]["mask"] = ["getty.target", unit]

    e = error(variant_of(tmp_path, change))
    assert f"systemd.mask[1]: invalid value '{unit}'" in str(e)


@pytest.mark.parametrize("table", ["variant", "packages", "kernel", "partitions"])
def test_missing_required_table(tmp_path: Path, table: str) -> None:
    path = variant_of(tmp_path, lambda d: d.pop(table))
    e = error(path)
    assert str(path) in str(e)
    assert re.search(rf"required table \[{table}\] is missing", str(e)), str(e)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("variant", "name"),
        ("variant", "version"),
        ("packages", "include"),
        ("packages", "kernel"),
        ("partitions", "root"),
        ("partitions", "efi"),
    ],
)
def test_missing_required_key(tmp_path: Path, table: str, key: str) -> None:
    path = variant_of(tmp_path, lambda d: d[table].pop(key))
    e = error(path)
    assert str(e).startswith(f"{path}: {table}.{key}: required key is missing")


def test_table_of_the_wrong_type(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    del doc["partitions"]
    path = tmp_path / "tiny.toml"
    path.write_text('partitions = "big"\n' + to_toml(doc))
    e = error(path)
    assert str(path) in str(e)
    assert "partitions: expected a table, got str" in str(e)


def test_files_entry_with_missing_source(tmp_path: Path) -> None:
    def add(doc: dict[str, Any]) -> None:
        doc["files"] = {"/etc/motd": "files/motd"}

    path = variant_of(tmp_path, add)
    e = error(path)
    missing = (tmp_path / "files" / "motd").resolve()
    assert str(e).startswith(f"{path}: files./etc/motd: source file '{missing}' does not exist")


def test_files_entry_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()

    def add(doc: dict[str, Any]) -> None:
        doc["files"] = {"/etc/motd": "files"}

    e = error(variant_of(tmp_path, add))
    assert "files./etc/motd: source file" in str(e) and "does not exist" in str(e)


@pytest.mark.parametrize("dest", ["etc/motd", "/etc/../motd", "/../etc/motd"])
def test_files_destination_must_be_absolute_inside(tmp_path: Path, dest: str) -> None:
    (tmp_path / "motd").write_text("hi\n")

    def add(doc: dict[str, Any]) -> None:
        doc["files"] = {dest: "motd"}

    e = error(variant_of(tmp_path, add))
    assert f"files.{dest}: destination must be an absolute path inside the image" in str(e)


def test_files_source_must_be_a_string(tmp_path: Path) -> None:
    def add(doc: dict[str, Any]) -> None:
        doc["files"] = {"/etc/motd": 42}

    e = error(variant_of(tmp_path, add))
    assert "files./etc/motd: expected str, got int" in str(e)


def test_unknown_variant_name(tmp_path: Path) -> None:
    for name in ("alpha", "beta"):
        write(tmp_path, {**BASE, "variant": {**BASE["variant"], "name": name}}, f"{name}.toml")
    with pytest.raises(KilnError) as exc:
        load_variant("gamma", variants_dir=tmp_path)
    e = exc.value
    assert "variant 'gamma' not found" in e.message
    assert str(tmp_path / "gamma.toml") in e.message
    assert e.hint == "known variants: alpha, beta"
    assert "known variants: alpha, beta" in str(e)


def test_unknown_variant_lists_the_shipped_ones() -> None:
    with pytest.raises(KilnError) as exc:
        load_variant("no-such-variant")
    assert "variant 'no-such-variant' not found" in str(exc.value)
    assert DEFAULT_VARIANT in str(exc.value)


def test_missing_variant_file_by_path(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match=r"variant '.*/nope\.toml' not found"):
        load_variant(str(tmp_path / "nope.toml"))


def test_load_by_name_from_a_directory(tmp_path: Path) -> None:
    write(tmp_path, BASE, "tiny.toml")
    assert load_variant("tiny", variants_dir=tmp_path).name == "tiny"


def test_parse_variant_names_the_source() -> None:
    doc = copy.deepcopy(BASE)
    doc["partitions"]["root"] = "x"
    with pytest.raises(KilnError, match=r"^/somewhere/v\.toml: partitions\.root: expected int"):
        parse_variant(doc, Path("/somewhere/v.toml"))


# --- the shipped default variant ----------------------------------------------------------

@pytest.fixture(scope="module")
def default() -> Variant:
    return load_variant()


def test_default_variant_loads(default: Variant) -> None:
    assert default.name == DEFAULT_VARIANT == "container-host"
    assert default.source == VARIANTS_DIR / "container-host.toml"
    assert load_variant("container-host") == default
    assert load_variant(str(VARIANTS_DIR / "container-host.toml")) == default
    assert default.kernel_package.startswith("linux-image-")


def test_default_variant_packages(default: Variant) -> None:
    for needed in ("systemd", "python3", "containerd", "runc"):
        assert needed in default.packages
    forbidden = [p for p in default.packages + default.initramfs_packages
                 if "ssh" in p or p.startswith(("apt", "openssh")) or p in ("dpkg", "sudo")]
    assert forbidden == []


def test_default_variant_sanity(default: Variant) -> None:
    assert not any(a.split("=", 1)[0] in ("roothash", "root") for a in default.cmdline)
    for key in ("efi", "boot", "root", "hash", "private", "data"):
        size = getattr(default.partitions, key)
        assert size > 0 and size % MiB == 0
    # No login: getty is masked.
    assert "getty.target" in default.mask_units
    assert "containerd.service" in default.enable_units


@settings(max_examples=300, deadline=None, database=None)
@given(st.from_regex(r"\Av?[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}([-+][0-9A-Za-z.]{0,5})?\Z") | st.text(max_size=12))
def test_the_build_accepts_exactly_the_versions_the_updater_orders(version: str) -> None:
    """One grammar: a version `kiln build` takes is one `kiln repo add`, the agent and the
    migrator can parse and order (the same text back)."""
    from kiln.host.update.manifest import ManifestError, Version
    from kiln.variant import _check_version

    try:
        _check_version(version, "v")
    except KilnError:
        return
    assert str(Version.parse(version)) == version
    with pytest.raises(ManifestError):
        Version.parse(version + "-rc1")
