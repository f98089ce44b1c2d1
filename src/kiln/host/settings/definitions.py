"""What settings mean to the host: metadata, services and configuration files.

These come with the image (the variant's defaults files, merged at build time into
/usr/share/kiln/defaults.json) in Bottlerocket's shape:

    [metadata.settings.motd]
    affected-services = ["motd"]
    [metadata.settings.updates.seed]
    setting-generator = "kiln-generate seed"
    [services.motd]
    configuration-files = ["motd"]
    restart-commands = []
    [configuration-files.motd]
    path = "/etc/motd"
    template-path = "motd"

Metadata on a key applies to every key below it.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from kiln.host.settings.keys import format_key, is_prefix, parse_key

# Absolute and normal: no empty, `.` or `..` segments (the initramfs restores these paths).
AbsPath = Annotated[str, Meta(pattern=r"^(/(?!\.\.?(/|$))[^/\0\n]+)+\Z")]
METADATA_KEYS = ("affected-services", "setting-generator")


class Service(Struct, forbid_unknown_fields=True, rename="kebab", frozen=True):
    configuration_files: list[str] = []
    restart_commands: list[str] = []


class ConfigurationFile(Struct, forbid_unknown_fields=True, rename="kebab", frozen=True):
    path: AbsPath
    template_path: str


class Definitions(Struct, forbid_unknown_fields=True, rename="kebab", frozen=True):
    """Metadata (keyed by dotted setting key), services and configuration files."""

    affected_services: dict[str, list[str]] = {}
    setting_generators: dict[str, str] = {}
    services: dict[str, Service] = {}
    configuration_files: dict[str, ConfigurationFile] = {}

    def services_for(self, keys: list[tuple[str, ...]]) -> list[str]:
        """Every service whose metadata covers one of the changed keys (prefix match both ways)."""
        out: set[str] = set()
        for meta_key, services in self.affected_services.items():
            mk = parse_key(meta_key)
            if any(is_prefix(mk, k) or is_prefix(k, mk) for k in keys):
                out.update(services)
        return sorted(out)

    def files_for(self, services: list[str]) -> list[str]:
        return sorted({f for s in services if s in self.services for f in self.services[s].configuration_files})

    def check(self) -> list[str]:
        """Dangling references, one message each (empty when consistent)."""
        problems = []
        for key, services in self.affected_services.items():
            problems += [f"metadata {key}: affected service '{s}' is not defined" for s in services
                         if s not in self.services]
        for name, svc in self.services.items():
            problems += [f"services.{name}: configuration file '{f}' is not defined" for f in svc.configuration_files
                         if f not in self.configuration_files]
        return problems


def from_defaults(doc: dict[str, Any]) -> Definitions:
    """Definitions from a merged defaults document (its `metadata`, `services`, `configuration-files`)."""
    affected: dict[str, list[str]] = {}
    generators: dict[str, str] = {}
    for path, value in _meta_leaves(doc.get("metadata", {}), ()):
        key, what = format_key(path[:-1]), path[-1]
        if what == "affected-services":
            affected[key] = value
        else:
            generators[key] = value
    raw = {
        "affected-services": affected,
        "setting-generators": generators,
        "services": doc.get("services", {}),
        "configuration-files": doc.get("configuration-files", {}),
    }
    return msgspec.convert(raw, Definitions, strict=True)


def _meta_leaves(tree: Any, prefix: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    if not isinstance(tree, dict):
        raise msgspec.ValidationError(f"metadata {format_key(prefix)}: expected a table")
    out = []
    for k, v in tree.items():
        if k in METADATA_KEYS:
            out.append(((*prefix, k), v))
        else:
            out += _meta_leaves(v, (*prefix, k))
    return out
