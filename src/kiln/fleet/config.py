"""`kiln fleet serve --config FILE`: reboot slots per group, and when a silent holder expires.

    [lock]
    default-slots = 1              # a group not listed below
    stale-after = "off"            # default for every group: off, or "90 minutes", "2 hours"...

    [groups.workers]
    slots = 3
    stale-after = "30 minutes"     # a holder neither asking again nor reporting for this long loses its slot

Expiry is off by default: a host that went silent while holding may be mid-reboot into a
broken release, and its slot is what stops the release from spreading.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.update.waves import parse_offset

GROUP_RE = re.compile(r"[a-zA-Z0-9.-]+")  # FleetLock's group grammar (fullmatch)
MAX_SLOTS = 10_000


@dataclass(frozen=True)
class GroupConfig:
    slots: int = 1
    stale_after: timedelta | None = None


@dataclass(frozen=True)
class FleetConfig:
    default: GroupConfig = GroupConfig()
    groups: dict[str, GroupConfig] = field(default_factory=dict)

    def group(self, name: str) -> GroupConfig:
        return self.groups.get(name, self.default)

    @classmethod
    def load(cls, path: Path | None) -> FleetConfig:
        if path is None:
            return cls()
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as e:
            raise KilnError(f"{path}: cannot read: {e.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise KilnError(f"{path}: not valid TOML: {e}") from None
        return cls.from_doc(doc, str(path))

    @classmethod
    def from_doc(cls, doc: dict[str, Any], where: str = "config") -> FleetConfig:
        unknown = set(doc) - {"lock", "groups"}
        if unknown:
            raise KilnError(f"{where}: unknown table '{sorted(unknown)[0]}' (expected [lock] and [groups.NAME])")
        lock = _table(doc, "lock", where)
        default = _group(lock, f"{where}: lock", GroupConfig(), slots_key="default-slots")
        groups: dict[str, GroupConfig] = {}
        for name, table in _table(doc, "groups", where).items():
            if not GROUP_RE.fullmatch(name):
                raise KilnError(f"{where}: groups.{name}: a group name is letters, digits, '.' and '-'")
            if not isinstance(table, dict):
                raise KilnError(f"{where}: groups.{name}: expected a table")
            groups[name] = _group(table, f"{where}: groups.{name}", default, slots_key="slots")
        return cls(default, groups)


def _table(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise KilnError(f"{where}: {key}: expected a table")
    return value


def _group(table: dict[str, Any], where: str, base: GroupConfig, *, slots_key: str) -> GroupConfig:
    unknown = set(table) - {slots_key, "stale-after"}
    if unknown:
        raise KilnError(f"{where}.{sorted(unknown)[0]}: unknown key (expected {slots_key}, stale-after)")
    slots = table.get(slots_key, base.slots)
    if not isinstance(slots, int) or isinstance(slots, bool) or not 0 <= slots <= MAX_SLOTS:
        raise KilnError(f"{where}.{slots_key}: expected a whole number of slots in 0..{MAX_SLOTS}, got {slots!r}")
    stale = base.stale_after
    if "stale-after" in table:
        text = table["stale-after"]
        if text == "off":
            stale = None
        elif not isinstance(text, str):
            raise KilnError(f"{where}.stale-after: expected \"off\" or a duration such as \"30 minutes\"")
        else:
            try:
                stale = parse_offset(text)
            except ValueError as e:
                raise KilnError(f"{where}.stale-after: {e}") from None
    return GroupConfig(slots, stale)
