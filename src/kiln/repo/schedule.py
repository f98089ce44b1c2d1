"""Wave schedules: how fast a release reaches the fleet (Bottlerocket's wave files).

A schedule is a TOML file of waves, each opening `start_after` a start time and letting
hosts in until `fleet_percentage` of the fleet may update:

    [[waves]]
    start_after = "1 hour"
    fleet_percentage = 1

Built-in schedules live in `waves/` next to this module (`default`, `accelerated`, `slow`,
`ohno`); any other argument is a path to such a file. `none` means no waves: every host
may take the release at once. The seeds are Bottlerocket's (`kiln.host.update.waves`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.update import waves as wavemath

BUILTIN = ("default", "accelerated", "slow", "ohno")
NONE = "none"


@dataclass(frozen=True)
class Wave:
    start_after: timedelta
    fleet_percentage: int


@dataclass(frozen=True)
class Schedule:
    name: str  # the built-in name or the file path; "none" for no waves
    waves: tuple[Wave, ...]

    def at(self, start: datetime) -> dict[int, datetime]:
        """The manifest's `waves` for a release starting at `start`: start seed -> opening."""
        seeds = wavemath.wave_seeds([w.fleet_percentage for w in self.waves])
        return {seed: start + w.start_after for seed, w in zip(seeds, self.waves, strict=True)}


def load(spec: str) -> Schedule:
    """A built-in name, `none`, or a path to a wave TOML file."""
    if spec == NONE:
        return Schedule(NONE, ())
    if spec in BUILTIN:
        text = (resources.files("kiln.repo") / "waves" / f"{spec}.toml").read_text()
        return parse(text, f"{spec}.toml (built in)", spec)
    path = Path(spec)
    if not path.is_file():
        raise KilnError(
            f"wave schedule '{spec}' is neither a built-in schedule nor a file",
            hint=f"built in: {', '.join(BUILTIN)}, or {NONE}",
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise KilnError(f"{path}: cannot read the wave schedule: {e}") from None
    return parse(text, str(path), str(path))


def parse(text: str, where: str, name: str) -> Schedule:
    """Parse and check a schedule; errors name `where` and the wave (`waves[i]`, from 0)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise KilnError(f"{where}: not valid TOML: {e}") from None
    extra = sorted(set(doc) - {"waves"})
    if extra:
        raise KilnError(f"{where}: unknown key '{extra[0]}' (a schedule has only [[waves]])")
    raw = doc.get("waves")
    if not isinstance(raw, list) or not raw:
        raise KilnError(f"{where}: no [[waves]] tables")
    waves = [_wave(w, f"{where}: waves[{i}]") for i, w in enumerate(raw)]
    for i in range(1, len(waves)):
        here = f"{where}: waves[{i}]"
        if waves[i].fleet_percentage <= waves[i - 1].fleet_percentage:
            raise KilnError(
                f"{here}: fleet_percentage {waves[i].fleet_percentage} is not above the previous wave's "
                f"{waves[i - 1].fleet_percentage}"
            )
        if waves[i].start_after <= waves[i - 1].start_after:
            raise KilnError(f"{here}: start_after must be later than the previous wave's")
    if waves[-1].fleet_percentage != 100:
        raise KilnError(
            f"{where}: waves[{len(waves) - 1}]: the last wave must reach fleet_percentage 100, "
            f"not {waves[-1].fleet_percentage}"
        )
    return Schedule(name, tuple(waves))


def _wave(doc: Any, where: str) -> Wave:
    if not isinstance(doc, dict):
        raise KilnError(f"{where}: expected a table with start_after and fleet_percentage")
    extra = sorted(set(doc) - {"start_after", "fleet_percentage"})
    if extra:
        raise KilnError(f"{where}: unknown key '{extra[0]}'")
    after, pct = doc.get("start_after"), doc.get("fleet_percentage")
    if not isinstance(after, str):
        raise KilnError(f"{where}: start_after: expected a string such as \"4 hours\"")
    try:
        offset = wavemath.parse_offset(after)
    except ValueError as e:
        raise KilnError(f"{where}: start_after: {e}") from None
    if not isinstance(pct, int) or isinstance(pct, bool) or not 1 <= pct <= 100:
        raise KilnError(f"{where}: fleet_percentage: expected a whole number from 1 to 100, got {pct!r}")
    return Wave(offset, pct)
