"""kiln.host.slot.state: signpost's transitions, their preconditions and GRUB's choice.

Pure tests, no disk: every transition, every refusal, `next_boot`/`will_boot`, the grubenv
round trip, the whole Bottlerocket update lifecycle, and an exhaustive search of every
state reachable from a freshly built image (transitions interleaved with GRUB boots).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from kiln.core.errors import KilnError
from kiln.host.slot.state import (
    SLOTS,
    TRANSITIONS,
    Flags,
    SlotError,
    SlotState,
    cancel_upgrade,
    clear_inactive,
    grub_boot,
    mark_inactive_valid,
    mark_successful_boot,
    rollback_to_inactive,
    upgrade_to_inactive,
)

GOOD = Flags(priority=1, tries_left=0, successful=True)  # slot A as the build writes it
EMPTY = Flags(0, 0, False)


def state(a: Flags, b: Flags, active: str | None = "A", ever: bool = False) -> SlotState:
    return SlotState(a, b, active, ever)


def placed(active: str, running: Flags, other: Flags) -> SlotState:
    """A state running `active` with flags `running`, the other slot holding `other`."""
    return state(running, other, active) if active == "A" else state(other, running, active)


def fresh() -> SlotState:
    """The state of a freshly built image, running slot A."""
    return state(GOOD, EMPTY, "A")


# --- will_boot and next_boot -----------------------------------------------------------

@pytest.mark.parametrize(
    ("flags", "boots"),
    [
        (Flags(0, 0, False), False),
        (Flags(0, 5, False), False),  # priority 0 never boots, whatever else
        (Flags(0, 0, True), False),
        (Flags(0, 15, True), False),
        (Flags(1, 0, False), False),  # no tries and never confirmed
        (Flags(15, 0, False), False),
        (Flags(1, 1, False), True),
        (Flags(1, 0, True), True),
        (Flags(2, 15, True), True),
        (Flags(15, 15, False), True),
    ],
)
def test_will_boot_rule(flags: Flags, boots: bool) -> None:
    assert flags.will_boot is boots


def test_will_boot_matches_the_rule_exhaustively() -> None:
    for prio, tries, ok in itertools.product(range(16), range(16), (False, True)):
        assert Flags(prio, tries, ok).will_boot is (prio > 0 and (tries > 0 or ok))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (Flags(1, 0, True), Flags(2, 1, False), "B"),  # higher priority wins
        (Flags(2, 0, True), Flags(1, 0, True), "A"),
        (Flags(3, 1, False), Flags(15, 0, True), "B"),
        (Flags(2, 0, True), Flags(2, 1, False), "A"),  # a tie goes to A
        (Flags(15, 3, True), Flags(15, 3, True), "A"),
        (Flags(1, 0, True), Flags(0, 0, False), "A"),  # B cannot boot
        (Flags(1, 0, True), Flags(9, 0, False), "A"),  # B has the priority but no way to boot
        (Flags(0, 1, True), Flags(1, 1, False), "B"),  # A has priority 0
        (Flags(5, 0, False), Flags(1, 0, True), "B"),
        (Flags(0, 0, False), Flags(0, 0, False), None),  # neither boots
        (Flags(3, 0, False), Flags(0, 9, True), None),
    ],
)
def test_next_boot(a: Flags, b: Flags, expected: str | None) -> None:
    assert state(a, b).next_boot == expected
    # The running slot has no say in GRUB's choice.
    assert state(a, b, active="B").next_boot == expected
    assert state(a, b, active=None).next_boot == expected


def test_next_boot_exhaustively_follows_grub_cfg() -> None:
    """Mirror of grub.cfg's selection, checked over a grid of states."""
    grid = itertools.product((0, 1, 2, 7, 15), (0, 1, 15), (False, True))
    values = [Flags(p, t, ok) for p, t, ok in grid]
    for a, b in itertools.product(values, values):
        slot: str | None = None
        if a.will_boot:
            slot = "A"
        if b.will_boot and (slot is None or b.priority > a.priority):
            slot = "B"
        assert state(a, b).next_boot == slot


def test_inactive_and_flags() -> None:
    st = state(Flags(1, 2, True), Flags(3, 4, False), "A")
    assert st.inactive == "B"
    assert st.flags("A") == Flags(1, 2, True)
    assert st.flags("B") == Flags(3, 4, False)
    assert replace(st, active="B").inactive == "A"
    assert st.with_flags("B", EMPTY) == state(Flags(1, 2, True), EMPTY, "A")
    assert st.with_flags("A", EMPTY) == state(EMPTY, Flags(3, 4, False), "A")


# --- the transitions --------------------------------------------------------------------

@pytest.mark.parametrize("active", SLOTS)
def test_mark_successful_boot(active: str) -> None:
    unconfirmed = Flags(2, 0, False)
    other = Flags(1, 0, True)
    st = placed(active, unconfirmed, other)
    after = mark_successful_boot(st)
    assert after.flags(active) == Flags(2, 0, True)
    assert after.flags(st.inactive) == other
    assert after.ever_succeeded
    assert after.active == active
    assert mark_successful_boot(after) == after  # idempotent


def test_mark_successful_boot_keeps_tries() -> None:
    after = mark_successful_boot(state(Flags(2, 1, False), GOOD, "A"))
    assert after.a == Flags(2, 1, True)


@pytest.mark.parametrize("active", SLOTS)
def test_clear_inactive(active: str) -> None:
    busy = Flags(7, 3, True)
    running = Flags(2, 0, True)
    st = placed(active, running, busy)
    after = clear_inactive(st)
    assert after.flags(st.inactive) == EMPTY
    assert after.flags(active) == running
    assert after.ever_succeeded == st.ever_succeeded
    assert clear_inactive(after) == after


@pytest.mark.parametrize("active", SLOTS)
def test_mark_inactive_valid(active: str) -> None:
    running = Flags(1, 0, True)
    st = placed(active, running, EMPTY)
    after = mark_inactive_valid(st)
    assert after.flags(st.inactive) == Flags(0, 1, False)
    assert after.flags(active) == running
    # Valid but priority 0: it does not boot until upgrade-to-inactive.
    assert after.next_boot == active
    assert mark_inactive_valid(after) == after


def test_mark_inactive_valid_keeps_priority_and_flag() -> None:
    after = mark_inactive_valid(state(GOOD, Flags(3, 0, True), "A"))
    assert after.b == Flags(3, 1, True)


@pytest.mark.parametrize("active", SLOTS)
def test_upgrade_to_inactive(active: str) -> None:
    running = Flags(2, 0, True)
    valid = Flags(0, 1, False)
    st = placed(active, running, valid)
    after = upgrade_to_inactive(st)
    assert after.flags(st.inactive) == Flags(2, 1, False)
    assert after.flags(active) == Flags(1, 0, True)
    assert after.next_boot == st.inactive
    assert after.active == active  # nothing changes until the reboot


@pytest.mark.parametrize(
    ("inactive", "why"),
    [
        (Flags(0, 0, False), "tries_left=0"),  # cleared but never marked valid
        (Flags(1, 1, False), "priority=1"),  # not cleared
        (Flags(2, 1, False), "priority=2"),  # already the upgrade target
        (Flags(0, 1, True), "successful=1"),  # carries an old success flag
        (Flags(1, 0, True), "priority=1"),  # the previous good slot
    ],
)
def test_upgrade_to_inactive_preconditions(inactive: Flags, why: str) -> None:
    st = state(GOOD, inactive, "A")
    with pytest.raises(SlotError, match="cannot upgrade to slot B") as exc:
        upgrade_to_inactive(st)
    assert why in str(exc.value)
    assert exc.value.hint is not None and "mark-inactive-valid" in exc.value.hint


def test_upgrade_to_inactive_precondition_is_exact() -> None:
    """Allowed exactly when the inactive slot has priority 0, tries > 0, not successful."""
    for prio, tries, ok in itertools.product(range(16), range(16), (False, True)):
        st = state(GOOD, Flags(prio, tries, ok), "A")
        allowed = prio == 0 and not ok and tries > 0
        if allowed:
            after = upgrade_to_inactive(st)
            assert after.b == Flags(2, tries, False)
            assert after.a == Flags(1, 0, True)
        else:
            with pytest.raises(SlotError):
                upgrade_to_inactive(st)


@pytest.mark.parametrize("active", SLOTS)
def test_cancel_upgrade(active: str) -> None:
    running = Flags(1, 0, True)
    target = Flags(2, 1, False)
    st = placed(active, running, target)
    after = cancel_upgrade(st)
    assert after.flags(st.inactive) == Flags(0, 1, False)
    assert after.flags(active) == Flags(2, 0, True)
    assert after.next_boot == active


def test_cancel_upgrade_undoes_upgrade() -> None:
    st = mark_inactive_valid(clear_inactive(fresh()))
    back = cancel_upgrade(upgrade_to_inactive(st))
    assert back.next_boot == "A"
    assert back.b == Flags(0, 1, False)
    assert back.a == Flags(2, 0, True)


@pytest.mark.parametrize("active", SLOTS)
def test_rollback_to_inactive(active: str) -> None:
    running = Flags(2, 0, True)
    previous = Flags(1, 0, True)
    st = placed(active, running, previous)
    after = rollback_to_inactive(st)
    assert after.flags(st.inactive) == Flags(2, 0, True)
    assert after.flags(active) == Flags(1, 0, True)
    assert after.next_boot == st.inactive


@pytest.mark.parametrize(
    "inactive",
    [Flags(0, 0, False), Flags(0, 1, True), Flags(3, 0, False), Flags(15, 0, False)],
)
def test_rollback_to_inactive_refused_when_inactive_would_not_boot(inactive: Flags) -> None:
    st = state(GOOD, inactive, "A")
    with pytest.raises(SlotError, match="cannot roll back to slot B: it would not boot"):
        rollback_to_inactive(st)


def test_rollback_to_inactive_precondition_is_exact() -> None:
    for prio, tries, ok in itertools.product(range(16), range(3), (False, True)):
        inactive = Flags(prio, tries, ok)
        st = state(Flags(2, 0, True), inactive, "A")
        if inactive.will_boot:
            after = rollback_to_inactive(st)
            assert after.b == replace(inactive, priority=2)
            assert after.next_boot == "B"
        else:
            with pytest.raises(SlotError):
                rollback_to_inactive(st)


@pytest.mark.parametrize("name", sorted(TRANSITIONS))
@pytest.mark.parametrize("active", [None, "C", ""])
def test_every_transition_needs_a_known_active_slot(name: str, active: str | None) -> None:
    st = state(GOOD, Flags(0, 1, False), active)
    with pytest.raises(SlotError, match="active slot is unknown") as exc:
        TRANSITIONS[name](st)
    assert exc.value.hint is not None and "--active" in exc.value.hint


def test_unknown_active_slot_still_has_a_next_boot() -> None:
    st = state(GOOD, EMPTY, None)
    assert st.next_boot == "A"
    with pytest.raises(SlotError):
        _ = st.inactive


def test_slot_error_is_a_kiln_error() -> None:
    assert issubclass(SlotError, KilnError)


def test_transition_table_names_signpost_commands() -> None:
    assert set(TRANSITIONS) == {
        "mark-successful-boot", "clear-inactive", "mark-inactive-valid",
        "upgrade-to-inactive", "cancel-upgrade", "rollback-to-inactive",
    }


# --- grubenv round trip -----------------------------------------------------------------

def _grid() -> Iterator[SlotState]:
    grid = itertools.product((0, 1, 2, 15), (0, 1, 15), (False, True))
    flags = [Flags(p, t, ok) for p, t, ok in grid]
    for a, b, active, ever in itertools.product(flags, flags, ("A", "B", None), (False, True)):
        yield state(a, b, active, ever)


def test_env_round_trip() -> None:
    for st in _grid():
        env = st.to_env()
        assert set(env) == {"A_PRIO", "A_TRIES", "A_OK", "B_PRIO", "B_TRIES", "B_OK", "EVER_OK"}
        assert all(v.isascii() and v.isdigit() for v in env.values())
        assert SlotState.from_env(env, st.active) == st


def test_to_env_values() -> None:
    st = state(Flags(1, 0, True), Flags(2, 1, False), "B", ever=True)
    assert st.to_env() == {
        "A_PRIO": "1", "A_TRIES": "0", "A_OK": "1",
        "B_PRIO": "2", "B_TRIES": "1", "B_OK": "0",
        "EVER_OK": "1",
    }


def test_from_env_as_the_build_writes_it() -> None:
    env = {"A_PRIO": "1", "A_TRIES": "0", "A_OK": "1", "B_PRIO": "0", "B_TRIES": "0", "B_OK": "0"}
    st = SlotState.from_env(env, "A")
    assert st == fresh()
    assert not st.ever_succeeded


def test_from_env_defaults_missing_keys_to_zero() -> None:
    assert SlotState.from_env({}, None) == state(EMPTY, EMPTY, None)
    st = SlotState.from_env({"B_PRIO": "3", "B_OK": "1"}, "B")
    assert st == state(EMPTY, Flags(3, 0, True), "B")


def test_from_env_ignores_other_variables() -> None:
    env = {**fresh().to_env(), "saved_entry": "x", "kiln_other": "garbage"}
    assert SlotState.from_env(env, "A") == replace(fresh(), ever_succeeded=False)


def test_from_env_limits() -> None:
    st = SlotState.from_env({"A_PRIO": "15", "A_TRIES": "15", "A_OK": "0", "B_OK": "1"}, "A")
    assert st.a == Flags(15, 15, False)
    assert st.b == Flags(0, 0, True)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("A_PRIO", "x"),
        ("A_PRIO", "16"),
        ("A_PRIO", "-1"),
        ("A_PRIO", ""),
        ("A_PRIO", "1.0"),
        ("A_PRIO", " 1"),
        ("A_PRIO", "+1"),
        ("A_PRIO", "0x1"),
        ("B_PRIO", "99"),
        ("A_TRIES", "16"),
        ("B_TRIES", "two"),
        ("A_OK", "2"),
        ("B_OK", "yes"),
        ("B_OK", "true"),
    ],
)
def test_from_env_rejects_malformed_values(key: str, value: str) -> None:
    env = {**fresh().to_env(), key: value}
    with pytest.raises(KilnError, match=key) as exc:
        SlotState.from_env(env, "A")
    assert repr(value) in str(exc.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("A_PRIO", "²"),  # str.isdigit() is true, int() raises ValueError
        ("B_TRIES", "³"),
        ("A_PRIO", "١"),  # ARABIC-INDIC DIGIT ONE: int() accepts it, GRUB reads 0
        ("B_PRIO", "１"),  # FULLWIDTH DIGIT ONE
    ],
    ids=["superscript-two", "superscript-three", "arabic-indic-one", "fullwidth-one"],
)
def test_from_env_rejects_non_ascii_digits(key: str, value: str) -> None:
    """GRUB compares these with `test -gt`, which only knows ASCII digits.

    Kiln must not report a slot as bootable when GRUB sees priority 0, nor crash with a
    traceback: a malformed value is a KilnError naming the key, like 'x' or '16'.
    """
    env = {**fresh().to_env(), key: value}
    with pytest.raises(KilnError, match=key):
        SlotState.from_env(env, "A")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("A_OK", "01"),  # grub.cfg tests `[ "$A_OK" = 1 ]`: "01" is not successful
        ("B_PRIO", "08"),  # a leading zero: refused, whatever GRUB makes of it
        ("B_PRIO", "010"),  # GRUB's test -gt reads octal: 8, not 10 (tests/test_grub_cfg.py)
    ],
)
def test_from_env_rejects_non_canonical_numbers(key: str, value: str) -> None:
    """Values GRUB reads differently from int(): refusing them keeps Kiln's view = GRUB's."""
    env = {**fresh().to_env(), key: value}
    with pytest.raises(KilnError, match=key):
        SlotState.from_env(env, "A")


def test_to_json() -> None:
    st = upgrade_to_inactive(mark_inactive_valid(clear_inactive(mark_successful_boot(fresh()))))
    assert st.to_json() == {
        "A": {"priority": 1, "tries_left": 0, "successful": True, "will_boot": True},
        "B": {"priority": 2, "tries_left": 1, "successful": False, "will_boot": True},
        "active": "A",
        "next": "B",
        "ever_succeeded": True,
    }
    assert state(EMPTY, EMPTY, None).to_json()["next"] is None


# --- the Bottlerocket update lifecycle --------------------------------------------------

def _upgraded_and_booted() -> SlotState:
    """Fresh image -> update written to B -> reboot: GRUB spends B's single try."""
    st = fresh()
    assert st.next_boot == "A"

    st = clear_inactive(st)
    assert st == state(GOOD, EMPTY, "A")

    st = mark_inactive_valid(st)
    assert st == state(GOOD, Flags(0, 1, False), "A")
    assert st.next_boot == "A"

    st = upgrade_to_inactive(st)
    assert st == state(Flags(1, 0, True), Flags(2, 1, False), "A")
    assert st.next_boot == "B"

    st = grub_boot(st)
    assert st == state(Flags(1, 0, True), Flags(2, 0, False), "B")
    return st


def test_lifecycle_success_path() -> None:
    st = _upgraded_and_booted()
    st = mark_successful_boot(st)
    assert st == state(Flags(1, 0, True), Flags(2, 0, True), "B", ever=True)
    assert st.next_boot == "B"
    # Later boots stay on B and spend nothing.
    again = grub_boot(st)
    assert again == st
    # The operator rolls back: A, still marked good, boots next.
    st = rollback_to_inactive(st)
    assert st == state(Flags(2, 0, True), Flags(1, 0, True), "B", ever=True)
    assert st.next_boot == "A"
    assert grub_boot(st).active == "A"


def test_lifecycle_failure_path() -> None:
    st = _upgraded_and_booted()
    # B never reaches mark-successful-boot (it hangs or crashes): B has no tries left.
    assert not st.b.will_boot
    assert st.next_boot == "A"
    st = grub_boot(st)
    assert st == state(Flags(1, 0, True), Flags(2, 0, False), "A")
    assert st.next_boot == "A"
    # Back on A, the agent can try again from scratch.
    st = upgrade_to_inactive(mark_inactive_valid(clear_inactive(st)))
    assert st.next_boot == "B"


def test_lifecycle_back_and_forth() -> None:
    """Two successful updates in a row land on A again, each one confirmed."""
    st = fresh()
    for target in ("B", "A"):
        st = upgrade_to_inactive(mark_inactive_valid(clear_inactive(st)))
        st = mark_successful_boot(grub_boot(st))
        assert st.active == target
        assert st.flags(target) == Flags(2, 0, True)
        assert st.next_boot == target
    assert st.b == Flags(1, 0, True)  # the previous version stays available for rollback
    assert rollback_to_inactive(st).next_boot == "B"


def test_cancel_upgrade_before_reboot() -> None:
    st = upgrade_to_inactive(mark_inactive_valid(clear_inactive(fresh())))
    st = cancel_upgrade(st)
    assert st.next_boot == "A"
    assert grub_boot(st) == st


# --- exhaustive search over reachable states --------------------------------------------

Event = str  # a transition name, or "reboot" (GRUB picks a slot, spending a try)
Policy = Callable[[SlotState, Event], bool]


def _step(st: SlotState, event: Event) -> SlotState | None:
    if event == "reboot":
        return grub_boot(st)
    try:
        return TRANSITIONS[event](st)
    except SlotError:
        return None


def _explore(policy: Policy) -> tuple[dict[SlotState, list[Event]], list[list[Event]]]:
    """BFS from a fresh image; returns every reachable state (with a shortest path to it)
    and the shortest paths to states in which no slot will boot (dead ends)."""
    start = fresh()
    paths: dict[SlotState, list[Event]] = {start: []}
    dead: list[list[Event]] = []
    queue = deque([start])
    events = [*TRANSITIONS, "reboot"]
    while queue:
        st = queue.popleft()
        for event in events:
            if not policy(st, event):
                continue
            nxt = _step(st, event)
            if nxt is None or nxt in paths:
                continue
            paths[nxt] = [*paths[st], event]
            if nxt.next_boot is None:
                dead.append(paths[nxt])  # GRUB could not boot anything: stop here
            else:
                queue.append(nxt)
    return paths, dead


def _replay(events: list[Event]) -> SlotState:
    st = fresh()
    for event in events:
        nxt = _step(st, event)
        assert nxt is not None, f"{event} refused in {st}"
        st = nxt
    return st


def _anything(st: SlotState, event: Event) -> bool:
    return True


def _running_slot_bootable(st: SlotState, event: Event) -> bool:
    """An agent that only gives up the other slot while its own slot would boot again."""
    if event in ("clear-inactive", "cancel-upgrade"):
        return st.active is not None and st.flags(st.active).will_boot
    return True


def test_reachable_states_stay_in_signposts_range() -> None:
    paths, _ = _explore(_anything)
    assert len(paths) > 10
    for st in paths:
        assert st.active in SLOTS
        for f in (st.a, st.b):
            assert f.priority in (0, 1, 2)
            assert f.tries_left in (0, 1)


def test_transitions_keep_a_bootable_running_slot_bootable() -> None:
    """No transition ever makes the running slot unbootable: if it would boot before, it
    boots after, so at least one slot stays bootable. Checked over a grid of states."""
    for st in _grid():
        if st.active is None or not st.flags(st.active).will_boot:
            continue
        for name, transition in TRANSITIONS.items():
            try:
                after = transition(st)
            except SlotError:
                continue
            assert after.flags(st.active).will_boot, (name, st, after)
            assert after.next_boot is not None, (name, st, after)
            assert after.active == st.active


def test_confirmed_start_never_bricks_with_a_careful_agent() -> None:
    """From A bootable and successful, with any interleaving of transitions, GRUB boots
    (spending tries) and successful marks, some slot always boots, provided clear-inactive
    and cancel-upgrade are only run while the running slot would itself boot again."""
    paths, dead = _explore(_running_slot_bootable)
    assert dead == []
    assert len(paths) > 10
    # Every slot can still be reached and confirmed.
    assert {st.active for st in paths} == {"A", "B"}


def test_confirmed_start_never_bricks_with_any_sequence() -> None:
    """Any interleaving of slot commands, GRUB boots and successful marks leaves some slot
    bootable: clear-inactive and cancel-upgrade refuse to give up the other slot while the
    running one has spent its try and is not yet confirmed (signpost has no such guard)."""
    paths, dead = _explore(_anything)
    assert dead == []
    assert {st.active for st in paths} == {"A", "B"}


def test_giving_up_the_old_slot_during_an_unconfirmed_trial_boot_is_refused() -> None:
    base = ["clear-inactive", "mark-inactive-valid", "upgrade-to-inactive", "reboot"]
    trial = _replay(base)
    assert trial == state(Flags(1, 0, True), Flags(2, 0, False), "B")
    assert trial.next_boot == "A"  # still safe: an unconfirmed B falls back to A
    with pytest.raises(SlotError, match="not marked successful"):
        clear_inactive(trial)
    with pytest.raises(SlotError, match="not marked successful"):
        cancel_upgrade(trial)

    # Marking the trial boot successful first makes both commands safe.
    confirmed = _replay([*base, "mark-successful-boot"])
    assert clear_inactive(confirmed).next_boot == "B"
    assert cancel_upgrade(confirmed).next_boot == "B"
