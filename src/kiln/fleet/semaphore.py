"""The reboot semaphore of one group: pure decisions on its JSON document.

FleetLock's model (zincati's protocol document): a counting semaphore whose slots are
*owned* by host ids and taken *recursively* (a holder asking again succeeds). Kiln's
document keeps, per holder, since when it holds and when it was last heard from, and the
last failure it reported (a release that failed its health gate on that host: the slot
stays taken, so the group halts at as many hosts as it has slots). A bounded log of
events (releases by operators, expiries) stays with it for `kiln fleet status`.

Nothing here does I/O: `kiln.fleet.locks` reads the document from etcd, applies one of
these functions and writes it back with a compare-and-swap.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from kiln.host.update.manifest import format_time as stamp  # one timestamp format with the hosts

__all__ = ["Holder", "Outcome", "Semaphore", "expire", "lock", "parse_stamp", "report", "stamp", "summary", "unlock"]

MAX_EVENTS = 20
MAX_FAILURE = 512  # characters of a reported failure kept


class Outcome(StrEnum):
    GRANTED = "granted"  # a new slot taken
    RETAINED = "retained"  # the holder asked again
    FULL = "full"  # every slot held by others
    RELEASED = "released"
    NOT_HELD = "not-held"  # steady-state from a host that held nothing: still a success


@dataclass(frozen=True)
class Holder:
    id: str
    since: str
    seen: str
    version: str | None = None  # what the host runs, as it last said (Kiln extension)
    failure: str | None = None  # why its update failed, if it reported one


@dataclass(frozen=True)
class Semaphore:
    total_slots: int
    holders: tuple[Holder, ...] = ()
    events: tuple[dict[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def from_bytes(cls, data: bytes, slots: int) -> Semaphore:
        """The stored document (or a fresh one for b''); `slots` from the configuration wins."""
        if not data:
            return cls(slots)
        doc = json.loads(data)
        holders = tuple(
            Holder(**{k: v for k, v in h.items() if k in Holder.__dataclass_fields__}) for h in doc.get("holders", [])
        )
        events = tuple(e for e in doc.get("events", []) if isinstance(e, dict))
        return cls(slots, holders, events)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    def holder(self, host: str) -> Holder | None:
        return next((h for h in self.holders if h.id == host), None)

    def _event(self, now: datetime, kind: str, host: str, **extra: str) -> tuple[dict[str, str], ...]:
        return (*self.events, {"at": stamp(now), "event": kind, "id": host, **extra})[-MAX_EVENTS:]


def parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def lock(sem: Semaphore, host: str, now: datetime, version: str | None = None) -> tuple[Semaphore, Outcome]:
    """RecursiveLock: a holder keeps its slot (and is marked seen); anyone else gets a free
    slot or FULL. A group whose slots were lowered below its holders grants nothing new."""
    held = sem.holder(host)
    if held is not None:
        seen = replace(held, seen=stamp(now), version=version or held.version)
        return replace(sem, holders=tuple(seen if h.id == host else h for h in sem.holders)), Outcome.RETAINED
    if len(sem.holders) >= sem.total_slots:
        return sem, Outcome.FULL
    new = Holder(host, stamp(now), stamp(now), version)
    return replace(sem, holders=tuple(sorted((*sem.holders, new), key=lambda h: h.id))), Outcome.GRANTED


def unlock(sem: Semaphore, host: str, now: datetime, *, by: str | None = None) -> tuple[Semaphore, Outcome]:
    """UnlockIfHeld; `by` names an operator releasing a slot for a host (kept as an event)."""
    if sem.holder(host) is None:
        return sem, Outcome.NOT_HELD
    events = sem._event(now, "released", host, by=by) if by else sem.events
    return replace(sem, holders=tuple(h for h in sem.holders if h.id != host), events=events), Outcome.RELEASED


def report(sem: Semaphore, host: str, now: datetime, *, version: str | None, failure: str | None) -> Semaphore:
    """A holder's report (Kiln extension): what it runs and why its update failed. A
    report from a host that holds nothing changes nothing here."""
    held = sem.holder(host)
    if held is None:
        return sem
    updated = replace(held, seen=stamp(now), version=version or held.version,
                      failure=failure[:MAX_FAILURE] if failure else None)
    first = failure and not held.failure
    events = sem._event(now, "failed", host, reason=updated.failure or "") if first else sem.events
    return replace(sem, holders=tuple(updated if h.id == host else h for h in sem.holders), events=events)


def expire(sem: Semaphore, stale_after: timedelta | None, now: datetime) -> Semaphore:
    """Drop holders not heard from for `stale_after` (off when None), with an event each."""
    if stale_after is None:
        return sem
    keep, events = [], sem.events
    for h in sem.holders:
        if now - parse_stamp(h.seen) >= stale_after:
            events = replace(sem, events=events)._event(now, "expired", h.id, seen=h.seen)
        else:
            keep.append(h)
    if len(keep) == len(sem.holders):
        return sem
    return replace(sem, holders=tuple(keep), events=events)


def summary(sem: Semaphore, group: str, now: datetime) -> dict[str, Any]:
    """The group as `GET /v1/status` shows it."""
    holders = [
        {**asdict(h), "held_for": int((now - parse_stamp(h.since)).total_seconds())} for h in sem.holders
    ]
    failed = [h for h in holders if h["failure"]]
    return {
        "group": group,
        "slots": sem.total_slots,
        "free": max(0, sem.total_slots - len(sem.holders)),
        "holders": holders,
        "halted": bool(failed) and len(sem.holders) >= sem.total_slots,
        "events": list(sem.events),
    }
