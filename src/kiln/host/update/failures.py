"""The log of versions this host fell back from, and what it means for retrying them.

A power cut is not a bad release. Each entry (`failures.json`, newest last) is one of:

- **definite**: the new version booted and said it is unhealthy: the health gate failed,
  an essential bootstrap container failed, a migration failed (all end in the gate's
  verdict and leave a note before the rollback). The version is not retried here.
- **ambiguous**: the new version never reported either way ("did not finish booting"):
  a power cut, a hypervisor reset, a hang or a panic look alike from the old slot. It is
  retried, with a growing pause, until `settings.updates.max-boot-attempts` boots failed.

An operator clears a version's entries (`kiln update retry VERSION`): they stay in the
log, marked cleared, and no longer count. Stdlib only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from kiln.core.fs import atomic_write

DEFINITE: Literal["definite"] = "definite"
AMBIGUOUS: Literal["ambiguous"] = "ambiguous"
DEFAULT_MAX_BOOT_ATTEMPTS = 3
KEEP = 20
# The ready step's reason when the other slot never marked a boot successful.
UNHEALTHY = (
    "did not finish booting: no successful boot was recorded "
    "(a kernel panic, a hang, or a failure before the health gate)"
)


def read(path: Any) -> list[dict[str, Any]]:
    try:
        entries = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def record(path: Any, entry: dict[str, Any]) -> None:
    """Append to the log (bounded to the newest KEEP entries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps([*read(path), entry][-KEEP:], indent=1).encode() + b"\n")


def clear(path: Any, version: str) -> int:
    """Mark every entry for `version` cleared; returns how many were still counting."""
    entries = read(path)
    n = 0
    for e in entries:
        if str(e.get("version")) == version and not e.get("cleared"):
            e["cleared"] = True
            n += 1
    if n:
        atomic_write(path, json.dumps(entries, indent=1).encode() + b"\n")
    return n


def kind_of(entry: dict[str, Any]) -> str:
    """An entry's kind; entries written before kinds existed are judged by their reason."""
    kind = entry.get("kind")
    if kind in (DEFINITE, AMBIGUOUS):
        return str(kind)
    return AMBIGUOUS if str(entry.get("reason", "")).startswith("did not finish booting") else DEFINITE


def retry_pause(attempts: int) -> timedelta:
    """After `attempts` ambiguous failures: the first retry at the next check (a power cut is
    the usual cause), then 10 min, 20 min... at most 6 h."""
    if attempts <= 1:
        return timedelta(0)
    pause: timedelta = timedelta(minutes=10) * 2 ** (attempts - 2)
    return min(pause, timedelta(hours=6))


@dataclass(frozen=True)
class Verdict:
    version: str
    attempts: int  # failed boots that count (not cleared)
    definite: bool
    last: dict[str, Any]
    retry_at: datetime | None  # None: not retried (definite, or attempts used up)

    @property
    def final(self) -> bool:
        return self.retry_at is None

    def describe(self, max_attempts: int) -> str:
        reason = str(self.last.get("reason", "unknown"))
        if self.definite:
            return f"{self.version} failed on this host ({reason}) and is not retried"
        if self.retry_at is None:
            return f"{self.version} did not finish booting here {self.attempts} times (of {max_attempts}): not retried"
        return (f"{self.version} did not finish booting here ({self.attempts} of {max_attempts} attempts); "
                f"retried from {self.retry_at.strftime('%Y-%m-%dT%H:%M:%SZ')}")


def _at(entry: dict[str, Any]) -> datetime:
    try:
        return datetime.strptime(str(entry.get("at")), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return datetime(1970, 1, 1, tzinfo=UTC)


def verdicts(entries: Iterable[dict[str, Any]], max_attempts: int = DEFAULT_MAX_BOOT_ATTEMPTS) -> dict[str, Verdict]:
    """Per version: does it count as failed here, and if not yet, from when may it be retried."""
    by_version: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        if not e.get("cleared"):
            by_version.setdefault(str(e.get("version")), []).append(e)
    out = {}
    for version, es in by_version.items():
        definite = any(kind_of(e) == DEFINITE for e in es)
        attempts = len(es)
        last = es[-1]
        retry_at = None if definite or attempts >= max_attempts else _at(last) + retry_pause(attempts)
        out[version] = Verdict(version, attempts, definite, last, retry_at)
    return out
