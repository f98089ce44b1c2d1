"""Settings defaults and templates into the image (Bottlerocket's storewolf defaults.toml).

The variant lists defaults files (merged in order, later wins) and template directories.
Everything is checked here, at build time, with the same model the host uses: an invalid
default, a dangling service or configuration file, a missing or broken template is a build
error naming the file. The image gets one merged /usr/share/kiln/defaults.json, the
template sources and their precompiled bodies.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from kiln.core.errors import KilnError
from kiln.host.datastore import encode_definitions
from kiln.host.render.cache import PATHS_LIST
from kiln.host.render.templates import COMPILED_DIR, TEMPLATE_DIR, TemplateError, compile_all, split
from kiln.host.settings import definitions
from kiln.host.settings.keys import merge
from kiln.host.settings.model import InvalidSettings, validate
from kiln.variant import Variant

DEFAULTS_PATH = Path("/usr/share/kiln/defaults.json")
DEFINITIONS_PATH = Path("/usr/share/kiln/definitions.json")
_TOP = ("settings", "metadata", "services", "configuration-files")


def merge_defaults(files: tuple[Path, ...]) -> dict[str, Any]:
    """Merge the defaults files in order and check the result; errors name the file."""
    doc: dict[str, Any] = {}
    for path in files:
        try:
            part = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise KilnError(f"settings defaults {path}: {e}") from None
        unknown = sorted(set(part) - set(_TOP))
        if unknown:
            raise KilnError(f"settings defaults {path}: unknown table '{unknown[0]}'", hint=f"known: {', '.join(_TOP)}")
        try:
            validate(part.get("settings", {}))
        except InvalidSettings as e:
            raise KilnError(f"settings defaults {path}: {e}") from None
        doc = merge(doc, part)
    return doc


def check(doc: dict[str, Any], templates: dict[str, Path], where: str = "settings defaults") -> definitions.Definitions:
    """Definitions of a merged defaults document; `where` (its files) starts every error."""
    try:
        defs = definitions.from_defaults(doc)
    except msgspec.ValidationError as e:
        raise KilnError(f"{where}: {e}") from None
    problems = defs.check()
    for name, cf in defs.configuration_files.items():
        if cf.template_path not in templates:
            problems.append(f"configuration-files.{name}: template '{cf.template_path}' not found")
    if problems:
        raise KilnError(f"{where}: " + "; ".join(problems))
    return defs


UPDATE_ROOT_PATH = Path("/usr/share/kiln/update/root.json")  # kiln.host.update.status.Paths.root


def option_defaults(update_url: str | None, admin_image: str | None) -> dict[str, Any] | None:
    """Defaults that `kiln build` options add on top of the variant's, checked by the host's model.

    `update_url`: repository URLs as `kiln repo serve` lays them out. `admin_image`: the
    admin host container's source, so enabling it is one setting (Bottlerocket's default
    admin container points at its public registry; Kiln has none of its own).
    """
    settings: dict[str, Any] = {}
    if update_url is not None:
        base = update_url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise KilnError(f"--update-url {update_url}: expected an http:// or https:// URL")
        updates = {"metadata-base-url": f"{base}/metadata/", "targets-base-url": f"{base}/targets/"}
        _check_option("--update-url", update_url, {"updates": updates})
        settings["updates"] = updates
    if admin_image is not None:
        admin = {"host-containers": {"admin": {"source": admin_image}}}
        _check_option("--admin-image", admin_image, admin)
        settings.update(admin)
    return {"settings": settings} if settings else None


def _check_option(option: str, value: str, tree: dict[str, Any]) -> None:
    try:
        validate(tree)
    except InvalidSettings as e:
        raise KilnError(f"{option} {value}: {e}") from None


def install_update_root(root: Path, source: Path) -> None:
    """Embed a TUF root (a repository directory's metadata/root.json, or the file itself):
    the trust every update of the image starts from."""
    path = source / "metadata" / "root.json" if source.is_dir() else source
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise KilnError(f"update root {path}: {e}") from None
    if not isinstance(doc, dict) or (doc.get("signed") or {}).get("_type") != "root":
        raise KilnError(f"update root {path}: not TUF root metadata (signed._type is not 'root')")
    dest = root / UPDATE_ROOT_PATH.relative_to("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(path.read_bytes())


def install(root: Path, variant: Variant, extra: dict[str, Any] | None = None) -> definitions.Definitions:
    """Write defaults.json, the templates and their compiled bodies into `root`;
    `extra` defaults (from `option_defaults`) are merged last."""
    templates: dict[str, Path] = {}
    for d in variant.templates:
        templates.update({p.name: p for p in sorted(d.iterdir()) if p.is_file()})
    doc = merge(merge_defaults(variant.settings_defaults), extra or {})
    defs = check(doc, templates, "settings defaults " + ", ".join(str(p) for p in variant.settings_defaults))
    src = root / TEMPLATE_DIR.relative_to("/")
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name, path in sorted(templates.items()):
        try:
            split(name, path.read_text())
        except TemplateError as e:
            raise KilnError(f"{path}: {e}") from None
        shutil.copy(path, src / name)
    compiled = root / COMPILED_DIR.relative_to("/")
    if compiled.exists():
        shutil.rmtree(compiled)
    try:
        compile_all(src, compiled)
    except TemplateError as e:
        raise KilnError(f"settings templates: {e}") from None
    out = root / DEFAULTS_PATH.relative_to("/")
    out.write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n")
    # What storewolf installs into the datastore every boot, byte for byte.
    (root / DEFINITIONS_PATH.relative_to("/")).write_bytes(encode_definitions(msgspec.to_builtins(defs)))
    # The files the initramfs may restore from the render cache (kiln.host.render.cache).
    paths = sorted(cf.path for cf in defs.configuration_files.values() if cf.path.startswith("/etc/"))
    (root / PATHS_LIST.relative_to("/")).write_text("".join(f"{p}\n" for p in paths))
    return defs
