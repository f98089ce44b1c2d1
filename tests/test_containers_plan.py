"""The supervisor's planner, as tables: desired specs × tasks × history × time → actions.

Pure: no containerd, no files. What the supervisor does with the actions is tested against a
real containerd in tests/test_containers.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from kiln.host.containers import status
from kiln.host.containers.plan import (
    MAX_BACKOFF,
    STABLE_AFTER,
    Action,
    History,
    Task,
    TaskStatus,
    Verb,
    exited,
    from_status,
    next_wakeup,
    plan,
    start_failed,
    started,
)
from kiln.host.containers.spec import Spec

WEB = Spec("workload", "web", "r/httpd:1")
WEB2 = replace(WEB, image="r/httpd:2")  # another digest
NOW = 1000.0

RUNNING = Task(42, TaskStatus.RUNNING, watched=True)
FOUND = Task(42, TaskStatus.RUNNING)  # running, found at the start: not watched yet
ENDED = Task(42, TaskStatus.STOPPED)
STARTING = Task(0, TaskStatus.STARTING)
STOPPING = Task(42, TaskStatus.STOPPING, watched=True)

CURRENT = History(WEB.digest, started=NOW - 5)
OLD = History(WEB2.digest, started=NOW - 5)


@pytest.mark.parametrize(("desired", "task", "past", "resync", "expected"), [
    # nothing declared, nothing there
    (None, None, None, False, []),
    (None, None, CURRENT, False, []),
    # new in the settings → start; already starting or stopping → leave it to its event
    (WEB, None, None, False, [(Verb.START, "new")]),
    (WEB, STARTING, CURRENT, False, []),
    (WEB, STOPPING, CURRENT, False, []),
    (None, STARTING, None, False, []),
    # running as declared → leave; found running (after a restart of the supervisor) → adopt
    (WEB, RUNNING, CURRENT, False, []),
    (WEB, FOUND, CURRENT, False, [(Verb.ADOPT, "running")]),
    (WEB, FOUND, CURRENT, True, [(Verb.ADOPT, "running")]),
    # its settings changed → stop (the next plan starts the new one); no history: unknown → stop
    (WEB, RUNNING, OLD, False, [(Verb.STOP, "its settings changed")]),
    (WEB, FOUND, None, False, [(Verb.STOP, "its settings changed")]),
    (WEB, None, OLD, False, [(Verb.START, "its settings changed")]),
    # removed from the settings or disabled → stop, whether watched or only found
    (None, RUNNING, CURRENT, False, [(Verb.STOP, "not in the settings or disabled")]),
    (None, FOUND, None, False, [(Verb.STOP, "not in the settings or disabled")]),
    # an ended task nobody deleted → reap (its exit counts), declared or not
    (WEB, ENDED, CURRENT, False, [(Verb.REAP, "ended")]),
    (None, ENDED, None, False, [(Verb.REAP, "ended")]),
    # after an exit: waiting for the backoff, due, done by policy
    (WEB, None, replace(CURRENT, retry_at=NOW + 4), False, [(Verb.WAIT, "backoff")]),
    (WEB, None, replace(CURRENT, retry_at=NOW), False, [(Verb.START, "restart")]),
    (WEB, None, replace(CURRENT, retry_at=NOW - 1), False, [(Verb.START, "restart")]),
    (WEB, None, replace(CURRENT, done=True, exit_code=0), False, []),
    (WEB, None, replace(CURRENT, done=True, exit_code=0), True, []),
    # failed (could not start, or exited non-zero and stays down): a sync tries again at once
    (WEB, None, replace(CURRENT, done=True, failed=True, exit_code=3), False, []),
    (WEB, None, replace(CURRENT, done=True, failed=True, exit_code=3), True, [(Verb.START, "failed: trying again")]),
    (WEB, None, replace(CURRENT, failed=True, retry_at=NOW + 8), False, [(Verb.WAIT, "backoff")]),
    (WEB, None, replace(CURRENT, failed=True, retry_at=NOW + 8), True, [(Verb.START, "failed: trying again")]),
    # declared, history says it ran, no task (stopped by a drain, or gone) → start
    (WEB, None, CURRENT, False, [(Verb.START, "not running")]),
])
def test_plan(desired: Spec | None, task: Task | None, past: History | None, resync: bool,
              expected: list[tuple[Verb, str]]) -> None:
    got = plan({WEB.id: desired} if desired else {}, {WEB.id: task} if task else {},
               {WEB.id: past} if past else {}, NOW, resync=resync)
    assert [(a.verb, a.why) for a in got] == expected
    assert all(a.id == WEB.id for a in got)


def test_plan_is_per_container_in_id_order_and_the_earliest_timer_wins() -> None:
    a, b, c = (Spec("workload", n, "r/x:1") for n in ("a", "b", "c"))
    got = plan({s.id: s for s in (a, b, c)}, {b.id: FOUND},
               {a.id: History(a.digest, retry_at=NOW + 8), b.id: History(b.digest),
                c.id: History(c.digest, retry_at=NOW + 2)}, NOW)
    assert [str(x) for x in got] == ["wait workload-a (backoff)", "adopt workload-b (running)",
                                     "wait workload-c (backoff)"]
    assert next_wakeup(got) == NOW + 2
    assert next_wakeup([Action(Verb.START, "x")]) is None


# --- exits: the restart policy and the backoff ----------------------------------------------------


@pytest.mark.parametrize(("restart", "code", "again", "line"), [
    ("always", 0, True, "workload-web: exited with status 0; restart 1 in 1 s"),
    ("always", 137, True, "workload-web: exited with status 137; restart 1 in 1 s"),
    ("on-failure", 4, True, "workload-web: exited with status 4; restart 1 in 1 s"),
    ("on-failure", 0, False, "workload-web: exited with status 0"),
    ("never", 3, False, "workload-web: exited with status 3"),
    ("never", 0, False, "workload-web: exited with status 0"),
])
def test_exit_and_restart_policy(restart: str, code: int, again: bool, line: str) -> None:
    spec = replace(WEB, restart=restart)  # type: ignore[arg-type]
    nxt, said = exited(History(spec.digest, started=NOW - 1), spec, code, NOW)
    assert said == line
    assert (nxt.done, nxt.exit_code, nxt.failed) == (not again, code, not again and code != 0)
    assert nxt.retry_at == (NOW + 1 if again else None)
    # what the planner makes of it
    verbs = [a.verb for a in plan({spec.id: spec}, {}, {spec.id: nxt}, NOW)]
    assert verbs == ([Verb.WAIT] if again else [])


def test_backoff_doubles_to_its_cap_and_resets_after_a_stable_run() -> None:
    past, now, waits = started(None, WEB, NOW), NOW, []
    for _ in range(7):
        now += 0.5  # crashes half a second after each start
        past, _ = exited(past, WEB, 1, now)
        assert past.retry_at is not None
        waits.append(past.retry_at - now)
        now = past.retry_at
        past = started(past, WEB, now)
    assert waits == [1, 2, 4, 8, 16, 30, 30] and MAX_BACKOFF == 30
    assert past.restarts == 7
    past, said = exited(past, WEB, 1, now + STABLE_AFTER)  # ran a minute: a new failure
    assert past.retry_at == now + STABLE_AFTER + 1 and said.endswith("restart 8 in 1 s")


def test_a_new_spec_starts_its_history_afresh() -> None:
    past = replace(History(WEB.digest), restarts=5, backoff=16, failed=True, done=True)
    assert started(past, WEB2, NOW) == History(WEB2.digest, started=NOW)
    assert started(past, WEB, NOW) == replace(past, started=NOW, failed=False, done=False)


def test_a_failed_start_is_retried_after_the_backoff() -> None:
    first = start_failed(started(None, WEB, NOW), WEB, NOW)
    assert (first.retry_at, first.backoff, first.failed, first.done) == (NOW + 1, 2, True, False)
    second = start_failed(started(first, WEB, NOW + 1), WEB, NOW + 1)
    assert second.retry_at == NOW + 3
    assert start_failed(first, WEB2, NOW).backoff == 2  # another spec: from 1 s again


@pytest.mark.parametrize(("state", "exit_code", "restarts", "expected"), [
    ("running", None, 2, []),  # a task to adopt is listed apart; none here → start it again
    ("restarting", 137, 3, [Verb.START]),
    ("stopped", None, 0, [Verb.START]),
    ("exited", 0, 0, []),
    ("failed", 3, 0, []),  # its policy kept it down
    ("failed", None, 0, [Verb.START]),  # it could not start: try again
])
def test_history_from_a_status_file(state: str, exit_code: int | None, restarts: int,
                                    expected: list[Verb]) -> None:
    st = status.State("workload", "web", WEB.image, state, digest=WEB.digest, restarts=restarts,
                      exit_code=exit_code)
    past = from_status(st)
    assert past.restarts == restarts and past.digest == WEB.digest
    task = {WEB.id: FOUND} if state == "running" else {}
    verbs = [a.verb for a in plan({WEB.id: WEB}, task, {WEB.id: past}, NOW)]
    assert verbs == ([Verb.ADOPT] if state == "running" else expected)
