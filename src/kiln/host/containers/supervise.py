"""One supervisor for every host container and workload: a loop over pidfds, not a process each.

The containers run detached (`ctr run -d`, their output to the journal through the shim's
logger); the supervisor holds a pidfd on each task's init and one `selectors` loop waits on
all of them, on a self-pipe (settings syncs, drains, stops asked by other threads) and on
the earliest backoff timer: it uses no CPU while nothing happens. What to do is decided by
the pure `plan.plan`; this module only does it.

It survives its own death: tasks live in their shims, so a restarted supervisor lists the
tasks of Kiln's namespace in both containerds, adopts the running ones (a pidfd again, no
second task), deletes the ended ones as exits, and reads restart counts back from the status
files. It installs no signal handler and keeps no process-wide state, so a host agent can run
it in a thread (kiln-agent.service does); `main()` runs it alone, with signals (development).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import selectors
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.containers import ctr, journal, launch, manager, mounts, status
from kiln.host.containers import plan as planner
from kiln.host.containers import spec as spec_mod
from kiln.host.containers.plan import Action, History, Task, TaskStatus, Verb
from kiln.host.containers.spec import PERSISTENT_ROOT, Kind, Spec, from_settings

SUPERVISED: tuple[Kind, ...] = ("host", "workload")  # bootstrap containers run to completion at boot
DRAIN_ORDER: tuple[Kind, ...] = ("workload", "host")  # workloads may use what host containers provide
DRAIN_TIMEOUT = 400.0  # seconds for a whole drain: a stop-timeout is at most 300 s (the settings model)


@dataclass
class _Run:
    """A task the supervisor watches."""

    spec: Spec  # what it was started from (its stop-timeout, its runtime)
    pid: int
    pidfd: int
    stop_deadline: float | None = None  # monotonic: SIGKILL then (set by a stop)
    killed: bool = False


@dataclass
class _Drain:
    kinds: frozenset[Kind]
    done: threading.Event
    stopped: list[str]


class Supervisor:
    """Keeps the containers the settings declare running; thread-safe requests, one loop."""

    def __init__(self, settings: Callable[[], dict[str, Any]] = manager.live_settings,
                 state_dir: Path = status.STATE_DIR, *, log_uri: str = ctr.LOG_URI,
                 note: Callable[[str, str], None] = journal.send, persistent_root: Path = PERSISTENT_ROOT,
                 local: Path = mounts.LOCAL, staging: Path = mounts.STAGING,
                 env_dir: Path = manager.ENV_DIR) -> None:
        self._settings = settings
        self.state_dir = state_dir
        self.log_uri = log_uri
        self._note = note
        self._prepare = partial(manager.prepare, persistent_root=persistent_root, local=local,
                                staging=staging, env_dir=env_dir)
        self.staging = staging
        # Owned by the loop thread:
        self._desired: dict[str, Spec] = {}
        self._known: dict[str, Spec] = {}  # every spec seen in the settings: a removed one's stop-timeout
        self._history: dict[str, History] = {}
        self._runs: dict[str, _Run] = {}
        self._starting: dict[str, Spec] = {}
        self._stopping: set[str] = set()  # STOPPING: the end of these is a stop, not an exit
        self._unwatched: dict[str, int] = {}  # RUNNING tasks found at the start: adopted by the plan
        self._ended: dict[str, int] = {}  # tasks found ended: deleted (and judged) by the plan
        self._runtimes_up: set[str] = set()
        self._drains: list[_Drain] = []
        self._drained: set[Kind] = set()
        self._resync = False
        # Shared with other threads (under _lock), and the self-pipe that wakes the loop:
        self._lock = threading.Lock()
        self._requests: list[tuple[str, Any]] = []
        self._results: queue.SimpleQueue[tuple[str, Spec, launch.Launched | str]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._collecting = threading.Lock()

    # -- the thread-safe API -------------------------------------------------------------------

    def _ask(self, what: str, arg: Any = None) -> None:
        with self._lock:
            self._requests.append((what, arg))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def request_sync(self, kinds: Iterable[Kind] | None = None) -> None:
        """Read the settings again and act on them (a settings change, SIGHUP). Returns at once."""
        self._ask("sync", None if kinds is None else frozenset(kinds))

    def drain(self, kinds: Iterable[Kind] = DRAIN_ORDER, timeout: float = DRAIN_TIMEOUT) -> list[str]:
        """Stop the containers of `kinds` (SIGTERM, SIGKILL after each one's stop-timeout), workloads
        before host containers, and keep them stopped until `undrain`; blocks until they are
        (KilnError after `timeout` seconds for a kind).
        Returns the ids stopped."""
        stopped: list[str] = []
        for kind in [k for k in DRAIN_ORDER if k in set(kinds)]:
            d = _Drain(frozenset({kind}), threading.Event(), [])
            self._ask("drain", d)
            if not d.done.wait(timeout):
                raise KilnError(f"the {kind} containers did not stop in {timeout:g} s")
            stopped += d.stopped
        return stopped

    def undrain(self) -> None:
        """Start what `drain` stopped (what the settings still declare)."""
        self._ask("undrain")

    def stop_all(self, timeout: float = DRAIN_TIMEOUT) -> list[str]:
        """Every container stopped cleanly, workloads first; they stay stopped."""
        return self.drain(DRAIN_ORDER, timeout)

    def shutdown(self) -> None:
        """End `run` (the containers keep running: a later supervisor adopts them)."""
        self._stop.set()
        self._wake()

    def serve_forever(self) -> None:
        self.run(self._stop)

    def wait_collected(self, timeout: float) -> bool:
        """Wait for an image collection in flight (it outlives `run`); False on timeout. For
        a caller that is about to stop containerd, so the collection does not fail late."""
        if not self._collecting.acquire(timeout=timeout):
            return False
        self._collecting.release()
        return True

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Adopt what runs, then keep the containers as the settings say until `stop_event` is
        set (and `shutdown()` or any request wakes the loop) or `shutdown()` is called."""
        stop = stop_event or self._stop
        try:
            self._observe()
            self._read_settings()
            while not (stop.is_set() or self._stop.is_set()):
                self._handle_requests()
                self._take_results()
                wake_at = self._step()
                self._finish_drains()
                timeout = self._timeout(wake_at)
                for key, _ in self._sel.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    else:
                        self._on_exit(key.data)
                self._expire_stops()
        finally:
            for run in self._runs.values():
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(run.pidfd)
                os.close(run.pidfd)
            self._runs.clear()

    def _timeout(self, wake_at: float | None) -> float | None:
        times = [r.stop_deadline for r in self._runs.values() if r.stop_deadline is not None and not r.killed]
        if wake_at is not None:
            times.append(wake_at)
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _observe(self) -> None:
        """Adoption at start: the tasks of both containerds, the status files' histories."""
        for rt in dict.fromkeys((spec_mod.HOST_RUNTIME, spec_mod.WORKLOAD_RUNTIME)):
            try:
                found = ctr.tasks(rt)
            except KilnError:
                continue
            for cid, (pid, state) in found.items():
                if not cid.startswith(tuple(f"{k}-" for k in SUPERVISED)):
                    continue
                if state == "RUNNING":
                    self._ended.pop(cid, None)
                    self._unwatched[cid] = pid
                else:  # STOPPED, CREATED, PAUSED: it ended or never ran; deleted as an exit
                    self._ended[cid] = pid
        for f in sorted(self.state_dir.glob("*.json")) if self.state_dir.is_dir() else []:
            kind = f.stem.partition("-")[0]
            if kind in SUPERVISED:
                st = status.read(_spec_of(f.stem), self.state_dir)
                if st is not None:
                    self._history[f.stem] = planner.from_status(st)

    def _read_settings(self) -> None:
        tree = self._settings()
        before = self._desired
        declared = [s for kind in SUPERVISED for s in from_settings(tree, kind)]
        self._known |= {s.id: s for s in declared}
        self._desired = {s.id: s for s in declared if s.enabled and s.kind not in self._drained}
        self._resync = True
        for cid, past in self._history.items():
            if past.retry_at is not None and cid not in self._desired and cid in before:
                # waiting to restart when it was removed, disabled or drained: stopped now
                self._history[cid] = replace(past, retry_at=None)
                status.write(before[cid], "stopped", self.state_dir, restarts=past.restarts,
                             exit_code=past.exit_code)

    def _handle_requests(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        sync = False
        for what, arg in requests:
            if what == "sync":
                sync = True
            elif what == "drain":
                self._drained |= arg.kinds
                self._drains.append(arg)
                sync = True
            elif what == "undrain":
                self._drained.clear()
                sync = True
        if sync:
            try:
                self._read_settings()
            except KilnError as e:  # the datastore could not be read: keep what runs
                print(f"kiln-containers: cannot read the settings: {e}", file=sys.stderr, flush=True)

    def _observed(self) -> dict[str, Task]:
        tasks = {cid: Task(r.pid, TaskStatus.STOPPING if cid in self._stopping else TaskStatus.RUNNING, True)
                 for cid, r in self._runs.items()}
        tasks |= {cid: Task(pid, TaskStatus.RUNNING) for cid, pid in self._unwatched.items()}
        tasks |= {cid: Task(pid, TaskStatus.STOPPED) for cid, pid in self._ended.items()}
        tasks |= {cid: Task(0, TaskStatus.STARTING) for cid in self._starting}
        return tasks

    def _step(self) -> float | None:
        """Plan and act until the plan holds nothing to do now; the next timer, if any."""
        while True:
            actions = planner.plan(self._desired, self._observed(), self._history, time.monotonic(),
                                   resync=self._resync)
            self._resync = False
            todo = [a for a in actions if a.verb != Verb.WAIT]
            for action in todo:
                self._do(action)
            # An adoption or a stop may find the task ended, a reap may call for a restart:
            # plan again until only starts, stops under way and timers are left.
            if not self._ended and not any(a.verb in (Verb.REAP, Verb.ADOPT) for a in todo):
                return planner.next_wakeup(actions)

    def _do(self, action: Action) -> None:
        cid = action.id
        if action.verb == Verb.START:
            self._start(self._desired[cid])
        elif action.verb == Verb.ADOPT:
            self._adopt(self._desired[cid], self._unwatched.pop(cid))
        elif action.verb == Verb.REAP:
            self._ended.pop(cid)
            self._ended_run(self._spec_for(cid), None)
        elif action.verb == Verb.STOP:
            self._begin_stop(cid, action.why)

    # -- start ----------------------------------------------------------------------------------

    def _start(self, spec: Spec) -> None:
        """Pull (when missing), prepare and `ctr run -d` on a worker thread: a pull may take
        minutes, and other containers' exits must not wait for it."""
        past = self._history.get(spec.id)
        restarts = past.restarts if past is not None and past.digest == spec.digest else 0
        self._history[spec.id] = planner.started(past, spec, time.monotonic())
        self._starting[spec.id] = spec
        status.write(spec, "starting", self.state_dir, restarts=restarts)
        threading.Thread(target=self._start_worker, args=(spec,), name=f"start {spec.id}", daemon=True).start()

    def _start_worker(self, spec: Spec) -> None:
        result: launch.Launched | str
        try:
            rt = spec.runtime
            if rt.unit not in self._runtimes_up:
                manager.start_runtime(spec)  # the host containerd starts only when something needs it
                self._runtimes_up.add(rt.unit)
            prepared = self._prepare(spec)
            try:
                result = launch.start(spec, prepared.argv(self.log_uri),
                                      partial(self._pull, spec))
            except BaseException:
                prepared.release()
                raise
        except KilnError as e:
            result = str(e)
        except Exception as e:  # never lose a start: the loop must hear of it
            result = f"{spec.where}: {type(e).__name__}: {e}"
        self._results.put((spec.id, spec, result))
        self._wake()

    def _pull(self, spec: Spec) -> None:
        status.write(spec, "pulling", self.state_dir)
        manager.pull(spec, self._settings(), self.state_dir, retry_for=manager.PULL_RETRY_FOR)

    def _take_results(self) -> None:
        while True:
            try:
                cid, spec, result = self._results.get_nowait()
            except queue.Empty:
                return
            self._starting.pop(cid, None)
            past = self._history[cid]
            if isinstance(result, str):
                mounts.release(cid, self.staging)
                self._history[cid] = planner.start_failed(past, spec, time.monotonic())
                status.write(spec, "failed", self.state_dir, restarts=past.restarts, detail=result)
                self._note(cid, f"{cid}: {result}")
            elif result.pidfd is None:  # it ended already: delete it for its status
                self._ended[cid] = result.pid
            else:
                self._watch(spec, result.pid, result.pidfd, past.restarts)

    def _watch(self, spec: Spec, pid: int, pidfd: int, restarts: int) -> None:
        self._runs[spec.id] = _Run(spec, pid, pidfd)
        self._sel.register(pidfd, selectors.EVENT_READ, spec.id)
        status.write(spec, "running", self.state_dir, restarts=restarts, pid=pid)

    def _adopt(self, spec: Spec, pid: int) -> None:
        got = launch.watch(spec, pid)
        if got.pidfd is None:
            self._ended[spec.id] = pid
            return
        past = self._history[spec.id]
        if past.started == 0.0:  # its run began before we did: count from now
            self._history[spec.id] = planner.started(past, spec, time.monotonic())
        self._watch(spec, pid, got.pidfd, past.restarts)

    # -- exits and stops ---------------------------------------------------------------------------

    def _on_exit(self, cid: str) -> None:
        run = self._runs.pop(cid)
        self._sel.unregister(run.pidfd)
        os.close(run.pidfd)
        self._ended_run(run.spec, run)

    def _ended_run(self, spec: Spec, run: _Run | None) -> None:
        """A task ended (its pidfd polled readable, or it was found ended): delete it, then record
        a stop, or an exit the restart policy judges."""
        cid = spec.id
        code = ctr.delete(spec.runtime, cid)
        mounts.release(cid, self.staging)
        code = 0 if code is None else code
        past = self._history.get(cid)
        if cid in self._stopping:
            self._stopping.discard(cid)
            status.write(spec, "stopped", self.state_dir, restarts=past.restarts if past else 0, exit_code=code)
            for d in self._drains:
                if spec.kind in d.kinds:
                    d.stopped.append(cid)
            if cid not in self._desired or (past is not None and past.digest != self._desired[cid].digest):
                self._collect_images()
            return
        if past is None or cid not in self._desired:  # not ours to restart: found ended
            return
        desired = self._desired[cid]
        nxt, line = planner.exited(past, desired, code, time.monotonic())
        self._history[cid] = nxt
        self._note(cid, line)
        if nxt.done:
            status.write(desired, "exited" if code == 0 else "failed", self.state_dir, restarts=nxt.restarts,
                         exit_code=code, detail=f"exited with status {code}")
        else:
            delay = nxt.retry_at - time.monotonic() if nxt.retry_at is not None else 0
            status.write(desired, "restarting", self.state_dir, restarts=nxt.restarts, exit_code=code,
                         detail=f"exited with status {code}; restarting in {max(delay, 0):.0f} s")

    def _spec_for(self, cid: str) -> Spec:
        """The spec `cid` runs from: the settings' now, or the last seen (removed or drained)."""
        return self._desired.get(cid) or self._known.get(cid) or _spec_of(cid)

    def _begin_stop(self, cid: str, why: str) -> None:
        run = self._runs.get(cid)
        if run is None:  # running but not watched yet: watch it, or it ended meanwhile
            pid = self._unwatched.pop(cid)
            spec = self._spec_for(cid)
            got = launch.watch(spec, pid)
            if got.pidfd is None:
                self._ended[cid] = pid
                return
            run = self._runs[cid] = _Run(spec, pid, got.pidfd)
            self._sel.register(got.pidfd, selectors.EVENT_READ, cid)
        self._stopping.add(cid)
        self._note(cid, f"{cid}: stopping ({why})")
        run.stop_deadline = time.monotonic() + run.spec.stop_timeout
        # SIGTERM to the init alone, as `docker stop` does; SIGKILL (to all) after the stop-timeout.
        ctr.kill(run.spec.runtime, cid, "SIGTERM", init_only=True)

    def _expire_stops(self) -> None:
        now = time.monotonic()
        for cid, run in self._runs.items():
            if run.stop_deadline is not None and not run.killed and now >= run.stop_deadline:
                run.killed = True
                self._note(cid, f"{cid}: still running {run.spec.stop_timeout:g} s after SIGTERM: SIGKILL")
                ctr.kill(run.spec.runtime, cid, "SIGKILL")

    def _finish_drains(self) -> None:
        busy = set(self._runs) | set(self._starting) | set(self._unwatched)
        for d in list(self._drains):
            if not any(cid.partition("-")[0] in d.kinds for cid in busy):
                self._drains.remove(d)
                d.done.set()

    def _collect_images(self) -> None:
        """Images nothing uses any more go, on a worker thread (three ctr calls)."""
        if not self._collecting.acquire(blocking=False):
            return

        def collect() -> None:
            try:
                manager.collect_images(self._settings())
            except KilnError as e:
                print(f"kiln-containers: images not collected: {e}", file=sys.stderr, flush=True)
            finally:
                self._collecting.release()

        threading.Thread(target=collect, name="collect images", daemon=True).start()


def _spec_of(cid: str) -> Spec:
    """A minimal spec for a task the settings never named (found at the start): enough to
    stop and delete it, with the default stop-timeout."""
    kind, _, name = cid.partition("-")
    return Spec(kind, name, "")  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """The supervisor alone: SIGHUP reads the settings again; SIGTERM stops every container
    (workloads first) and exits. A SIGKILL leaves them running for the next start to adopt."""
    sup = Supervisor()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w)
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # the C handler writes the signal's number to `w`
    ended = []

    def serve() -> None:
        try:
            sup.serve_forever()
        except KilnError as e:  # the settings cannot be read: nothing is stopped, systemd tries again
            print(f"kiln-containers: {e}", file=sys.stderr, flush=True)
        finally:
            ended.append(True)
            with contextlib.suppress(OSError):
                os.write(w, b"\0")  # no signal has number 0: "the loop ended"

    loop = threading.Thread(target=serve, name="supervisor")
    loop.start()
    try:
        while not ended:
            select.select([r], [], [])
            for got in os.read(r, 64):
                if got == signal.SIGHUP:
                    sup.request_sync()
                elif got in (signal.SIGTERM, signal.SIGINT):
                    try:
                        for cid in sup.stop_all():
                            print(f"kiln-containers: stopped {cid}", flush=True)
                    except KilnError as e:  # past the drain limit: say so, not a traceback
                        print(f"kiln-containers: {e}", file=sys.stderr, flush=True)
                        return 1
                    return 0
        print("kiln-containers: the supervisor loop ended unexpectedly", file=sys.stderr, flush=True)
        return 1  # systemd restarts the service, which adopts what runs
    finally:
        sup.shutdown()
        loop.join(30)
