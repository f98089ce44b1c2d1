"""`kiln fleet simulate`: a release's rollout to N hosts, played out before it starts.

Every simulated host runs the real update daemon (`kiln.host.update.daemon.Updater`) on a
virtual clock: an event queue (heapq) holds, per host, when its daemon looks again, and
each event is one `Updater.step()`, as the host agent runs it. What is simulated
is only what lies outside the daemon:

- the host (`SimHost`, the daemon's HostPort and StateStore): `refresh` and `prepare` ask
  the agent's own `choose` (kiln.host.update.manifest: the waves, this host's seed, the
  versions that failed here); a reboot takes a drawn time, after which the host runs the
  new version, or, with `failure_rate`, failed its health gate and rolled back (a definite
  entry in its failures log, as `kiln.host.boot.health` writes one);
- the fleet server (`MemoryLocks`): kiln.fleet.semaphore's lock/unlock/report decisions on
  one in-memory Semaphore per group, answered as `kiln fleet serve` answers them (a full
  group is a 423 `LockRefused`), with no etcd and no HTTP.

100,000 daemons that each look every hour for a week would make 17 million passes, nearly
all of which find nothing. The simulator runs the passes where something can happen, and
not those that provably change nothing:

- before its wave opens, a host's checks find nothing: `choose` is a pure function of the
  manifest, the host and the time, and says when this seed's wave opens. A host's first
  pass is its first check at or after that moment: where its jittered check cycle stands
  then is drawn from the cycle's stationary distribution (`first_checks`);
- a host on the new version, idle and holding no slot, is done (there is one release);
- a host that failed keeps its slot and has told the server why: its later heartbeats
  repeat the same report;
- a host waiting for a maintenance window is run next when the window opens (its checks
  until then find the same staged release);
- a host refused a slot because its group is full is parked: while the group stays full
  every retry would be refused by the same semaphore. When a holder gives a slot back, the
  parked host whose retry comes first is run: a host's own next retry time while it is
  still ahead; for the hosts whose last known retry has passed (they retry every
  `lock_backoff`, U(cap/2, cap), cap = min(5 min, the check interval), on whole seconds),
  the first of n such retries is drawn as the least of n forward recurrence times, and
  which host it is, uniformly. Only this choice is a model; the grant is the semaphore's.
`exact=True` runs every pass instead (for small fleets, to check the shortcuts).
"""

from __future__ import annotations

import heapq
import math
import random
import resource
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from kiln.core.errors import KilnError
from kiln.fleet import semaphore as sem
from kiln.fleet.simulate_params import LOCK_URL, Params, settings_for
from kiln.host.update import failures, windows
from kiln.host.update import waves as wavemath
from kiln.host.update.daemon import JITTER, LOCK_BACKOFF_CAP, DaemonState, Lock, Phase, Policy, Updater, parse
from kiln.host.update.fleetlock import FleetLockClient, LockRefused
from kiln.host.update.manifest import Choice, Host, Manifest, Update, Version, choose, format_time
from kiln.host.update.status import AVAILABLE, IDLE, READY, STAGED

US = timedelta(microseconds=1)
# The daemon's phases as the timeline counts them (manual never happens here: strategy fleet-lock).
STATES = (Phase.IDLE, Phase.WAITING_WINDOW, Phase.WAITING_LOCK, Phase.REBOOTING, Phase.CONFIRMING, Phase.FAILED,
          Phase.MANUAL)
_CODE: dict[str, int] = {str(p): i for i, p in enumerate(STATES)}
IDLE_C, WINDOW_C, LOCK_C, REBOOT_C, CONFIRM_C, FAILED_C = range(6)
ACTIVATE, STEP, BOOT = 0, 1, 2  # event kinds
THRESHOLDS = (50, 90, 100)  # percent of the fleet on the new version
PER_GROUP_MAX = 100  # groups listed one by one in the timeline up to this many


# --- the fleet server, in memory ---------------------------------------------------------
class MemoryLocks:
    """`kiln fleet serve` without etcd or HTTP: kiln.fleet.semaphore's decisions on one
    Semaphore per group (FleetLockService's answers: a full group is 423)."""

    def __init__(self, groups: list[str], slots: int, now: Callable[[], datetime],
                 on_free: Callable[[int], None]) -> None:
        self.index = {g: i for i, g in enumerate(groups)}
        self.sems = [sem.Semaphore(slots) for _ in groups]
        self.now, self.on_free = now, on_free
        self.held = 0
        self.most = [0] * len(groups)  # most slots a group ever had held at once
        self.halted: dict[int, datetime] = {}  # group -> when every slot was held by a failed host
        self.requests = 0

    def lock(self, group: str, host: str, version: str | None) -> dict[str, Any]:
        self.requests += 1
        i = self.index[group]
        s = self.sems[i]
        new, outcome = sem.lock(s, host, self.now(), version)
        if outcome is sem.Outcome.FULL:
            holders = ", ".join(h.id for h in s.holders)
            raise LockRefused(423, "failed_lock_semaphore_full",
                              f"group {group}: all {s.total_slots} slots held (by {holders})")
        self.sems[i] = new
        if outcome is sem.Outcome.GRANTED:
            self.held += 1
            self.most[i] = max(self.most[i], len(new.holders))
        return {"kind": outcome.value, "value": f"group {group}: slot held by {host}"}

    def unlock(self, group: str, host: str) -> dict[str, Any]:
        self.requests += 1
        i = self.index[group]
        new, outcome = sem.unlock(self.sems[i], host, self.now())
        if outcome is sem.Outcome.RELEASED:
            self.sems[i] = new
            self.held -= 1
            self.on_free(i)
        return {"kind": outcome.value, "value": f"group {group}: {host} holds no slot"}

    def report(self, group: str, host: str, version: str | None, failure: str | None) -> dict[str, Any]:
        i = self.index[group]
        s = self.sems[i]
        new = sem.report(s, host, self.now(), version=version, failure=failure)
        if new is s:  # from a host that holds nothing: nothing changes
            return {"kind": "reported", "held": False}
        self.requests += 1
        self.sems[i] = new
        if len(new.holders) >= new.total_slots and all(h.failure for h in new.holders):
            self.halted.setdefault(i, self.now())
        return {"kind": "reported", "held": True}


@dataclass(frozen=True)
class SimLockClient(FleetLockClient):
    """The daemon's FleetLock client, talking to MemoryLocks instead of HTTP."""

    locks: MemoryLocks | None = None
    host: SimHost | None = None

    def pre_reboot(self, version: str | None = None, report: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.locks is not None and self.host is not None
        try:
            return self.locks.lock(self.group, self.id, version)
        except LockRefused:
            self.host.refused = True
            raise

    def steady_state(self) -> dict[str, Any]:
        assert self.locks is not None
        return self.locks.unlock(self.group, self.id)

    def report(self, version: str, failure: str | None, **more: str | None) -> dict[str, Any]:
        assert self.locks is not None
        return self.locks.report(self.group, self.id, version, failure)


# --- one host ------------------------------------------------------------------------------
class HostFleet(Protocol):
    """What a SimHost reads from its fleet (the Simulation; a test's wall-clock fleet)."""

    settings: dict[str, dict[str, Any]]  # settings.updates per group
    manifest: Manifest
    chosen: int  # choose calls, counted

    @property
    def locks(self) -> MemoryLocks | None: ...

    @property
    def now_dt(self) -> datetime: ...


class SimHost:
    """A simulated host: the daemon's HostPort (slots, agent, reboot) and its StateStore."""

    __slots__ = ("client", "daemon", "failing", "failures", "fleet", "group", "id", "idx", "model", "reason",
                 "rebooted", "refused", "rng", "slot", "staged", "state", "updater", "version")

    def __init__(self, fleet: HostFleet, idx: int, group: str, model: Host, rng: random.Random) -> None:
        self.rng: random.Random | None
        self.fleet, self.idx, self.group, self.model, self.rng = fleet, idx, group, model, rng
        self.id = f"host-{idx:06d}"
        self.version, self.slot = str(model.version), "A"
        self.state, self.reason = IDLE, ""
        self.staged: str | None = None
        self.failures: list[dict[str, Any]] = []
        self.daemon = DaemonState()
        self.rebooted = self.refused = self.failing = False
        self.client = SimLockClient(LOCK_URL, self.id, group, locks=fleet.locks, host=self)
        self.updater: Updater | None = None

    def lock_client(self, _p: Policy, _node: str) -> FleetLockClient:
        return self.client

    # StateStore: the daemon's state stays in memory (the same object across "restarts":
    # the daemon saves before every return, so it is what a new process would load)
    def load(self) -> DaemonState:
        return self.daemon

    def save(self, state: DaemonState) -> None:
        self.daemon = state

    # HostPort
    def settings(self) -> dict[str, Any]:
        return self.fleet.settings[self.group]

    def running_version(self) -> str:
        return self.version

    def running_slot(self) -> str:
        return self.slot

    def gate_passed(self) -> bool:
        return True  # the reboot time lasts until the gate decided; a failed gate rolled back

    def update_state(self) -> tuple[str, str | None, str]:
        return self.state, self.staged, self.reason

    def _choose(self) -> Choice:
        self.fleet.chosen += 1
        return choose(self.fleet.manifest, self.model, self.fleet.now_dt)

    def command(self, name: str) -> None:
        """The agent's refresh/prepare/activate, as kiln.host.update.agent changes its status."""
        if name == "refresh":
            choice = self._choose()
            self.reason = choice.reason
            if self.state in (IDLE, AVAILABLE):
                self.state = AVAILABLE if choice.update else IDLE
        elif name == "prepare":
            choice = self._choose()
            self.reason = choice.reason
            if choice.update is None:
                self.state = IDLE
                raise KilnError(f"nothing to prepare: {choice.reason}")
            self.staged, self.state = str(choice.update.version), STAGED
        elif name == "activate":
            self.state = READY
        else:
            raise KilnError(f"update command {name} is not simulated")

    def verdict(self, version: str, max_attempts: int) -> failures.Verdict | None:
        return failures.verdicts(self.failures, max_attempts).get(version) if self.failures else None

    def drain(self) -> None:
        pass

    def undrain(self) -> None:
        pass

    def reboot(self) -> None:
        self.rebooted = True

    def boot(self, now: datetime) -> None:
        """The reboot is over: on the new version, or back on the old one after its gate failed."""
        if self.failing:
            self.failures.append({"version": self.staged, "kind": failures.DEFINITE, "at": format_time(now),
                                  "reason": "the health gate failed (simulated)"})
            self.model = replace(self.model, failed=self.model.failed | {Version.parse(str(self.staged))})
        else:
            self.version, self.slot = str(self.staged), "B" if self.slot == "A" else "A"
            self.model = replace(self.model, version=Version.parse(self.version))
        self.state, self.staged = IDLE, None


# --- the simulation -------------------------------------------------------------------------
@dataclass
class Result:
    params: Params
    points: list[dict[str, Any]]
    summary: dict[str, Any]
    waves: list[dict[str, Any]]
    groups: list[str] = field(default_factory=list)

    def plan(self) -> dict[str, Any]:
        """timeline.json: what the dashboard loads as a planned rollout."""
        return {"kind": "kiln-fleet-plan", "start": format_time(self.params.start),
                "release": str(self.params.release.version), "params": self.params.to_json(),
                "waves": self.waves, "points": self.points, "summary": self.summary}


def wave_view(release: Update, seeds: list[int]) -> list[dict[str, Any]]:
    """Each wave: when it opens, its share of the seed range and of the simulated hosts."""
    starts = sorted(release.waves)
    counts = [0] * len(starts)
    for s in seeds:
        i = bisect_left(starts, s) - 1  # the wave of the largest start seed below s
        if i >= 0:
            counts[i] += 1
    out = []
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else wavemath.MAX_SEED - 1
        out.append({"name": f"wave {i + 1}", "seed": s, "opens": format_time(release.waves[s]),
                    "hosts": round((end - s) / wavemath.MAX_SEED, 4), "hosts_simulated": counts[i]})
    return out


class Simulation:
    def __init__(self, params: Params, trace: bool = False) -> None:
        p = self.p = params.checked()
        # with trace: (µs, host, event) for each reboot asked, and each host updated or failed
        self.trace: list[tuple[int, int, str]] | None = [] if trace else None
        self.start = p.start
        self.exact = p.exact
        self.new = str(p.release.version)
        self.old = str(p.from_version)
        self.manifest = Manifest([p.release], {})
        width = len(str(p.groups - 1))
        self.group_names = [f"group-{i:0{width}d}" for i in range(p.groups)]
        self.settings = {g: settings_for(p, g) for g in self.group_names}
        self.policy = Policy.from_settings(self.settings[self.group_names[0]])
        self.interval = self.policy.interval
        self.iv_us = self.interval // US
        # A parked host's retries, once its backoff is capped (lock_backoff): every U(cap/2, cap),
        # stored to the second (format_time truncates: half a second sooner on average).
        cap = min(LOCK_BACKOFF_CAP, self.interval) // US
        self.start_us_in_second = p.start.microsecond
        self.retry_gap = (max(1, cap // 2 - 500_000), max(2, cap - 500_000))
        master = random.Random(p.seed)
        self.seeds = [master.randrange(wavemath.MAX_SEED) for _ in range(p.hosts)]
        self.world = random.Random(f"kiln-fleet-simulate-{p.seed}")  # reboot times, failures, lotteries
        self.now_us, self.now_dt = 0, p.start
        self.locks = MemoryLocks(self.group_names, p.slots, self._now, self._freed)
        self.hosts: list[SimHost | None] = [None] * p.hosts
        self.phase = bytearray(p.hosts)  # every host starts idle
        self.counts = [0] * len(STATES)
        self.counts[IDLE_C] = p.hosts
        self.on_new = 0
        self.reached: dict[int, int] = {}  # threshold percent -> when (µs)
        self.peak, self.peak_us = 0, 0
        self.reboots = self.failed_boots = 0
        self.failed_by_group: dict[int, int] = {}
        self.passes = self.chosen = self.events = self.not_run = self.parks = self.lotteries = 0
        self.fresh: list[list[tuple[int, int]]] = [[] for _ in range(p.groups)]  # parked: (next retry µs, host)
        self.stale: list[list[int]] = [[] for _ in range(p.groups)]  # parked, last known retry passed
        self.parked = 0
        self.heap: list[int] = []
        self.shift = max(1, p.hosts.bit_length()) + 2
        self.mask = (1 << (self.shift - 2)) - 1
        self.sample_us, self.horizon_us = p.sample // US, p.horizon // US
        self.next_sample = 0
        self.rows: list[tuple[int, tuple[int, ...]]] = []
        self._last: tuple[int, tuple[int, ...]] | None = None
        self._models: dict[int, Host] = {}  # per seed: hosts alike before the rollout share one
        self.ready_us = self._ready_times()

    # --- time and events ----------------------------------------------------------------
    def _now(self) -> datetime:
        return self.now_dt

    def _push(self, t_us: int, idx: int, kind: int) -> None:
        heapq.heappush(self.heap, (t_us << self.shift) | (idx << 2) | kind)

    def _ready_times(self) -> dict[int, int]:
        """Per seed: when the agent's choose first takes the release (µs from the start);
        one choose per distinct seed (hosts with one seed and version choose alike)."""
        out = {}
        for seed in set(self.seeds):
            model = self.model(seed)
            choice = choose(self.manifest, model, self.start)
            if choice.update is not None:
                out[seed] = 0
            elif choice.ready_at is not None:
                out[seed] = max(0, (choice.ready_at - self.start) // US)
            else:
                raise KilnError(f"hosts on {self.old} never take {self.new}: {choice.reason}")
        return out

    def first_checks(self) -> list[int]:
        """Per host, its first check at or after its wave opens (µs). A daemon checks every
        interval x U(1 - JITTER, 1 + JITTER), and has done so since long before the release:
        where its cycle stands when the wave opens is the stationary one, a uniform point of
        a size-biased gap (density proportional to the gap's length: sqrt of a uniform draw
        between the squared bounds). Its checks before that find nothing (choose is a pure
        function of the manifest, the host and the time, and said when the wave opens)."""
        lo, hi = (1 - JITTER) ** 2, (1 + JITTER) ** 2
        rng, iv = random.Random(f"kiln-fleet-simulate-phase-{self.p.seed}"), self.iv_us
        out = []
        for seed in self.seeds:
            out.append(self.ready_us[seed] + int(rng.random() * iv * math.sqrt(rng.uniform(lo, hi))))
        return out

    def model(self, seed: int) -> Host:
        """What the agent's choose knows of a host with this seed before the rollout."""
        r = self.p.release
        return Host(variant=r.variant, arch=r.arch, version=self.p.from_version, seed=seed)

    # --- running --------------------------------------------------------------------------
    def run(self) -> Result:
        wall = time.monotonic()
        self.heap[:] = [(t << self.shift) | (idx << 2) | ACTIVATE for idx, t in enumerate(self.first_checks())]
        self.not_run = sum(self.ready_us[seed] // self.iv_us for seed in self.seeds)
        heapq.heapify(self.heap)
        heap, shift, mask = self.heap, self.shift, self.mask
        end_us = 0
        while heap:
            key = heap[0]
            t = key >> shift
            if t > self.horizon_us:
                end_us = self.horizon_us
                break
            heapq.heappop(heap)
            if t >= self.next_sample:
                self._sample_until(t)
                if self.exact and self._settled():
                    end_us = t
                    break
            end_us = t
            if t != self.now_us:
                self.now_us, self.now_dt = t, self.start + timedelta(microseconds=t)
            self.events += 1
            idx, kind = (key >> 2) & mask, key & 3
            if kind == ACTIVATE:
                self._activate(idx)
            elif kind == STEP:
                host = self.hosts[idx]
                assert host is not None
                self._pass(host)
            else:
                host = self.hosts[idx]
                assert host is not None
                self._boot(host)
        self._sample_until(end_us)
        self._record(end_us, final=True)
        return self._result(end_us, time.monotonic() - wall)

    def _activate(self, idx: int) -> None:
        """A host's wave has opened and its daemon checks: from here on it is simulated (its
        daemon has been running all along: no start(), a pass)."""
        seed = self.seeds[idx]
        model = self._models.get(seed) or self._models.setdefault(seed, self.model(seed))
        rng = random.Random((self.p.seed << 32) | idx)  # the daemon's own stream (jitter, backoff)
        host = SimHost(self, idx, self.group_names[idx % self.p.groups], model, rng)
        self.hosts[idx] = host
        self._daemon(host)
        self._pass(host)

    def _daemon(self, host: SimHost) -> Updater:
        assert host.rng is not None
        host.updater = Updater(host, host, host.id, now=self._now, rng=host.rng, client_factory=host.lock_client)
        return host.updater

    def _pass(self, host: SimHost) -> None:
        """One pass of the host's daemon, and when (or whether) to run the next."""
        u = host.updater
        assert u is not None
        host.refused = host.rebooted = False
        self.passes += 1
        wake = u.step()
        st = u.state
        code = _CODE[st.phase]
        self._set_phase(host.idx, code)
        if host.rebooted:  # the daemon asked for the reboot: its process ends here
            self._reboot(host)
            return
        if not self.exact:
            if code == IDLE_C and host.version == self.new and st.lock == Lock.FREE:
                self._retire(host)  # updated, slot back: nothing left to do
                return
            if code == FAILED_C and st.reported:
                self._retire(host)  # keeps its slot for good; the server knows why
                return
            if host.refused:
                self._park(host)
                return
            if code == WINDOW_C and st.window and st.window.get("opens_at"):
                opens = parse(st.window["opens_at"])
                assert opens is not None
                wake = max(wake, opens)  # the checks before it find nothing new
        self._push((wake - self.start) // US, host.idx, STEP)

    def _reboot(self, host: SimHost) -> None:
        host.failing = self.world.random() < self.p.failure_rate
        took = self.p.reboot_time.draw(self.world)
        if host.failing:  # boot the new version, fail the gate, roll back, boot the old one
            took += self.p.reboot_time.draw(self.world)
        self.reboots += 1
        if self.trace is not None:
            self.trace.append((self.now_us, host.idx, "reboot"))
        self._push(self.now_us + max(1, round(took * 1e6)), host.idx, BOOT)

    def _boot(self, host: SimHost) -> None:
        """After the reboot: a new daemon process (the same state), then its first pass."""
        host.boot(self.now_dt)
        if self.trace is not None:
            self.trace.append((self.now_us, host.idx, "failed" if host.failing else "updated"))
        if host.failing:
            self.failed_boots += 1
            g = host.idx % self.p.groups
            self.failed_by_group[g] = self.failed_by_group.get(g, 0) + 1
        else:
            self.on_new += 1
            for pct in THRESHOLDS:
                if pct not in self.reached and self.on_new * 100 >= pct * self.p.hosts:
                    self.reached[pct] = self.now_us
        self._daemon(host).start()  # a new process after the reboot: it finishes what the reboot interrupted
        self._pass(host)

    def _retire(self, host: SimHost) -> None:
        host.updater = None
        host.rng = None  # done with: its memory goes back
        self.hosts[host.idx] = None

    def _park(self, host: SimHost) -> None:
        u = host.updater
        assert u is not None
        retry = parse(u.state.next_attempt)
        assert retry is not None
        heapq.heappush(self.fresh[host.idx % self.p.groups], ((retry - self.start) // US, host.idx))
        self.parks += 1
        self.parked += 1

    def _freed(self, g: int) -> None:
        """A slot of group g was given back: run the parked host whose retry comes first."""
        fresh, stale = self.fresh[g], self.stale[g]
        if not fresh and not stale:
            return
        now = self.now_us
        while fresh and fresh[0][0] < now:
            stale.append(heapq.heappop(fresh)[1])
        when, idx = fresh[0] if fresh else (-1, -1)
        if stale:
            # retries fall on whole seconds: the daemon wakes at next_attempt, stored to the second
            first = now + self._first_retry(len(stale)) + self.start_us_in_second
            first += -first % 1_000_000 - self.start_us_in_second
            if idx < 0 or first < when:
                j = self.world.randrange(len(stale))
                stale[j], stale[-1] = stale[-1], stale[j]
                when, idx = first, stale.pop()
            else:
                heapq.heappop(fresh)
        else:
            heapq.heappop(fresh)
        self.parked -= 1
        self.lotteries += 1
        self._push(when, idx, STEP)

    def _first_retry(self, n: int) -> int:
        """When the first of n hosts retrying every U(a, b) retries, from a moment unrelated to
        their cycles: the least of n forward recurrence times R (P(R <= x) = the integral of
        P(gap > u) up to x, over the mean gap), drawn by inverting P(min > x) = (1 - F_R(x))^n."""
        a, b = self.retry_gap
        mean = (a + b) / 2
        q = (1 - float((1 - self.world.random()) ** (1 / n))) * mean  # F_R(x) x mean
        if q <= a:
            return round(q)
        return round(b - math.sqrt(max(0.0, (b - a) ** 2 - 2 * (b - a) * (q - a))))

    def _set_phase(self, idx: int, code: int) -> None:
        old = self.phase[idx]
        if old != code:
            c = self.counts
            c[old] -= 1
            c[code] += 1
            self.phase[idx] = code
            if code == REBOOT_C and c[REBOOT_C] > self.peak:
                self.peak, self.peak_us = c[REBOOT_C], self.now_us

    def _settled(self) -> bool:
        """(exact) Nothing more can change: every host updated, failed, or waits in a halted group."""
        halted = self.locks.halted
        for idx, host in enumerate(self.hosts):
            if host is None:
                return False  # its wave has not opened yet (exact runs retire nobody)
            code = self.phase[idx]
            if code == FAILED_C:
                continue
            if code == IDLE_C and host.version == self.new and host.daemon.lock == Lock.FREE:
                continue
            if code in (LOCK_C, WINDOW_C) and idx % self.p.groups in halted:
                continue
            return False
        return True

    # --- the timeline ---------------------------------------------------------------------
    def _sample_until(self, t: int) -> None:
        while self.next_sample <= t and self.next_sample <= self.horizon_us:
            self._record(self.next_sample)
            self.next_sample += self.sample_us

    def _row(self, t: int) -> tuple[int, ...]:
        c = list(self.counts[:6])
        if self.parked and self.p.windows:  # parked hosts would have gone to wait for the window
            at = self.start + timedelta(microseconds=t)
            if not windows.check(list(self.policy.windows), at).open:
                c[LOCK_C] -= self.parked
                c[WINDOW_C] += self.parked
        per_group: list[int] = []
        if self.p.groups <= PER_GROUP_MAX:
            per_group = [len(s.holders) for s in self.locks.sems]
        return (self.on_new, *c, self.locks.held, len(self.locks.halted), *per_group)

    def _record(self, t: int, final: bool = False) -> None:
        row = self._row(t)
        last = self._last
        if last is not None and last[1] == row and not final:
            self._last = (t, row)  # unchanged: kept only if a change follows
            return
        if last is not None and (not self.rows or self.rows[-1][0] != last[0]):
            self.rows.append(last)  # the point before the change: the timeline stays a step
        if not self.rows or self.rows[-1][0] != t:
            self.rows.append((t, row))
        self._last = (t, row)

    def _point(self, t: int, row: tuple[int, ...]) -> dict[str, Any]:
        p = self.p
        states = {str(s): row[1 + i] for i, s in enumerate(STATES[:6])}
        point: dict[str, Any] = {
            "t": format_time(self.start + timedelta(microseconds=t)), "elapsed_s": t // 1_000_000,
            "versions": {self.old: p.hosts - row[0], self.new: row[0]}, "states": states,
            "rebooting": row[1 + REBOOT_C], "slots_held": row[7], "halted_groups": row[8]}
        if p.groups <= PER_GROUP_MAX:
            point["held_by_group"] = dict(zip(self.group_names, row[9:], strict=True))
        return point

    def _result(self, end_us: int, wall: float) -> Result:
        p = self.p

        def at(us: int | None) -> dict[str, Any] | None:
            if us is None:
                return None
            return {"t": format_time(self.start + timedelta(microseconds=us)), "after_s": round(us / 1e6, 1),
                    "after": human(us / 1e6)}

        halted = sorted(self.locks.halted)
        stuck = sum(1 for i in range(p.hosts) if self.phase[i] in (LOCK_C, WINDOW_C))
        summary: dict[str, Any] = {
            "release": self.new, "from": self.old, "hosts": p.hosts, "groups": p.groups,
            "slots_per_group": p.slots, "slots_total": p.groups * p.slots,
            "start": format_time(self.start), "end": format_time(self.start + timedelta(microseconds=end_us)),
            "simulated_s": round(end_us / 1e6, 1), "stopped_at_horizon": end_us >= self.horizon_us,
            "updated": self.on_new, "updated_fraction": round(self.on_new / p.hosts, 4),
            "time_to": {f"{pct}%": at(self.reached.get(pct)) for pct in THRESHOLDS},
            "peak_concurrent_reboots": self.peak, "peak_at": at(self.peak_us if self.peak else None),
            "most_held_in_a_group": max(self.locks.most, default=0),
            "reboots": self.reboots, "failed_hosts": self.failed_boots,
            "failed_by_group": {self.group_names[g]: n for g, n in sorted(self.failed_by_group.items())},
            "halted_groups": len(halted),
            "halted": [{"group": self.group_names[g], "at": format_time(self.locks.halted[g]),
                        "failed_hosts": self.failed_by_group.get(g, 0)} for g in halted[:PER_GROUP_MAX]],
            "waiting_at_end": stuck,
            "waves": self.waves(),
            "wall_s": round(wall, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "work": {"daemon_passes": self.passes, "events": self.events, "lock_requests": self.locks.requests,
                     "choose_calls": self.chosen, "checks_before_the_wave_not_run": self.not_run, "parked": self.parks,
                     "parked_runs": self.lotteries},
        }
        points = [self._point(t, row) for t, row in self.rows]
        return Result(p, points, summary, self.waves(), self.group_names)

    def waves(self) -> list[dict[str, Any]]:
        return wave_view(self.p.release, self.seeds)


def human(s: float) -> str:
    """3d 4h 5m, 2h 0m, 45m, 30s."""
    d, rest = divmod(round(s), 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {sec}s" if m else f"{sec}s"


def simulate(params: Params) -> Result:
    return Simulation(params).run()
