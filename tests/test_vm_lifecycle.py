"""The VM harness's lifetime logic, without a guest: a VM under cold_reboot is a chain of
QEMUs (one per guest boot) that ends only at a power-off, kill() or a failing QEMU, and
shutdown() reaches the QEMU running at the time, even while it is still in firmware.

The QEMU here is tests/fake_qemu.py, which fakes only how long a QEMU lives and how it
ends; tests/vm/test_run.py does the same with `kiln run` and a real guest."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiln.core.errors import KilnError
from kiln.vm.qemu import READY_RE, Ending, Vm, VmConfig, after_exit

FAKE = Path(__file__).with_name("fake_qemu.py")


def test_after_exit_table() -> None:
    def ends(rc: int = 0, off: bool = False, sig: bool = False, cold: bool = True,
             killed: bool = False, powering_off: bool = False) -> Ending | None:
        return after_exit(returncode=rc, powered_off=off, host_signal=sig, cold_reboot=cold,
                          killed=killed, powering_off=powering_off)

    assert ends() is None  # a guest reset: the next QEMU boots it
    assert ends(off=True) == Ending.POWERED_OFF
    assert ends(cold=False) == Ending.POWERED_OFF  # without -no-reboot QEMU exits 0 only at a power-off
    assert ends(powering_off=True) == Ending.REBOOTED  # it went down for a reboot while we pressed
    assert ends(off=True, powering_off=True) == Ending.POWERED_OFF
    assert ends(killed=True, off=True) == Ending.KILLED
    assert ends(rc=1) == Ending.FAILED  # e.g. a forwarded port in use: never relaunched in a loop
    assert ends(rc=-9) == Ending.KILLED
    assert ends(sig=True) == Ending.KILLED  # SIGTERM to QEMU exits 0: not a reset
    # Exhaustively: a new QEMU starts only for a clean exit that is a reset nobody asked to end.
    for rc in (0, 1, -9):
        for off, sig, cold, killed, powering_off in itertools.product((False, True), repeat=5):
            relaunch = ends(rc, off, sig, cold, killed, powering_off) is None
            assert relaunch == (rc == 0 and cold and not (off or sig or killed or powering_off))


@pytest.fixture
def fake_vm(tmp_path: Path) -> Iterator[Callable[..., Vm]]:
    """Start VMs whose QEMU is the fake; at teardown every fake process still alive (only
    those these tests started, by pid) is killed."""
    vms: list[Vm] = []

    def start(*args: str) -> Vm:
        cfg = VmConfig(tmp_path / "disk.img", tmp_path, cold_reboot=True)
        vm = Vm(cfg, serial_log=tmp_path / "serial.log")
        vms.append(vm)
        return vm.start_argv([sys.executable, str(FAKE), str(tmp_path), *args])

    yield start
    for vm in vms:
        vm.kill()
    for pid in pids(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def pids(state: Path) -> list[int]:
    path = state / "pids"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def presses(state: Path) -> list[str]:
    path = state / "presses"
    return path.read_text().splitlines() if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_guest_reboots_do_not_end_the_vm(fake_vm: Callable[..., Vm], tmp_path: Path) -> None:
    vm = fake_vm("--resets", "2")
    readies = [vm.wait_for(READY_RE, 10).group(1) for _ in range(3)]
    assert readies == ["1.0.1", "1.0.2", "1.0.3"]
    with pytest.raises(KilnError, match="did not end"):
        vm.wait_exit(0.5)  # the first QEMU is long gone; the VM is not
    assert vm.running and vm.relaunches == 2 and vm.ending is None
    assert vm.shutdown(timeout=10, press_every=0.2) == Ending.POWERED_OFF
    assert presses(tmp_path) == ["3 os"]  # the button of the QEMU running now
    assert not vm.running
    assert len(pids(tmp_path)) == 3 and not any(alive(p) for p in pids(tmp_path))


def test_power_button_is_pressed_again_until_the_guest_takes_it(fake_vm: Callable[..., Vm], tmp_path: Path) -> None:
    vm = fake_vm("--resets", "1", "--firmware", "1.0")
    vm.wait_for("reboot: Restarting system", 10)
    deadline = time.monotonic() + 10
    while vm.relaunches < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert vm.shutdown(timeout=10, press_every=0.2) == Ending.POWERED_OFF  # not killed at the timeout
    got = presses(tmp_path)
    assert got[0] == "2 firmware" and got[-1] == "2 os", got  # lost in firmware, taken once the OS runs
    assert vm.output.count("kiln: ready") == 2 and not any(alive(p) for p in pids(tmp_path))


def test_a_reset_while_powering_off_ends_the_vm(fake_vm: Callable[..., Vm], tmp_path: Path) -> None:
    vm = fake_vm("--on-button", "reset")  # the guest was already going down for a reboot
    vm.wait_ready(10)
    assert vm.shutdown(timeout=10, press_every=0.2) == Ending.REBOOTED
    assert vm.relaunches == 0 and len(pids(tmp_path)) == 1


def test_a_guest_power_off_ends_the_vm(fake_vm: Callable[..., Vm], tmp_path: Path) -> None:
    vm = fake_vm("--resets", "1", "--power-off-after", "0.5")
    assert [m.group(1) for m in vm.watch(READY_RE)] == ["1.0.1", "1.0.2"]  # stops at the power-off
    assert vm.wait_exit(10) == 0
    assert vm.ending == Ending.POWERED_OFF and vm.relaunches == 1 and not vm.running
    with pytest.raises(KilnError, match=r"the VM ended \(powered off\)"):
        vm.wait_for("never printed", 10)


def test_a_failing_qemu_is_not_started_again(fake_vm: Callable[..., Vm], tmp_path: Path) -> None:
    vm = fake_vm("--exit", "1")
    assert vm.wait_exit(10) == 1
    assert vm.ending == Ending.FAILED and len(pids(tmp_path)) == 1


def test_kill_ends_a_rebooting_vm_for_good(fake_vm: Callable[..., Vm], tmp_path: Path) -> None:
    vm = fake_vm("--resets", "1000")  # resets every ~0.1 s
    vm.wait_for(r"boot 3\n", 10)
    vm.kill()
    assert vm.ending == Ending.KILLED and not vm.running
    started = len(pids(tmp_path))
    time.sleep(0.5)
    assert len(pids(tmp_path)) == started and not any(alive(p) for p in pids(tmp_path))
