"""The subprocess gateway: errors that name the command, timeouts that kill everything started."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from kiln.core.errors import KilnError
from kiln.core.run import CommandError, run, spawn


def test_failure_names_the_command_and_its_stderr() -> None:
    with pytest.raises(CommandError, match=r"exit 3.*sh -c.*\n.*boom"):
        run(["/bin/sh", "-c", "echo boom >&2; exit 3"])
    assert run(["/bin/sh", "-c", "exit 3"], check=False).returncode == 3


def test_missing_tool_is_a_clear_error() -> None:
    with pytest.raises(KilnError, match="required tool 'no-such-tool-kiln' is not installed"):
        run(["no-such-tool-kiln"])


def test_input_and_output() -> None:
    assert run(["/bin/cat"], input=b"hello").stdout == b"hello"


def test_tty_input_is_read_from_a_terminal_whole() -> None:
    """What ctr's password prompt needs: stdin is a terminal, and a line longer than the
    terminal's 4095-byte canonical limit arrives whole; nothing is echoed to stdout."""
    secret = "s" * 4096
    code = "import os, sys; print(os.isatty(0), len(sys.stdin.readline().rstrip()))"
    got = run(["python3", "-c", code], tty_input=(secret + "\n").encode())
    assert got.stdout == b"True 4096\n"


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    start = time.monotonic()
    with pytest.raises(CommandError, match="timed out after 1 s"):
        run(["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=1)
    assert time.monotonic() - start < 10
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # A killed child of ours may linger as a zombie until init reaps it.
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the grandchild {pid} survived the timeout")


def test_timeout_returns_even_when_an_escaped_process_holds_the_output(tmp_path: Path) -> None:
    """A daemon that left the session (setsid) keeps the pipes open past the group's SIGKILL:
    run() still returns, naming the timeout; the daemon is this test's to end."""
    pidfile = tmp_path / "daemon.pid"
    start = time.monotonic()
    try:
        with pytest.raises(CommandError, match="timed out after 1 s"):
            run(["/bin/sh", "-c", f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 60' & sleep 60"], timeout=1)
        assert time.monotonic() - start < 20
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


# --- spawn: long-lived children ----------------------------------------------------------------


def _gone(pid: int, within: float = 5) -> bool:
    """The process ended (or is a zombie waiting for init: nothing runs any more)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_spawn_stops_the_whole_group_at_the_end_of_the_block(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    with spawn(["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], grace=5) as child:
        deadline = time.monotonic() + 5
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert time.monotonic() < deadline, "the child did not start its own child"
            time.sleep(0.05)
        assert child.poll() is None and os.getpgid(child.pid) == child.pid  # its own group
    assert child.poll() is not None
    assert _gone(int(pidfile.read_text()))


def test_spawn_kills_what_ignores_sigterm_after_the_grace_period(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    start = time.monotonic()
    with spawn(["/bin/sh", "-c", f"trap '' TERM; touch {ready}; while :; do sleep 0.1; done"], grace=0.5) as child:
        while not ready.exists():
            assert time.monotonic() - start < 5
            time.sleep(0.02)
    assert child.popen.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 5


def test_spawn_gives_the_exit_status_and_a_clear_error_for_a_missing_tool() -> None:
    with spawn(["/bin/sh", "-c", "exit 4"]) as child:
        assert child.wait(5) == 4
    assert child.stop() == 4  # stopping what already ended: its status, no error
    with pytest.raises(KilnError, match="required tool 'no-such-tool-kiln' is not installed"), \
            spawn(["no-such-tool-kiln"]):
        pass
