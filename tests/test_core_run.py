"""The subprocess gateway: errors that name the command, timeouts that kill everything started."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kiln.core.errors import KilnError
from kiln.core.run import CommandError, run


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
