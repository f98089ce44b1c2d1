"""What the API server does for update requests: report the status, start commands.

A prepare takes minutes and must not tie up a request. In the host agent a command runs
on a thread of its own (`in_thread`): no interpreter start, no second import of tuf, and
the update daemon's commands run in the same process under the same lock. The standalone
API server (tests, development) starts `python3 -m kiln.host.update.agent CMD` instead
(`spawn`), as thar-be-updates forks updog. Either way the server takes the update lock
first and hands the locked file over, so a second request is refused (423) at once and a
refused state (409) is reported before anything starts. The caller long-polls
`GET /updates/status?since=REVISION&wait=S`; a command cut off by a crash is reconciled
from the status file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kiln.host.slot import Slots
from kiln.host.update.agent import acquire
from kiln.host.update.errors import Busy
from kiln.host.update.status import Paths, Status, current, settle_interrupted

WATCH = 0.05  # how often a long poll looks at the status file (a stat call)
MAX_WAIT = 30.0  # the longest a long poll is held, well under a client's timeout

Launcher = Callable[[str, int], None]  # (command, locked fd): must close the fd when done


def spawn(command: str, lock_fd: int) -> None:
    """Start the agent detached from the server, holding the inherited lock."""
    try:
        subprocess.Popen(
            [sys.executable, "-I", "-m", "kiln.host.update.agent", command, "--lock-fd", str(lock_fd)],
            pass_fds=(lock_fd,),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(lock_fd)  # the child holds its own copy of the locked file


def in_thread(command: str, lock_fd: int) -> None:
    """Run the command on a thread of this process, holding the lock until it ends."""

    def work() -> None:
        from kiln.core.errors import KilnError
        from kiln.host.update.agent import from_host

        try:
            st = from_host().run(command)
            print(f"kiln update {command}: {st.update_state}: {st.reason or 'ok'}", flush=True)
        except KilnError as e:
            print(f"kiln update {command}: {e}", file=sys.stderr, flush=True)
        except Exception:  # a bug here must not take the host agent down
            print(f"kiln update {command}: internal error", file=sys.stderr, flush=True)
            traceback.print_exc()
        finally:
            os.close(lock_fd)

    threading.Thread(target=work, name=f"update-{command}", daemon=True).start()


class UpdateControl:
    def __init__(
        self,
        paths: Paths | None = None,
        slots: Callable[[], Slots] = Slots.open,
        version: Callable[[], str] | None = None,
        launch: Launcher = spawn,
    ) -> None:
        self.paths = paths or Paths()
        self.slots = slots
        self.version = version or _running_version
        self.launch = launch
        self.stopping = threading.Event()  # set when the server stops: held long polls answer now
        self._settle()

    def _settle(self) -> None:
        """Write an interrupted command's end into the status file itself, not only into
        what is reported: the file's revision then moves, and a client long-polling on the
        revision it saw before the agent died is answered at once by the new agent."""
        if not self.paths.status.exists():
            return
        try:
            fd = acquire(self.paths)
        except Busy:
            return  # a command runs: it writes the status itself
        try:
            st = Status.load(self.paths.status)
            if settle_interrupted(st):
                st.save(self.paths.status)
        finally:
            os.close(fd)

    def status(self, since: str | None = None, wait: float = 0.0) -> dict[str, Any]:
        """The status; its `revision` names the status file's version. A long poll when
        `since` is the revision a client last saw: answered once the file changed (a
        command began or ended, or progress moved), or after `wait` seconds. A client
        waiting on a prepare then asks about once per change instead of twice a second,
        and learns of the end at once."""
        if since is not None:
            deadline = time.monotonic() + wait
            while revision(self.paths.status) == since and time.monotonic() < deadline:
                if self.stopping.wait(WATCH):
                    break
        rev = revision(self.paths.status)  # before reading: a change after it is seen next time
        doc = asdict(current(self.paths, self.slots().state().to_json(), self.version()))
        doc["daemon"] = daemon_status(self.paths)
        doc["revision"] = rev
        return doc

    def retry(self, version: str) -> int:
        """Forget this host's failures of `version` (they stay in the log, cleared): the
        next check may choose it again. Returns how many failures were cleared."""
        from kiln.host.update import failures

        fd = acquire(self.paths)
        try:
            return failures.clear(self.paths.failures, version)
        finally:
            os.close(fd)

    def start(self, command: str) -> None:
        """Raises Busy (another command runs) or NotAllowed (not in this state)."""
        fd = acquire(self.paths)
        try:
            current(self.paths, self.slots().state().to_json(), self.version()).require(command)
        except BaseException:
            os.close(fd)
            raise
        self.launch(command, fd)

    def rollback(self) -> dict[str, Any]:
        """Make the other slot boot next (signpost rollback-to-inactive)."""
        fd = acquire(self.paths)
        try:
            state = self.slots().apply("rollback-to-inactive")
        finally:
            os.close(fd)
        return state.to_json()


def revision(path: Path) -> str:
    """The status file's version: it is replaced by a rename on every save, so its inode
    and modification time change together ("0" before the first command)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "0"
    return f"{st.st_ino:x}.{st.st_mtime_ns:x}"


def daemon_status(paths: Paths) -> dict[str, Any] | None:
    """What the update daemon last recorded (None: it never ran on this host)."""
    import json

    try:
        doc = json.loads((paths.state / "daemon.json").read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _running_version() -> str:
    from kiln.host.osinfo import os_release

    return os_release().get("version_id", "0.0.0")
