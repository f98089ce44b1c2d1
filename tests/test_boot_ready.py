"""kiln.host.boot.ready and kiln.host.boot.health on the host: the fallback report, the
health gate and the successful mark, on a small Kiln disk image (real ESP and grubenv,
tests.helpers.small_disk) with the real slot code. Only what needs a booted machine is
passed in: the unit states systemd would report, and the reboot (recorded, not done).
The HTTP check is a real server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiln.host.boot import health, ready
from kiln.host.slot import Flags, Slots, SlotState
from kiln.host.slot.state import grub_boot
from kiln.host.update import failures
from kiln.host.update.status import Paths, read_versions, write_versions
from tests.helpers import Health, small_disk

GOOD = Flags(1, 0, True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_disk(tmp_path_factory.mktemp("disk") / "disk.img", root_mib=2)


@pytest.fixture
def disk(tmp_path: Path, pristine: Path) -> Path:
    copy = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", pristine, copy], check=True)
    return copy


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(state=tmp_path / "state", run=tmp_path / "run", root=tmp_path / "root.json")


@pytest.fixture(autouse=True)
def not_a_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """say() writes to /dev/console under systemd: never this machine's console."""
    monkeypatch.delenv("INVOCATION_ID", raising=False)


@pytest.fixture
def http() -> Iterator[Health]:
    server = Health()
    yield server
    server.close()


def put(disk: Path, a: Flags, b: Flags, active: str, ever: bool = True) -> Slots:
    """The slots of `disk` seen from `active`, with the grubenv holding `a` and `b`."""
    slots = Slots.open(image=disk, active=active)
    slots.store.write(SlotState(a, b, active, ever).to_env())
    return slots


class Reboots:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def verdict(reason: str | None) -> Callable[[health.Check], str | None]:
    return lambda check: reason


# --- the health gate's checks ---------------------------------------------------------------


class Units:
    """What `systemctl show` would say, poll by poll: a unit's states in turn (the last stays)."""

    def __init__(self, **timeline: list[str]) -> None:
        self.timeline = {u.replace("_", "-") + ("" if "." in u else ".service"): s for u, s in timeline.items()}
        self.timeline.setdefault(health.READY_TARGET, ["active"])
        self.polls: list[list[str]] = []

    def __call__(self, units: list[str]) -> dict[str, str]:
        self.polls.append(units)
        out = {}
        for u in units:
            seen = sum(u in p for p in self.polls) - 1
            states = self.timeline.get(u, ["unknown"])
            out[u] = states[min(seen, len(states) - 1)]
        return out


def test_check_from_settings() -> None:
    assert health.Check.from_settings({}) == health.Check((), None, health.DEFAULT_TIMEOUT)
    settings = {"health": {"units": ["containerd.service"], "http-check": "http://127.0.0.1:1/h", "timeout": 30}}
    assert health.Check.from_settings(settings) == health.Check(("containerd.service",), "http://127.0.0.1:1/h", 30.0)


def test_parse_systemctl_show() -> None:
    out = "Id=a.service\nActiveState=active\n\nId=b.service\nActiveState=failed\n\nId=c.service\n"
    assert health.parse_show(out, ["a.service", "b.service", "c.service", "d.service"]) == {
        "a.service": "active", "b.service": "failed", "c.service": "unknown", "d.service": "unknown"}


def test_a_failed_ready_target_fails_at_once() -> None:
    units = Units(**{"kiln-ready.target": ["failed"]})
    reason = health.wait_healthy(health.Check(("containerd.service",), timeout=3600), states=units)
    assert reason == f"{health.READY_TARGET} was not reached (failed): a unit the host needs failed"
    assert len(units.polls) == 1  # one query (the target with the units), no waiting for them


def test_a_ready_target_seen_started_is_not_asked_again() -> None:
    """The agent saw `systemctl start kiln-ready.target` succeed: no process asks again."""
    units = Units(containerd=["active"], **{"kiln-ready.target": ["failed"]})  # failed, if it were asked
    assert health.wait_healthy(health.Check(), states=units, target_reached=True) is None
    assert units.polls == []
    check = health.Check(("containerd.service",), timeout=0)
    assert health.wait_healthy(check, states=units, poll=0, target_reached=True) is None
    assert units.polls == [["containerd.service"]]


def test_healthy_once_the_units_come_up(http: Health) -> None:
    """Polls until every unit is active and the HTTP check answers 2xx."""
    units = Units(containerd=["activating", "activating", "active"])
    check = health.Check(("containerd.service",), f"http://127.0.0.1:{http.port}/healthz", timeout=3600)
    assert health.wait_healthy(check, states=units, poll=0) is None
    assert len([p for p in units.polls if "containerd.service" in p]) == 3


def test_unhealthy_after_the_timeout_says_why(http: Health) -> None:
    http.ok = False
    url = f"http://127.0.0.1:{http.port}/healthz"
    check = health.Check(("containerd.service",), url, timeout=0)
    assert health.wait_healthy(check, states=Units(containerd=["failed"])) == "containerd.service is failed (after 0 s)"
    assert health.wait_healthy(check, states=Units(containerd=["active"])) == (
        f"health check {url}: HTTP 503 (after 0 s)")


def test_an_unreachable_http_check_is_a_reason() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        check = health.Check((), f"http://127.0.0.1:{port}/", timeout=0)
        reason = health.wait_healthy(check, states=Units())
    assert reason is not None and "refused" in reason.lower()


# --- the fallback report --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "reported"),
    [
        (GOOD, Flags(0, 0, False), False),  # fresh image: B empty
        (GOOD, Flags(0, 1, False), False),  # B written and valid, not yet the upgrade target
        (GOOD, Flags(2, 1, False), False),  # B is the target but not tried yet (activated after boot)
        (Flags(2, 0, True), Flags(1, 0, True), False),  # an operator rolled back from B
        (GOOD, Flags(2, 0, True), False),  # B good, A chosen on purpose (not a GRUB fallback)
        (GOOD, Flags(2, 0, False), True),  # B tried, never marked successful: GRUB fell back
    ],
)
def test_fell_back_only_when_the_upgrade_target_spent_its_try(a: Flags, b: Flags, reported: bool) -> None:
    assert ready.fell_back(SlotState(a, b, "A")) is reported
    assert ready.fell_back(SlotState(b, a, "B")) is reported


def test_fallback_without_a_note_is_ambiguous(disk: Path, paths: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    """The new version never reached its gate (a panic, a hang, a power cut): B is cleared
    and the failure logged as ambiguous, once."""
    write_versions(paths, {"A": "1.0.0", "B": "1.1.0"})
    slots = put(disk, GOOD, Flags(2, 0, False), "A")
    ready.report_fallback(slots, slots.state(), paths, "1.0.0")
    [entry] = failures.read(paths.failures)
    assert {k: entry[k] for k in ("version", "slot", "reason", "kind", "running")} == {
        "version": "1.1.0", "slot": "B", "reason": failures.UNHEALTHY, "kind": failures.AMBIGUOUS,
        "running": "1.0.0"}
    assert slots.state().b == Flags(0, 0, False) and slots.state().a == GOOD
    assert read_versions(paths) == {"A": "1.0.0"}
    assert "kiln: update to 1.1.0 failed" in capsys.readouterr().err
    ready.report_fallback(slots, slots.state(), paths, "1.0.0")  # the next boot: nothing new
    assert len(failures.read(paths.failures)) == 1


def test_nothing_to_report_writes_nothing(disk: Path, paths: Paths) -> None:
    slots = put(disk, GOOD, Flags(2, 1, False), "A")
    before = slots.store.read()
    ready.report_fallback(slots, slots.state(), paths, "1.0.0")
    assert slots.store.read() == before
    assert not paths.failures.exists()


def test_a_note_from_another_slot_is_not_the_reason(disk: Path, paths: Paths) -> None:
    """A stale note (about slot A) names neither the reason nor the version of B's failure."""
    paths.state.mkdir(parents=True)
    (paths.state / "pending-failure.json").write_text(
        json.dumps({"version": "0.9.0", "slot": "A", "reason": "health gate failed: old"}))
    slots = put(disk, GOOD, Flags(2, 0, False), "A")
    ready.report_fallback(slots, slots.state(), paths, "1.0.0")
    [entry] = failures.read(paths.failures)
    assert (entry["kind"], entry["reason"], entry["version"]) == (failures.AMBIGUOUS, failures.UNHEALTHY, "unknown")
    assert not (paths.state / "pending-failure.json").exists()


@pytest.mark.parametrize("b", [Flags(2, 0, True), Flags(2, 0, False)], ids=["good", "update-target"])
def test_a_slot_grub_skipped_is_reported_as_definite_and_cleared(disk: Path, paths: Paths, b: Flags,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """grub.cfg could not load B's kiln.cfg, kernel or initramfs (missing, or refused by the
    signature check) and booted A with kiln.skipped=B: a definite failure, even of a slot
    once marked good, and B is cleared so the next boot does not try it again."""
    write_versions(paths, {"A": "1.0.0", "B": "1.1.0"})
    slots = put(disk, GOOD, b, "A")
    ready.report_fallback(slots, slots.state(), paths, "1.0.0", skipped="B")
    [entry] = failures.read(paths.failures)
    assert (entry["kind"], entry["reason"], entry["version"], entry["slot"]) == (
        failures.DEFINITE, ready.BOOT_FILES, "1.1.0", "B")
    assert slots.state().b == Flags(0, 0, False) and slots.state().a == GOOD
    err = capsys.readouterr().err
    assert ("kiln: slot B (1.1.0) did not boot" if b.successful else "kiln: update to 1.1.0 failed") in err
    ready.report_fallback(slots, slots.state(), paths, "1.0.0", skipped="B")  # ready runs again: once
    assert len(failures.read(paths.failures)) == 1


def test_skipped_names_only_the_other_slot(disk: Path, paths: Paths) -> None:
    """kiln.skipped= naming the running slot, or an empty other slot, reports nothing."""
    slots = put(disk, GOOD, Flags(2, 0, True), "A")
    ready.report_fallback(slots, slots.state(), paths, "1.0.0", skipped="A")
    slots = put(disk, GOOD, Flags(0, 0, False), "A")
    ready.report_fallback(slots, slots.state(), paths, "1.0.0", skipped="B")
    assert not paths.failures.exists()


# --- the gate and the successful mark ---------------------------------------------------------


def test_a_healthy_boot_is_marked_successful(disk: Path, paths: Paths) -> None:
    """The new version on B passes its gate: B is marked good, A stays for a rollback."""
    slots = put(disk, GOOD, Flags(2, 0, False), "B", ever=False)
    reboots = Reboots()
    assert ready.confirm(slots, paths, "1.1.0", settings={}, wait=verdict(None), reboot=reboots)
    st = slots.state()
    assert (st.a, st.b, st.ever_succeeded, st.next_boot) == (GOOD, Flags(2, 0, True), True, "B")
    assert read_versions(paths) == {"B": "1.1.0"} and reboots.count == 0
    assert not paths.failures.exists()


def test_the_gate_reads_the_health_settings(disk: Path, paths: Paths) -> None:
    seen: list[health.Check] = []

    def wait(check: health.Check) -> str | None:
        seen.append(check)
        return None

    settings = {"health": {"units": ["x.service"], "timeout": 5}}
    assert ready.confirm(put(disk, GOOD, Flags(0, 0, False), "A"), paths, "1.0.0", settings=settings, wait=wait)
    assert seen == [health.Check(("x.service",), None, 5.0)]


def test_an_unhealthy_new_version_rolls_back_and_the_old_one_says_why(
        disk: Path, paths: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    """B fails its gate: a note, a reboot, B never marked. GRUB then boots A (B has no
    try left), and A's ready step reports the failure as definite, with the gate's reason."""
    slots = put(disk, GOOD, Flags(2, 0, False), "B")
    reboots = Reboots()
    assert not ready.confirm(slots, paths, "1.1.0", settings={}, wait=verdict("containerd.service is failed"),
                             reboot=reboots)
    assert reboots.count == 1
    assert slots.state().b == Flags(2, 0, False), "marked successful despite the gate"
    assert json.loads((paths.state / "pending-failure.json").read_text()) == {
        "version": "1.1.0", "slot": "B", "reason": "health gate failed: containerd.service is failed"}
    assert "rebooting into slot A" in capsys.readouterr().err

    after = grub_boot(slots.state())  # what GRUB does at the reboot
    assert after.active == "A"
    slots = Slots.open(image=disk, active="A")
    assert ready.confirm(slots, paths, "1.0.0", settings={}, wait=verdict(None), reboot=reboots)
    [entry] = failures.read(paths.failures)
    assert (entry["version"], entry["kind"], entry["reason"]) == (
        "1.1.0", failures.DEFINITE, "health gate failed: containerd.service is failed")
    assert slots.state().b == Flags(0, 0, False) and reboots.count == 1
    assert not (paths.state / "pending-failure.json").exists()


@pytest.mark.parametrize(
    ("running", "other", "why"),
    [
        (Flags(2, 0, True), Flags(1, 0, True), "marked successful before: never rolled back for a later failure"),
        (Flags(2, 0, False), Flags(0, 0, False), "the other slot would not boot"),
        (Flags(2, 0, False), Flags(1, 0, False), "the other slot would not boot"),
    ],
)
def test_an_unhealthy_boot_stays_when_rolling_back_is_wrong(disk: Path, paths: Paths, running: Flags,
                                                            other: Flags, why: str) -> None:
    slots = put(disk, other, running, "B")
    reboots = Reboots()
    assert not ready.rolls_back(slots.state()), why
    assert not ready.confirm(slots, paths, "1.1.0", settings={}, wait=verdict("x.service is failed"),
                             reboot=reboots)
    assert reboots.count == 0, why
    assert slots.state().b == running  # not marked: the host stays not-ready and says why
    assert not (paths.state / "pending-failure.json").exists()


def test_an_unreadable_grubenv_is_rewritten_then_marked(disk: Path, paths: Paths,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """GRUB booted A on an unreadable grubenv (tests/test_grub_cfg.py); ready repairs it."""
    slots = Slots.open(image=disk, active="A")
    with open(disk, "r+b") as f:
        f.seek(slots.store.offset)
        f.write(bytes(1024))
    assert ready.confirm(slots, paths, "1.0.0", settings={}, wait=verdict(None), reboot=Reboots())
    st = slots.state()
    assert (st.a, st.b, st.next_boot) == (GOOD, Flags(0, 0, False), "A")
    assert "grubenv was unreadable" in capsys.readouterr().err


def test_main_refuses_a_boot_outside_kilns_chain(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ready, "booted_slot", lambda: None)
    assert ready.main() == 1
    assert "no kiln.slot=" in capsys.readouterr().err
