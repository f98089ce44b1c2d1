"""What the supervisor should do next, decided without doing anything (pure).

Inputs: the containers the settings want (`Spec`s by id), the tasks in containerd as the
supervisor knows them, each container's history (its last run, restarts, backoff) and the
time. Output: actions. The supervisor (`supervise.py`) executes them and calls `plan` again
after every event, so a restart after a crash of the supervisor itself is the same decision
as any other: a running task is adopted, never started twice.

Restart policy as host-ctr and Docker have it: `always`, `on-failure` (non-zero exit),
`never`; waits of 1, 2, 4 … 30 s between restarts, back to 1 s after a run of 60 s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from kiln.host.containers import status
from kiln.host.containers.spec import Spec

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # a run this long resets the restart backoff: a new failure, not a crash loop


class TaskStatus(StrEnum):
    RUNNING = "running"  # its init runs (watched through a pidfd, or not yet: adopt it)
    STOPPED = "stopped"  # it ended and nobody deleted it yet (e.g. while the supervisor was dead)
    STARTING = "starting"  # the supervisor is starting it (pull, prepare, `ctr run -d`)
    STOPPING = "stopping"  # the supervisor sent SIGTERM and waits for the end


@dataclass(frozen=True)
class Task:
    pid: int
    status: TaskStatus
    watched: bool = False  # the supervisor holds a pidfd on its init


@dataclass(frozen=True)
class History:
    """One container's past as far as restarts care (kept in memory, rebuilt from its status file)."""

    digest: str  # of the spec its last run was started from
    restarts: int = 0
    backoff: float = FIRST_BACKOFF  # the wait before the next restart
    started: float = 0.0  # monotonic time the last run started
    exit_code: int | None = None
    retry_at: float | None = None  # a restart is due at this monotonic time
    failed: bool = False  # its last start or run failed: a settings sync tries it again at once
    done: bool = False  # its restart policy says: stay stopped


class Verb(StrEnum):
    START = "start"
    ADOPT = "adopt"  # watch a running task the supervisor did not start (or started before a restart)
    REAP = "reap"  # delete an ended task: its exit counts like any other
    STOP = "stop"
    WAIT = "wait"  # nothing now: plan again at `at`


@dataclass(frozen=True)
class Action:
    verb: Verb
    id: str
    why: str = ""
    at: float = 0.0  # WAIT only

    def __str__(self) -> str:
        return f"{self.verb} {self.id}" + (f" ({self.why})" if self.why else "")


def plan(desired: Mapping[str, Spec], observed: Mapping[str, Task], history: Mapping[str, History],
         now: float, resync: bool = False) -> list[Action]:
    """The actions that bring containerd to the settings, by container id.

    `resync`: the settings were just read again (a change, SIGHUP, the start): a failed
    container gets another try at once, as a `kiln settings set` of anything would give it.
    """
    actions = []
    for cid in sorted(set(desired) | set(observed)):
        spec, task, past = desired.get(cid), observed.get(cid), history.get(cid)
        if task is not None and task.status in (TaskStatus.STARTING, TaskStatus.STOPPING):
            continue  # under way: its end is an event that plans again
        if task is not None and task.status == TaskStatus.STOPPED:
            actions.append(Action(Verb.REAP, cid, "ended"))
            continue
        if spec is None:
            if task is not None:
                actions.append(Action(Verb.STOP, cid, "not in the settings or disabled"))
            continue
        if task is not None:  # running
            if past is None or past.digest != spec.digest:
                actions.append(Action(Verb.STOP, cid, "its settings changed"))
            elif not task.watched:
                actions.append(Action(Verb.ADOPT, cid, "running"))
            continue
        if past is None:
            actions.append(Action(Verb.START, cid, "new"))
        elif past.digest != spec.digest:
            actions.append(Action(Verb.START, cid, "its settings changed"))
        elif resync and past.failed:
            actions.append(Action(Verb.START, cid, "failed: trying again"))
        elif past.done:
            continue
        elif past.retry_at is None or past.retry_at <= now:
            actions.append(Action(Verb.START, cid, "restart" if past.retry_at is not None else "not running"))
        else:
            actions.append(Action(Verb.WAIT, cid, "backoff", at=past.retry_at))
    return actions


def started(past: History | None, spec: Spec, now: float) -> History:
    """A run begins: the same spec keeps its restart count and backoff; a new one starts afresh."""
    if past is None or past.digest != spec.digest:
        return History(spec.digest, started=now)
    return replace(past, started=now, retry_at=None, done=False, failed=False)


def exited(past: History, spec: Spec, code: int, now: float) -> tuple[History, str]:
    """The run ended with `code`: the next history, and the line for the container's journal."""
    backoff = FIRST_BACKOFF if now - past.started >= STABLE_AFTER else past.backoff
    again = spec.restart == "always" or (spec.restart == "on-failure" and code != 0)
    if not again:
        return (replace(past, exit_code=code, retry_at=None, failed=code != 0, done=True),
                f"{spec.id}: exited with status {code}")
    restarts = past.restarts + 1
    return (replace(past, restarts=restarts, backoff=min(backoff * 2, MAX_BACKOFF), exit_code=code,
                    retry_at=now + backoff, failed=False, done=False),
            f"{spec.id}: exited with status {code}; restart {restarts} in {backoff:g} s")


def start_failed(past: History | None, spec: Spec, now: float) -> History:
    """It could not be started (pull, mounts, ctr): tried again after the backoff, and at once
    on the next settings sync."""
    base = past if past is not None and past.digest == spec.digest else History(spec.digest)
    return replace(base, backoff=min(base.backoff * 2, MAX_BACKOFF), retry_at=now + base.backoff,
                   failed=True, done=False)


def from_status(st: status.State) -> History:
    """A container's history as its status file left it (a restarted supervisor's memory)."""
    ended = st.state in ("exited", "failed") and st.exit_code is not None
    return History(st.digest, restarts=st.restarts, exit_code=st.exit_code, failed=st.state == "failed",
                   done=ended)


def next_wakeup(actions: list[Action]) -> float | None:
    """The earliest WAIT: when the supervisor must plan again though nothing happened."""
    return min((a.at for a in actions if a.verb == Verb.WAIT), default=None)
