"""`kiln fleet simulate`'s parameters: the fleet, the release, how reboots go.

Everything here is checked before a simulation starts; errors name the option.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.update import windows
from kiln.host.update.daemon import Policy
from kiln.host.update.manifest import Update, Version, format_time

LOCK_URL = "sim://fleet"  # what the simulated hosts' settings name as their FleetLock server


_DURATION = re.compile(r"\A([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)\Z")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(text: str, where: str = "duration") -> float:
    """'90s', '1.5m', '250ms', '1h' -> seconds; KilnError names the text."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise KilnError(f"{where}: '{text}' is not a duration such as 60s, 1.5m or 250ms")
    return float(m[1]) * _UNIT[m[2]]


@dataclass(frozen=True)
class RebootTime:
    """How long a reboot takes, from the daemon asking for it to the new boot's health gate
    having decided (the daemon starts again then): `60s`, `uniform:40s-90s`, `normal:60s,10s`."""

    kind: str
    a: float
    b: float = 0.0
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> RebootTime:
        where = f"--reboot-time {text}"
        kind, sep, rest = text.partition(":")
        if not sep:
            return cls("fixed", seconds(text, where), text=text)
        if kind == "uniform":
            lo, dash, hi = rest.partition("-")
            a, b = seconds(lo, where), seconds(hi, where) if dash else -1.0
            if not dash or b < a:
                raise KilnError(f"{where}: expected uniform:LOW-HIGH with LOW <= HIGH, e.g. uniform:40s-90s")
            return cls(kind, a, b, text)
        if kind == "normal":
            mean, comma, sd = rest.partition(",")
            if not comma:
                raise KilnError(f"{where}: expected normal:MEAN,SD, e.g. normal:60s,10s")
            return cls(kind, seconds(mean, where), seconds(sd, where), text)
        raise KilnError(f"{where}: unknown distribution '{kind}' (a duration, uniform:LOW-HIGH or normal:MEAN,SD)")

    def draw(self, rng: random.Random) -> float:
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "normal":
            return max(0.0, rng.gauss(self.a, self.b))  # a reboot takes no negative time
        return self.a

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a


@dataclass(frozen=True)
class Params:
    hosts: int
    release: Update  # what is rolled out, with the waves the simulation uses
    start: datetime  # t = 0: hosts start checking; times in the outputs are from here
    from_version: Version  # what every host runs before
    groups: int = 0  # 0: one group per 1,000 hosts
    slots: int = 1  # reboot slots per group
    check_interval: str = "1h"
    windows: tuple[dict[str, Any], ...] = ()  # settings.updates.maintenance-windows
    failure_rate: float = 0.0  # chance that the new version fails its health gate on a host
    reboot_time: RebootTime = RebootTime("fixed", 60.0, text="60s")
    seed: int = 0
    horizon: timedelta = timedelta(days=60)  # stop after this much simulated time
    sample: timedelta = timedelta(minutes=5)  # the timeline's resolution
    exact: bool = False  # run every pass of every daemon: no shortcuts (small fleets)
    waves_name: str = "release"  # where the waves came from, for the outputs

    def checked(self) -> Params:
        """The parameters with defaults filled in; KilnError names what cannot be used."""
        if self.hosts < 1:
            raise KilnError(f"--hosts {self.hosts}: at least one host")
        groups = self.groups or max(1, math.ceil(self.hosts / 1000))
        if not 1 <= groups <= self.hosts:
            raise KilnError(f"--groups {self.groups}: from 1 to the number of hosts ({self.hosts})")
        if not 1 <= self.slots <= 10_000:
            raise KilnError(f"--slots {self.slots}: from 1 to 10000 (kiln fleet serve's limit)")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise KilnError(f"--failure-rate {self.failure_rate}: a probability from 0 to 1")
        if self.seed < 0:
            raise KilnError(f"--seed {self.seed}: a whole number >= 0")
        if self.sample < timedelta(seconds=1) or self.horizon <= timedelta(0):
            raise KilnError("--sample is at least 1s and --horizon above 0")
        if not self.release.version > self.from_version:
            raise KilnError(f"the release {self.release.version} is not newer than the hosts' {self.from_version}",
                            hint="--from VERSION: what the hosts run before the rollout")
        try:
            Policy.from_settings(settings_for(self, "g"))
        except ValueError as e:
            raise KilnError(str(e)) from None
        return replace(self, groups=groups)

    def to_json(self) -> dict[str, Any]:
        return {"hosts": self.hosts, "groups": self.groups, "slots": self.slots, "release": str(self.release.version),
                "from": str(self.from_version), "variant": self.release.variant, "waves": self.waves_name,
                "check_interval": self.check_interval, "maintenance_windows": list(self.windows),
                "failure_rate": self.failure_rate, "reboot_time": self.reboot_time.text, "seed": self.seed,
                "start": format_time(self.start), "horizon_s": int(self.horizon.total_seconds()),
                "sample_s": int(self.sample.total_seconds()), "exact": self.exact}


def settings_for(p: Params, group: str) -> dict[str, Any]:
    """settings.updates of every host in `group` (one dict per group, shared)."""
    out: dict[str, Any] = {"strategy": "fleet-lock", "check-interval": p.check_interval,
                           "fleet-lock": {"url": LOCK_URL, "group": group}}
    if p.windows:
        out["maintenance-windows"] = [dict(w) for w in p.windows]
    return out


def read_windows(path: Any) -> tuple[dict[str, Any], ...]:
    """A file of maintenance windows in settings.updates.maintenance-windows' shape: TOML or
    JSON, as a list, `maintenance-windows = [...]` or a whole `settings.updates` tree;
    checked by the settings model (kiln.host.settings.model), errors naming the window."""
    import json
    import tomllib
    from pathlib import Path

    from kiln.host.settings.model import InvalidSettings, validate

    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise KilnError(f"--windows {p}: cannot read: {e}") from None
    try:
        doc: Any = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        kind = "JSON" if p.suffix == ".json" else "TOML (a .json file is read as JSON)"
        raise KilnError(f"--windows {p}: not valid {kind}: {e}") from None
    if isinstance(doc, dict):
        doc = doc.get("settings", doc)
        doc = doc.get("updates", doc) if isinstance(doc, dict) else doc
        doc = doc.get("maintenance-windows") if isinstance(doc, dict) else doc
    if not isinstance(doc, list) or not doc:
        raise KilnError(f"--windows {p}: no maintenance windows (a list, or [[maintenance-windows]] tables)")
    try:
        validate({"updates": {"maintenance-windows": doc}})
        for w in doc:
            windows.Window.from_settings(w)
    except InvalidSettings as e:
        raise KilnError(f"--windows {p}: {e}") from None
    except ValueError as e:
        raise KilnError(f"--windows {p}: {e}") from None
    return tuple(doc)
