"""The group semaphores in etcd: read, decide (kiln.fleet.semaphore), compare-and-swap.

One key per group (`kiln/fleet/v1/groups/<group>/semaphore`, Airlock's layout under Kiln's
prefix). A write succeeds only if the key is still at the revision the decision was made
on; a lost race re-reads and decides again, a bounded number of times. Every server
process is stateless: two of them, or two hundred, agree because etcd orders the writes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kiln.core.errors import KilnError
from kiln.fleet import semaphore as sem
from kiln.fleet.config import FleetConfig
from kiln.fleet.etcd import Etcd

PREFIX = "kiln/fleet/v1/groups/"
MAX_RACES = 64  # CAS attempts before a request gives up (200 agents on 3 slots stay far below)


class Contended(KilnError):
    """Every compare-and-swap lost its race: the caller answers 'retry later'."""


def key(group: str) -> str:
    return f"{PREFIX}{group}/semaphore"


class FleetLocks:
    def __init__(self, etcd: Etcd, config: FleetConfig, now: Callable[[], datetime] | None = None) -> None:
        self.etcd = etcd
        self.config = config
        self.now = now or (lambda: datetime.now(UTC))

    def _change(
        self, group: str, decide: Callable[[sem.Semaphore, datetime], tuple[sem.Semaphore, Any]]
    ) -> tuple[sem.Semaphore, Any]:
        """Apply `decide` to the group's semaphore until a compare-and-swap wins."""
        cfg = self.config.group(group)
        for attempt in range(MAX_RACES):
            entry = self.etcd.get(key(group))
            now = self.now()
            current = sem.expire(sem.Semaphore.from_bytes(entry.value, cfg.slots), cfg.stale_after, now)
            new, result = decide(current, now)
            if new == sem.Semaphore.from_bytes(entry.value, cfg.slots) and entry.mod_revision:
                return new, result  # nothing to write
            if self.etcd.swap(key(group), new.to_bytes(), entry.mod_revision):
                return new, result
            time.sleep(random.uniform(0, 0.002 * (attempt + 1)))  # spread the racers a little
        raise Contended(f"group {group}: lost {MAX_RACES} compare-and-swap races in a row")

    def lock(self, group: str, host: str, version: str | None = None) -> tuple[sem.Outcome, sem.Semaphore]:
        new, outcome = self._change(group, lambda s, now: sem.lock(s, host, now, version))
        return outcome, new

    def unlock(self, group: str, host: str, *, by: str | None = None) -> tuple[sem.Outcome, sem.Semaphore]:
        new, outcome = self._change(group, lambda s, now: sem.unlock(s, host, now, by=by))
        return outcome, new

    def report(self, group: str, host: str, *, version: str | None, failure: str | None) -> sem.Semaphore:
        new, _ = self._change(group, lambda s, now: (sem.report(s, host, now, version=version, failure=failure), None))
        return new

    def groups(self) -> dict[str, sem.Semaphore | str]:
        """Every group with a semaphore in etcd, and every configured one; for a document
        that does not parse, what is wrong with it (the other groups are still shown)."""
        out: dict[str, sem.Semaphore | str] = {n: sem.Semaphore(cfg.slots) for n, cfg in self.config.groups.items()}
        now = self.now()
        for k, entry in self.etcd.get_prefix(PREFIX).items():
            name = k.removeprefix(PREFIX).removesuffix("/semaphore")
            cfg = self.config.group(name)
            try:
                out[name] = sem.expire(sem.Semaphore.from_bytes(entry.value, cfg.slots), cfg.stale_after, now)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                out[name] = f"the semaphore in etcd ({key(name)}) is unreadable: {type(e).__name__}"
        return out

    def status(self) -> dict[str, Any]:
        now = self.now()
        groups = [sem.summary(s, g, now) if isinstance(s, sem.Semaphore) else {"group": g, "error": s}
                  for g, s in sorted(self.groups().items())]
        return {"time": sem.stamp(now), "groups": groups}
