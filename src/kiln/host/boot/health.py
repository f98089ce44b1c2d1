"""The health gate: a boot counts as successful only when the host is actually healthy.

Bottlerocket marks a boot successful once its boot target is reached. Kiln also waits
for what `settings.health` names (units that must be active, an optional HTTP check)
within its timeout. A new version that fails the gate reboots into the previous slot by
itself, leaving a note the previous version reports (`/updates/status` last_failure).
A version whose boot was marked successful before is never rolled back for a later
failure: the host only stays not-ready and says why.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

READY_TARGET = "kiln-ready.target"
DEFAULT_TIMEOUT = 120
POLL = 1.0


@dataclass(frozen=True)
class Check:
    units: tuple[str, ...] = ()
    http: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Check:
        h = settings.get("health") or {}
        return cls(tuple(h.get("units") or ()), h.get("http-check"), float(h.get("timeout") or DEFAULT_TIMEOUT))


def parse_show(out: str, units: list[str]) -> dict[str, str]:
    """ActiveState of each of `units` from `systemctl show --property=Id,ActiveState`
    (blocks separated by blank lines); "unknown" for a unit systemd did not describe."""
    states: dict[str, str] = {}
    for block in out.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in fields:
            states[fields["Id"]] = fields.get("ActiveState", "unknown")
    return {u: states.get(u, "unknown") for u in units}


def _unit_states(units: list[str]) -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", "--property=Id,ActiveState", "--", *units], capture_output=True, text=True, check=False
    ).stdout
    return parse_show(out, units)


def _http_ok(url: str) -> str | None:
    """None when `url` answers 2xx within 5 s, else what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # a URL from validated settings
            return None if 200 <= r.status < 300 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


def wait_healthy(check: Check, *, states: Any = _unit_states, http: Any = _http_ok, poll: float = POLL,
                 target_reached: bool = False) -> str | None:
    """Poll until every unit is active and the HTTP check passes; None when healthy,
    else the reason (which unit, which answer) once the timeout has passed. The ready
    target is checked once, in the first query: it has finished (reached or failed) when
    this runs. `target_reached`: the caller saw `systemctl start` of it succeed, so no
    process is started to ask again (each costs about half a second under emulation)."""
    deadline = time.monotonic() + check.timeout
    first = True
    while True:
        ask = list(check.units) if target_reached or not first else [READY_TARGET, *check.units]
        seen = states(ask) if ask else {}
        if first and not target_reached and (ready := seen.pop(READY_TARGET)) != "active":
            return f"{READY_TARGET} was not reached ({ready}): a unit the host needs failed"
        first = False
        problems = [f"{u} is {s}" for u, s in seen.items() if s != "active"]
        if check.http and not problems and (err := http(check.http)):
            problems.append(f"health check {check.http}: {err}")
        if not problems:
            return None
        if time.monotonic() >= deadline:
            return "; ".join(problems) + f" (after {check.timeout:.0f} s)"
        time.sleep(poll)
