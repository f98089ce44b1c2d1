"""Start one container's task detached, and get a pidfd on its init.

`ctr run -d` returns once the task runs; nothing of Kiln's stays attached to it (the shim
keeps it, and the logger the shim started keeps its output). What Kiln keeps is a pidfd on
the container's init: it polls readable when the init exits, costs no process, and unlike a
pid it cannot come to mean another process. The pid is read first and the task listed again
after `pidfd_open`: if the task still runs with that pid, the pidfd is its init's (a pid is
only reused after its process is gone).
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kiln.core.errors import KilnError
from kiln.core.run import CommandError, run
from kiln.host.containers import ctr
from kiln.host.containers.spec import Spec


@dataclass(frozen=True)
class Launched:
    pid: int
    pidfd: int | None  # None: the task ended before it could be watched (delete it for its status)


def _reason(e: CommandError) -> str:
    lines = [ln.strip() for ln in e.stderr.strip().splitlines() if ln.strip()]
    return lines[-1].removeprefix("ctr: ") if lines else f"ctr exited with status {e.returncode}"


def start(spec: Spec, argv: Sequence[str], pull: Callable[[], None]) -> Launched:
    """`ctr run -d` (pulling first only when containerd has no such image, clearing what a killed
    supervisor left under the same id), then the init's pid and a pidfd on it."""
    pulled = cleared = False
    while True:
        try:
            run(argv, timeout=ctr.CALL_TIMEOUT)
            break
        except CommandError as e:
            reason = _reason(e)
            if not pulled and reason.startswith("image ") and reason.endswith("not found"):
                pull()  # the image's first use (a present one costs no registry round trip)
                pulled = True
            elif not cleared and "already exists" in reason:
                ctr.remove_stale(spec.runtime, spec.id)
                cleared = True
            else:
                raise KilnError(f"{spec.where}: cannot start the container: {reason}") from None
    return watch(spec)


def watch(spec: Spec, pid: int | None = None) -> Launched:
    """A pidfd on the init of `spec`'s running task (its pid as the shim wrote it, or given)."""
    rt = spec.runtime
    if pid is None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(rt.init_pid(spec.id).read_text().strip())
    if pid is None:
        pid = ctr.tasks(rt).get(spec.id, (0, ""))[0]
    pidfd = None
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            pidfd = os.pidfd_open(pid)
    if pidfd is not None and ctr.tasks(rt).get(spec.id) != (pid, "RUNNING"):
        os.close(pidfd)  # it ended meanwhile: the pid may be another process's now
        pidfd = None
    return Launched(pid, pidfd)


def wait(launched: Launched, timeout: float | None = None) -> bool:
    """Block until the init exits (True), or `timeout` passes (False)."""
    if launched.pidfd is None:
        return True
    ready, _, _ = select.select([launched.pidfd], [], [], timeout)
    return bool(ready)
