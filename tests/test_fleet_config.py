"""`kiln fleet serve --config`: slots per group and stale-after, with errors that name the key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from kiln.core.errors import KilnError
from kiln.fleet.config import FleetConfig, GroupConfig


def test_defaults_one_slot_no_expiry() -> None:
    cfg = FleetConfig.load(None)
    assert cfg.group("anything") == GroupConfig(1, None)


def test_groups_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[lock]\ndefault-slots = 2\nstale-after = "2 hours"\n'
                    '[groups.workers]\nslots = 5\n[groups.db-1]\nstale-after = "off"\n')
    cfg = FleetConfig.load(path)
    assert cfg.group("other") == GroupConfig(2, timedelta(hours=2))
    assert cfg.group("workers") == GroupConfig(5, timedelta(hours=2))
    assert cfg.group("db-1") == GroupConfig(2, None)


@pytest.mark.parametrize(("text", "message"), [
    ("[lock]\ndefault-slots = -1\n", "lock.default-slots: expected a whole number of slots in 0..10000, got -1"),
    ("[lock]\ndefault-slots = true\n", "lock.default-slots: expected a whole number"),
    ("[lock]\nslots = 1\n", "lock.slots: unknown key (expected default-slots, stale-after)"),
    ("[groups.workers]\nslots = '3'\n", "groups.workers.slots: expected a whole number"),
    ('[groups."a b"]\nslots = 3\n', "groups.a b: a group name is letters, digits, '.' and '-'"),
    ('[groups.w]\nstale-after = "soon"\n', "groups.w.stale-after: 'soon' is not '<number> <unit>'"),
    ('[groups.w]\nstale-after = 30\n', "groups.w.stale-after: expected \"off\" or a duration"),
    ("[groups]\nw = 3\n", "groups.w: expected a table"),
    ("[locks]\n", "unknown table 'locks'"),
    ("[lock\n", "not valid TOML"),
])
def test_bad_configuration_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(KilnError) as e:
        FleetConfig.load(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match=r"fleet\.toml: cannot read"):
        FleetConfig.load(tmp_path / "fleet.toml")
