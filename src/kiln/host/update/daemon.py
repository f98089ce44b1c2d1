"""The update daemon (a thread of kiln-agent.service): Zincati's and brupop-agent's job on a Kiln host.

Every `check-interval` (±10 % jitter, so a fleet does not poll in step) it checks the
repository; a release this host may take (waves, version lock, failures here: the
agent's `choose`) is written to the inactive slot at once. The reboot then waits:

    immediate    reboot as soon as the release is staged
    fleet-lock   inside a maintenance window, and only with a FleetLock slot (retried with
                 capped exponential backoff and jitter; a refusal, an error or a timeout
                 never reboots)

Before the reboot the host drains: workloads get SIGTERM, then SIGKILL after their
stop-timeout; host containers go last. After it, on the new version, the slot is given
back only once the health gate has passed. If the gate fails the host rolls back by
itself and keeps the slot (and tells the server why), so a bad release halts at as many
hosts as the group has slots. A boot that never finished (a power cut) is not a bad
release: the slot is given back and the release retried (kiln.host.update.failures).

The decisions are here, apart from the I/O: a `HostPort` (slots, agent, containers,
reboot) and a `FleetLockClient` are injected, and the clock too, so tests drive the same
state machine with fake slots and the fleet simulator with a virtual clock.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from kiln.core.fs import atomic_write
from kiln.host.update import windows
from kiln.host.update.failures import DEFAULT_MAX_BOOT_ATTEMPTS, Verdict
from kiln.host.update.fleetlock import FleetLockClient, LockError, LockRefused
from kiln.host.update.manifest import format_time

DEFAULT_INTERVAL = timedelta(hours=1)
JITTER = 0.10  # ± of the check interval
LOCK_BACKOFF_BASE = timedelta(seconds=15)
LOCK_BACKOFF_CAP = timedelta(minutes=5)  # and never longer than the check interval
REBOOT_GRACE = timedelta(minutes=10)  # after asking for a reboot: look again if still up
CONFIRM_POLL = timedelta(seconds=30)  # on the new version, until the health gate has decided
STAGED_STATES = ("Staged", "Ready")


class Strategy(StrEnum):
    MANUAL = "manual"
    IMMEDIATE = "immediate"
    FLEET_LOCK = "fleet-lock"


class Phase(StrEnum):
    MANUAL = "manual"  # strategy manual: nothing automatic
    IDLE = "idle"  # nothing to apply until the next check
    WAITING_WINDOW = "waiting-for-window"  # staged; the maintenance window is closed
    WAITING_LOCK = "waiting-for-lock"  # staged; the FleetLock server said no or did not answer
    REBOOTING = "rebooting"  # lock held, drained, the new slot active, reboot asked
    CONFIRMING = "confirming"  # on the new version: the slot goes back once the gate passed
    FAILED = "failed"  # the release failed here: the slot is kept so the group halts


class Lock(StrEnum):
    FREE = "free"
    ASKING = "asking"  # a pre-reboot was sent and its answer not yet recorded
    HELD = "held"


@dataclass(frozen=True)
class Policy:
    """settings.updates as the daemon reads them."""

    strategy: Strategy = Strategy.MANUAL
    interval: timedelta = DEFAULT_INTERVAL
    url: str | None = None
    group: str = "default"
    ca: str | None = None
    windows: tuple[windows.Window, ...] = ()
    max_attempts: int = DEFAULT_MAX_BOOT_ATTEMPTS

    @classmethod
    def from_settings(cls, updates: dict[str, Any]) -> Policy:
        """ValueError names the setting that cannot be used (the model validated the rest)."""
        lock = updates.get("fleet-lock") or {}
        strategy = Strategy(updates.get("strategy", "manual"))
        if strategy is Strategy.FLEET_LOCK and not lock.get("url"):
            raise ValueError("settings.updates.fleet-lock.url is not set (strategy fleet-lock needs a server)")
        try:
            wins = tuple(windows.Window.from_settings(w) for w in updates.get("maintenance-windows") or ())
        except ValueError as e:
            raise ValueError(f"settings.updates.maintenance-windows: {e}") from None
        return cls(
            strategy=strategy,
            interval=windows.parse_interval(str(updates.get("check-interval", "1h"))),
            url=lock.get("url"),
            group=str(lock.get("group", "default")),
            ca=lock.get("ca"),
            windows=wins,
            max_attempts=int(updates.get("max-boot-attempts", DEFAULT_MAX_BOOT_ATTEMPTS)),
        )


@dataclass
class DaemonState:
    """What the daemon knows across restarts and reboots (/var/lib/kiln/update/daemon.json)."""

    strategy: str = Strategy.MANUAL.value
    phase: str = Phase.IDLE.value
    reason: str = ""  # what it waits for, in words
    target: str | None = None  # the version being rolled out to this host
    next_check: str | None = None
    window: dict[str, str] | None = None  # the window waited for, or the one open
    lock: str = Lock.FREE.value
    group: str | None = None
    lock_since: str | None = None  # held since
    waiting_since: str | None = None  # first refusal of the current wait
    lock_attempts: int = 0
    next_attempt: str | None = None
    last_error: str | None = None
    failures_before: int = 0  # the target's counted failures when its reboot was asked
    reported: str | None = None  # the failure last told to the FleetLock server
    updated: str | None = None

    @classmethod
    def load(cls, path: Path) -> DaemonState:
        try:
            doc = json.loads(path.read_bytes())
        except (FileNotFoundError, ValueError):
            return cls()
        if not isinstance(doc, dict):
            return cls()
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(asdict(self), indent=1, sort_keys=True).encode() + b"\n")


class StateStore(Protocol):
    """Where the daemon keeps its DaemonState between passes and across restarts."""

    def load(self) -> DaemonState: ...

    def save(self, state: DaemonState) -> None: ...


@dataclass(frozen=True)
class FileStore:
    """The state as a JSON file, written atomically at every change: what a host uses."""

    path: Path

    def load(self) -> DaemonState:
        return DaemonState.load(self.path)

    def save(self, state: DaemonState) -> None:
        state.save(self.path)


class HostPort(Protocol):
    """What the daemon does to the host; the real one is kiln.host.update.host.RealHost."""

    def settings(self) -> dict[str, Any]:
        """settings.updates, live."""

    def running_version(self) -> str: ...

    def running_slot(self) -> str | None:
        """The slot booted (A or B), for the fleet's view; None when unknown."""

    def gate_passed(self) -> bool:
        """The running slot is marked successful: its health gate passed."""

    def update_state(self) -> tuple[str, str | None, str]:
        """(Idle|Available|Staged|Ready, staged version, reason nothing is chosen)."""

    def command(self, name: str) -> None:
        """Run an update command (refresh, prepare, activate) to its end; KilnError if it fails."""

    def verdict(self, version: str, max_attempts: int) -> Verdict | None:
        """The failures log's word on `version` here."""

    def drain(self) -> None:
        """Stop workloads (SIGTERM, SIGKILL after their stop-timeout), then host containers."""

    def undrain(self) -> None:
        """Start again what drain stopped (the reboot did not happen)."""

    def reboot(self) -> None: ...


def parse(text: str | None) -> datetime | None:
    """A time as format_time writes it (2026-12-05T01:00:00Z). fromisoformat, not strptime:
    0.2 µs instead of 9.5, paid a few times a pass, and by the fleet simulator 100,000-fold."""
    if not text:
        return None
    if len(text) != 20 or not text.endswith("Z"):
        raise ValueError(f"time data {text!r} does not match format '%Y-%m-%dT%H:%M:%SZ'")
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)


def lock_backoff(attempts: int, interval: timedelta, rng: random.Random) -> timedelta:
    """Capped exponential backoff with jitter: 15 s, 30 s, 1 min... at most 5 min (or the
    check interval), each drawn from the upper half so a refused fleet spreads out."""
    cap = min(LOCK_BACKOFF_CAP, interval)
    full: timedelta = min(cap, LOCK_BACKOFF_BASE * 2 ** min(max(attempts - 1, 0), 16))
    return full * rng.uniform(0.5, 1.0)


@dataclass
class Updater:
    host: HostPort
    state_path: Path | StateStore  # a path: a FileStore there (a host); the fleet simulator keeps its own
    node_id: str
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    rng: random.Random = field(default_factory=random.Random)
    client_factory: Callable[[Policy, str], FleetLockClient] = field(
        default=lambda p, node: FleetLockClient(str(p.url), node, p.group, ca=p.ca))
    state: DaemonState = field(init=False)
    store: StateStore = field(init=False)
    _checked: bool = field(default=False, init=False)  # this pass checked the repository

    def __post_init__(self) -> None:
        self.store = FileStore(self.state_path) if isinstance(self.state_path, Path) else self.state_path
        self.state = self.store.load()

    # --- helpers ----------------------------------------------------------------------
    def _save(self) -> None:
        self.state.updated = format_time(self.now())
        self.store.save(self.state)

    def _client(self, p: Policy) -> FleetLockClient | None:
        return self.client_factory(p, self.node_id) if p.url else None

    def _jittered(self, p: Policy) -> timedelta:
        return p.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)

    def _release(self, p: Policy) -> bool:
        """Steady-state; True when the server confirmed (or there is no server)."""
        client = self._client(p)
        if client is not None:
            try:
                client.steady_state()
            except LockError as e:
                self.state.last_error = f"could not give the reboot slot back: {e}"
                return False
        self.state.lock, self.state.lock_since, self.state.group = Lock.FREE, None, None
        self.state.last_error = None
        return True

    # --- start of the process (every boot) -----------------------------------------------
    def start(self) -> None:
        """Finish what a reboot (or a crash) interrupted."""
        st, running = self.state, self.host.running_version()
        try:
            p = Policy.from_settings(self.host.settings())
        except ValueError:
            p = Policy()
        st.strategy = p.strategy.value
        if st.phase in (Phase.REBOOTING, Phase.CONFIRMING) and st.target:
            if st.target == running:
                st.phase = Phase.CONFIRMING
            else:
                verdict = self.host.verdict(st.target, p.max_attempts)
                counted = verdict.attempts if verdict else 0
                if verdict is None or counted <= st.failures_before:
                    st.phase = Phase.IDLE  # the reboot never happened: staged still, slot kept
                elif verdict.final:
                    st.phase = Phase.FAILED
                    st.reason = verdict.describe(p.max_attempts)
                else:  # did not finish booting (a power cut?): not a bad release, retry it
                    st.phase, st.next_check = Phase.IDLE, None
                    st.reason = verdict.describe(p.max_attempts)
                    if st.lock != Lock.FREE:
                        self._release(p)
        elif st.lock != Lock.FREE and st.phase != Phase.FAILED:
            # Zincati's initialization: a slot held while nothing is underway goes back.
            self._release(p)
            st.phase = Phase.IDLE
        self._save()

    # --- one pass ---------------------------------------------------------------------
    def step(self) -> datetime:
        """Look, decide, act; returns when to look again. After a check of the repository,
        and when its state changed, the host tells a Kiln fleet server where it stands."""
        now, st = self.now(), self.state
        try:
            p = Policy.from_settings(self.host.settings())
        except ValueError as e:
            st.reason, st.last_error = f"cannot run: {e}", str(e)
            self._save()
            return now + DEFAULT_INTERVAL
        st.strategy = p.strategy.value
        self._checked, before = False, st.phase
        wake = self._step(now, p)
        if (self._checked or st.phase != before) and st.phase != Phase.FAILED:  # FAILED: its heartbeat tells
            self._tell(p)
        return wake

    def _step(self, now: datetime, p: Policy) -> datetime:
        st = self.state
        if p.strategy is Strategy.MANUAL:
            return self._manual(now, p)
        if st.phase == Phase.CONFIRMING:
            return self._confirm(now, p)
        if st.phase == Phase.REBOOTING:  # asked for a reboot, still here: look again later
            if now < (parse(st.updated) or now) + REBOOT_GRACE:
                return (parse(st.updated) or now) + REBOOT_GRACE
            st.phase = Phase.IDLE
        if st.phase == Phase.FAILED:
            self._heartbeat(p)
        wake = self._check_if_due(now, p)
        state, staged, why = self.host.update_state()
        if state not in STAGED_STATES or not staged:
            if st.phase != Phase.FAILED:
                st.phase, st.target = Phase.IDLE, None
                st.reason = why or "nothing to apply"
                st.waiting_since = st.next_attempt = st.window = None
                st.lock_attempts = 0
            self._save()
            return wake
        st.target = staged
        if p.strategy is Strategy.IMMEDIATE:
            return self._reboot(now, p, state)
        ws = windows.check(list(p.windows), now)
        if not ws.open:
            st.phase = Phase.WAITING_WINDOW
            st.window = {"window": ws.window, "opens_at": format_time(ws.opens_at) if ws.opens_at else ""}
            st.reason = f"{staged} is staged; waiting for the maintenance window {ws.window}" + (
                f", which opens at {format_time(ws.opens_at)}" if ws.opens_at else "")
            self._save()
            return min(wake, ws.opens_at) if ws.opens_at else wake
        st.window = {"window": ws.window, "closes_at": format_time(ws.closes_at)} if ws.closes_at else None
        retry_at = parse(st.next_attempt)
        if st.lock != Lock.HELD and retry_at is not None and now < retry_at:
            self._save()
            return min(wake, retry_at)
        if not self._take_lock(now, p, staged):
            nxt = parse(st.next_attempt) or wake
            return min(wake, nxt, ws.closes_at) if ws.closes_at else min(wake, nxt)
        return self._reboot(now, p, state)

    def _manual(self, now: datetime, p: Policy) -> datetime:
        st = self.state
        if st.lock != Lock.FREE and st.phase not in (Phase.FAILED, Phase.REBOOTING):
            self._release(p)
        st.phase, st.next_check = Phase.MANUAL, None
        st.reason = "strategy manual: updates are applied only when asked (kiln update apply)"
        self._save()
        return now + p.interval

    def _check_if_due(self, now: datetime, p: Policy) -> datetime:
        """Refresh and, when a release is chosen, write it to the inactive slot."""
        from kiln.core.errors import KilnError

        st = self.state
        due = parse(st.next_check)
        if due is not None and due > now + p.interval * (1 + JITTER):
            due = now + self._jittered(p)  # the interval was shortened: not the old, longer wait
            st.next_check = format_time(due)
        if due is not None and now < due:
            return due
        wake = now + self._jittered(p)
        st.next_check = format_time(wake)
        self._checked = True
        try:
            self.host.command("refresh")
            state, _, _ = self.host.update_state()
            if state == "Available":
                self.host.command("prepare")
            st.last_error = None
        except KilnError as e:
            st.last_error = str(e).splitlines()[0]
        return wake

    def _take_lock(self, now: datetime, p: Policy, staged: str) -> bool:
        st = self.state
        client = self._client(p)
        assert client is not None  # Policy.from_settings requires the url for fleet-lock
        if st.lock != Lock.HELD:
            st.lock, st.group = Lock.ASKING, p.group
            self._save()  # a crash from here on gives the slot back at the next start
        try:
            client.pre_reboot(self.host.running_version(), self.report(Phase.WAITING_LOCK))
        except LockError as e:
            st.lock = Lock.FREE if st.lock == Lock.ASKING else st.lock
            st.phase = Phase.WAITING_LOCK
            st.waiting_since = st.waiting_since or format_time(now)
            st.lock_attempts += 1
            st.next_attempt = format_time(now + lock_backoff(st.lock_attempts, p.interval, self.rng))
            st.last_error = str(e)
            said = "refused" if isinstance(e, LockRefused) else "no answer"
            st.reason = (f"{staged} is staged; waiting for a reboot slot in group {p.group} since "
                         f"{st.waiting_since} ({said}: {e}); next try at {st.next_attempt}")
            self._save()
            return False
        if st.lock != Lock.HELD:
            st.lock_since = format_time(now)
        st.lock, st.group = Lock.HELD, p.group
        st.waiting_since = st.next_attempt = st.last_error = None
        st.lock_attempts = 0
        return True

    def _reboot(self, now: datetime, p: Policy, state: str) -> datetime:
        """Drain, make the new slot boot next, reboot. If anything fails before the reboot,
        the containers come back and the slot is given back."""
        from kiln.core.errors import KilnError

        st = self.state
        verdict = self.host.verdict(str(st.target), p.max_attempts)
        st.failures_before = verdict.attempts if verdict else 0
        st.phase, st.reason = Phase.REBOOTING, f"rebooting into {st.target}"
        self._save()
        try:
            self.host.drain()
            if state == "Staged":
                self.host.command("activate")
            self.host.reboot()
        except KilnError as e:
            self.host.undrain()
            st.phase, st.last_error = Phase.IDLE, f"reboot into {st.target} failed: {e}"
            st.reason = st.last_error
            if st.lock != Lock.FREE:
                self._release(p)
            self._save()
            return now + self._jittered(p)
        self._save()
        return now + REBOOT_GRACE

    def _confirm(self, now: datetime, p: Policy) -> datetime:
        """On the new version: give the slot back once the health gate has passed."""
        st = self.state
        if not self.host.gate_passed():
            st.reason = f"on {st.target}: waiting for the health gate before giving the reboot slot back"
            self._save()
            return now + CONFIRM_POLL
        if st.lock != Lock.FREE and not self._release(p):
            st.lock_attempts += 1
            retry = now + lock_backoff(st.lock_attempts, p.interval, self.rng)
            st.reason = (f"on {st.target} and healthy; giving the reboot slot back failed, "
                         f"retrying at {format_time(retry)}")
            self._save()
            return retry
        st.phase, st.reason, st.target, st.lock_attempts = Phase.IDLE, f"updated to {st.target}", None, 0
        st.next_check = None
        self._save()
        return now

    def report(self, phase: str | None = None, failure: str | None = None) -> dict[str, Any]:
        """Where this host stands, as it tells a Kiln fleet server (`kiln` in its requests)."""
        st = self.state
        return {"version": self.host.running_version(), "slot": self.host.running_slot(),
                "state": str(phase or st.phase), "target": st.target, "failure": failure}

    def _tell(self, p: Policy) -> None:
        """After a check: the report, for the fleet's view. A server that is not Kiln's (404)
        or does not answer changes nothing here: reporting is never in the way of updating."""
        client = self._client(p)
        if client is None or p.strategy is Strategy.MANUAL:
            return
        with contextlib.suppress(LockError):
            client.report(**self.report())

    def _heartbeat(self, p: Policy) -> None:
        """While the slot is kept after a failure: tell the server why (also keeps a
        stale-after group from expiring the slot). A server that no longer lists us as a
        holder (an operator released it) frees us."""
        st = self.state
        client = self._client(p)
        if client is None or st.lock == Lock.FREE:
            return
        try:
            answer = client.report(**self.report(failure=st.reason or "update failed"))
        except LockRefused as e:
            if e.status == 404:  # not a Kiln server: nothing to report to
                return
            st.last_error = str(e)
            return
        except LockError as e:
            st.last_error = str(e)
            return
        st.reported = st.reason
        if answer.get("held") is False:
            st.lock, st.lock_since = Lock.FREE, None
            st.phase = Phase.IDLE
            st.reason = f"{st.target}: the reboot slot was released by an operator; the failure stays recorded here"
