"""`kiln run --headless --keep-running` as the README's update walk-through uses it: in the
background, the guest rebooted from the workstation over the mutual-TLS API. Each guest
reboot is a new QEMU (cold_reboot); `kiln run` must follow them all, and end only at
SIGTERM (or Ctrl-C, or a guest power-off), with the guest powered off and no QEMU left."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln import pki
from kiln.vm.qemu import READY_RE, free_port
from tests.conftest import Images, raw_copy
from tests.helpers import install_to_inactive

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


def qemus_under(tmp: Path) -> list[int]:
    """Pids of the QEMUs whose command line names `tmp` (the TMPDIR this test gave `kiln
    run`: its overlay, firmware variables and QMP socket live there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"qemu-system-x86_64") and any(str(tmp).encode() in a for a in argv):
                found.append(int(entry.name))
    return found


@pytest.fixture
def kiln_run(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """`kiln run` processes started by the test; on the way out each is SIGKILLed and so
    is every QEMU it left (found by our TMPDIR in its command line, ended by pid)."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in qemus_under(tmp_path / "tmp"):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # QEMU leads its own process group (start_new_session)


def wait_ready_lines(log: Path, count: int, proc: subprocess.Popen[str], timeout: float) -> list[tuple[str, str]]:
    """(version, slot) of every ready line in the serial log, once there are `count`."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = [(m.group(1), m.group(3)) for m in READY_RE.finditer(text)]
        if len(found) >= count:
            return found
        assert proc.poll() is None, f"kiln run exited ({proc.returncode}), {len(found)} ready:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"{len(found)} ready line(s) after {timeout:.0f} s:\n{text[-3000:]}"
        time.sleep(0.5)


def test_run_keep_running_follows_guest_reboots_until_sigterm(
    images: Images, tmp_path: Path, kiln_run: list[subprocess.Popen[str]]
) -> None:
    # A disk as `kiln update apply` leaves it: 2.0.0 in slot B, to boot next; 1.0.0 in A.
    disk = raw_copy(images.get("1.0.0").disk, tmp_path / "disk.img")
    install_to_inactive(disk, images.get("2.0.0").manifest.parent)
    fleet = tmp_path / "pki"
    pki.init(fleet)
    user_data = tmp_path / "user-data.toml"
    user_data.write_text(pki.user_data(fleet))
    port, tmp, log = free_port(), tmp_path / "tmp", tmp_path / "serial.log"
    tmp.mkdir()
    kiln = [sys.executable, "-m", "kiln.cli.main"]
    remote = [*kiln, "--endpoint", f"127.0.0.1:{port}", "--pki", str(fleet)]

    def over_mtls(*command: str) -> str:
        """The remote API is not ordered before kiln-ready.target: it may listen a few
        seconds after the ready line, so "cannot reach" is retried for a while."""
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run([*remote, *command], capture_output=True, text=True, timeout=120)
            if "cannot reach" not in out.stderr or time.monotonic() > deadline:
                assert out.returncode == 0, out.stderr
                return out.stdout
            time.sleep(1)

    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*kiln, "run", str(disk), "--headless", "--keep-running", "--accel", "tcg", "--cpus", "2",
         "--user-data", str(user_data), "--forward", f"{port}:50000", "--serial-log", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)},
    )
    kiln_run.append(proc)
    timings = []
    # Boot, then two guest reboots (rollback to A, rollback to B): each time kiln run is still
    # there, the new boot is ready on the slot expected, and the API answers through the
    # relaunched QEMU's port forward.
    for n, (version, slot) in enumerate([("2.0.0", "B"), ("1.0.0", "A"), ("2.0.0", "B")], start=1):
        assert wait_ready_lines(log, n, proc, 300)[n - 1] == (version, slot)
        timings.append(round(time.monotonic() - t0))
        assert f"running: {version} (slot {slot})" in over_mtls("update", "status")
        if n < 3:
            assert "rebooting" in over_mtls("rollback")
        assert len(qemus_under(tmp)) == 1
    # The guest's own reboots were followed, not mistaken for the end.
    assert proc.poll() is None

    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=150)
    timings.append(round(time.monotonic() - t0))
    print(f"ready at {timings[:3]} s, ended at {timings[3]} s after start")
    assert proc.returncode == 0, err
    assert "kiln: guest powered off cleanly" in err, err
    text = log.read_text(errors="replace")
    assert text.rfind("reboot: Power down") > text.rfind("kiln: ready"), text[-3000:]  # powered off, last
    assert [m.group(3) for m in READY_RE.finditer(out)] == ["B", "A", "B"], out
    assert qemus_under(tmp) == [] and list(tmp.iterdir()) == []  # no QEMU left, its workdir removed
