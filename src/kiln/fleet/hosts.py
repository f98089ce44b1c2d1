"""The fleet's view of its hosts: each host's latest report, kept in etcd, forgotten when it stops.

A Kiln host reports (`POST /v1/report`, and the `kiln` member of its lock requests) after
every check: its version, slot, the update daemon's state, the version being rolled out and
its last failure. Each report replaces the host's key `kiln/fleet/v1/hosts/<group>/<id>`.

Entries are bounded two ways:
- in time: every key is put with a lease. One lease per server per `period` (a quarter of
  `forget_after`) is shared by every report it receives, and lives `forget_after + period`:
  a host that stops reporting disappears within that time, with one lease grant per period
  rather than one per host;
- in number: past `max_hosts` entries, a host etcd does not know yet is refused
  (`too_many_hosts`); the hosts already known keep reporting.

Nothing here decides locks: a report is the host's word, shown, never trusted for a slot.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kiln.fleet.etcd import Etcd
from kiln.fleet.semaphore import parse_stamp, stamp

PREFIX = "kiln/fleet/v1/"
HOSTS = "hosts/"  # + <group>/<id>: a host's latest report
HISTORY = "history"  # the fleet's versions over time, one bounded list
STATES = ("manual", "idle", "waiting-for-window", "waiting-for-lock", "rebooting", "confirming", "failed")
MAX_HOSTS = 250_000
MAX_HISTORY = 2_000  # points of versions over time (a day and more at one a minute)
FORGET_AFTER = timedelta(hours=24)
SUMMARY_TTL = 5.0  # seconds a computed summary serves readers (a dashboard refreshes every few)
MAX_FIELD = 64
MAX_FAILURE = 512


class TooManyHosts(Exception):
    """The fleet view holds `max_hosts` entries: a new host is not added."""


@dataclass(frozen=True)
class HostReport:
    id: str
    group: str
    version: str | None = None
    slot: str | None = None
    state: str | None = None
    target: str | None = None
    failure: str | None = None
    seen: str = ""

    @classmethod
    def from_request(cls, host: str, group: str, kiln: dict[str, Any], now: datetime) -> HostReport:
        """From the `kiln` member of a request, each field cut to size or dropped when malformed."""

        def text(name: str, limit: int = MAX_FIELD) -> str | None:
            v = kiln.get(name)
            return v[:limit] if isinstance(v, str) and v and v.isprintable() else None

        state = text("state")
        slot = text("slot")
        return cls(host, group, text("version"), slot if slot in ("A", "B") else None,
                   state if state in STATES else None, text("target"), text("failure", MAX_FAILURE), stamp(now))

    @classmethod
    def from_bytes(cls, data: bytes) -> HostReport:
        doc = json.loads(data)
        return cls(**{k: doc.get(k) for k in cls.__dataclass_fields__ if k in doc})

    def to_bytes(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, separators=(",", ":")).encode()


class FleetHosts:
    """Reports in, the fleet's view out; a summary computed at most every SUMMARY_TTL seconds."""

    def __init__(self, etcd: Etcd, *, forget_after: timedelta = FORGET_AFTER, max_hosts: int = MAX_HOSTS,
                 now: Callable[[], datetime] | None = None, prefix: str = PREFIX) -> None:
        self.etcd = etcd
        self.prefix = prefix  # of every key here (tests give each fleet its own)
        self.forget_after = forget_after
        self.period = forget_after / 4
        self.max_hosts = max_hosts
        self.now = now or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._lease: tuple[int, datetime] | None = None  # (id, when the next one is due)
        self._count: tuple[int, float] = (0, 0.0)  # (entries, monotonic time counted)
        self._cached: tuple[float, list[HostReport]] | None = None

    def _current_lease(self, now: datetime) -> int:
        with self._lock:
            if self._lease is None or now >= self._lease[1]:
                ttl = int((self.forget_after + self.period).total_seconds())
                self._lease = (self.etcd.grant(max(ttl, 1)), now + self.period)
            return self._lease[0]

    def _entries(self) -> int:
        count, when = self._count
        if time.monotonic() - when > SUMMARY_TTL:
            count = self.etcd.count_prefix(self.prefix + HOSTS)
            self._count = (count, time.monotonic())
        return count

    def put(self, report: HostReport) -> None:
        key = f"{self.prefix}{HOSTS}{report.group}/{report.id}"
        if self._entries() >= self.max_hosts and not self.etcd.get(key).mod_revision:
            raise TooManyHosts(f"the fleet view holds {self.max_hosts} hosts; {report.id} is not added")
        self.etcd.put(key, report.to_bytes(), lease=self._current_lease(self.now()))

    def all(self) -> list[HostReport]:
        """Every host's latest report (cached for SUMMARY_TTL: 100,000 hosts are ~20 MB from etcd)."""
        cached = self._cached
        if cached is not None and time.monotonic() - cached[0] < SUMMARY_TTL:
            return cached[1]
        out = []
        for entry in self.etcd.get_prefix(self.prefix + HOSTS).values():
            try:
                out.append(HostReport.from_bytes(entry.value))
            except (ValueError, TypeError):
                continue  # not ours to show; the next report of that host replaces it
        out.sort(key=lambda r: (r.group, r.id))
        self._cached = (time.monotonic(), out)
        return out

    # --- what the dashboard and /metrics show ----------------------------------------------

    def summary(self, reports: Iterable[HostReport] | None = None) -> dict[str, Any]:
        reports = self.all() if reports is None else list(reports)
        groups: dict[str, dict[str, Counter[str]]] = {}
        versions: Counter[str] = Counter()
        states: Counter[str] = Counter()
        for r in reports:
            g = groups.setdefault(r.group, {"versions": Counter(), "states": Counter()})
            v, s = r.version or "unknown", r.state or "unknown"
            g["versions"][v] += 1
            g["states"][s] += 1
            versions[v] += 1
            states[s] += 1
        return {"total": sum(versions.values()), "versions": dict(versions), "states": dict(states),
                "groups": {n: {k: dict(c) for k, c in g.items()} for n, g in sorted(groups.items())},
                "forget_after_seconds": int(self.forget_after.total_seconds())}

    def select(self, *, group: str | None = None, state: str | None = None, version: str | None = None,
               text: str | None = None, limit: int = 200, offset: int = 0) -> dict[str, Any]:
        """The hosts matching every filter given (`text`: a substring of the id, or of the failure)."""
        found = [r for r in self.all()
                 if (group is None or r.group == group) and (state is None or r.state == state)
                 and (version is None or r.version == version)
                 and (not text or text in r.id or (r.failure is not None and text in r.failure))]
        page = found[offset:offset + limit]
        return {"total": len(found), "offset": offset, "hosts": [asdict(r) for r in page]}

    def record_history(self, interval: timedelta) -> bool:
        """Append a point (hosts per version and per state) to the history in etcd, unless
        the last one is younger than 90 % of `interval` (several servers share one history)."""
        now = self.now()
        summary = self.summary()
        for _ in range(8):  # compare-and-swap races with other servers: a few tries
            entry = self.etcd.get(self.prefix + HISTORY)
            points: list[dict[str, Any]] = json.loads(entry.value) if entry.value else []
            if points and now - parse_stamp(points[-1]["t"]) < interval * 0.9:
                return False
            points.append({"t": stamp(now), "versions": summary["versions"], "states": summary["states"]})
            if self.etcd.swap(self.prefix + HISTORY, json.dumps(points[-MAX_HISTORY:]).encode(), entry.mod_revision):
                return True
        return False

    def history(self) -> list[dict[str, Any]]:
        entry = self.etcd.get(self.prefix + HISTORY)
        try:
            points: list[dict[str, Any]] = json.loads(entry.value) if entry.value else []
        except ValueError:
            return []
        return points

