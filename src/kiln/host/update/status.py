"""The update state machine (thar-be-updates): Idle -> Available -> Staged -> Ready.

    refresh      any state      Idle <-> Available (Staged/Ready keep their state)
    prepare      Available, Staged   -> Staged   (the inactive slot written and valid)
    activate     Staged              -> Ready    (the inactive slot boots next)
    deactivate   Ready               -> Staged

The status lives in PRIVATE (/var/lib/kiln/update/status.json) and is reconciled with the
slots every time it is read: a power cut between a slot write and the status write, or
a reboot into the new version, must never leave the API claiming something false.
Stdlib only: the API server imports this on every status request.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.core.fs import atomic_write
from kiln.host.update import failures
from kiln.host.update.errors import NotAllowed

IDLE, AVAILABLE, STAGED, READY = "Idle", "Available", "Staged", "Ready"
STATES = (IDLE, AVAILABLE, STAGED, READY)
ALLOWED = {
    "refresh": STATES,
    "prepare": (AVAILABLE, STAGED),
    "activate": (STAGED,),
    "deactivate": (READY,),
}


@dataclass(frozen=True)
class Paths:
    """Where the agent keeps things; tests point `state` and `run` at temporary dirs."""

    state: Path = Path("/var/lib/kiln/update")
    run: Path = Path("/run/kiln")
    root: Path = Path("/usr/share/kiln/update/root.json")

    @property
    def status(self) -> Path:
        return self.state / "status.json"

    @property
    def metadata(self) -> Path:
        return self.state / "metadata"

    @property
    def migrations(self) -> Path:
        return self.state / "migrations"

    @property
    def slot_versions(self) -> Path:
        return self.state / "slots.json"

    @property
    def failures(self) -> Path:
        return self.state / "failures.json"

    @property
    def lock(self) -> Path:
        return self.run / "update.lock"


def read_versions(paths: Paths) -> dict[str, str]:
    try:
        doc = json.loads(paths.slot_versions.read_bytes())
        return {k: v for k, v in doc.items() if k in ("A", "B") and isinstance(v, str)}
    except (FileNotFoundError, ValueError):
        return {}


def write_versions(paths: Paths, versions: dict[str, str | None]) -> None:
    current: dict[str, str | None] = {**read_versions(paths), **versions}
    paths.state.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in current.items() if v}
    atomic_write(paths.slot_versions, json.dumps(clean, sort_keys=True).encode() + b"\n")


@dataclass
class Status:
    update_state: str = IDLE
    available_updates: list[str] = field(default_factory=list)
    chosen_update: dict[str, str] | None = None
    staged_version: str | None = None
    reason: str = ""  # why nothing is chosen or applied, in words
    ready_at: str | None = None  # when this host's wave opens, if that is the reason
    most_recent_command: dict[str, Any] | None = None
    active_partition: dict[str, Any] = field(default_factory=dict)
    staging_partition: dict[str, Any] = field(default_factory=dict)
    last_failure: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None  # while prepare writes: {image, done, total}

    @classmethod
    def load(cls, path: Path) -> Status:
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        except ValueError:
            return cls(reason=f"{path} was unreadable and has been reset")
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        st = cls(**known)
        return st if st.update_state in STATES else cls()

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(asdict(self), indent=1, sort_keys=True).encode() + b"\n")

    def require(self, command: str) -> None:
        if self.update_state not in ALLOWED[command]:
            allowed = " or ".join(ALLOWED[command])
            raise NotAllowed(f"{command} is not allowed in state {self.update_state} (needs {allowed})")

    def begin(self, command: str) -> None:
        """Record a command as running; `id` increases with each command, so a client that
        started one can tell its result from an older one's."""
        self.most_recent_command = {
            "id": self.command_id() + 1, "cmd_type": command, "cmd_status": "Running", "pid": os.getpid(),
            "timestamp": _now(),
        }

    def command_id(self) -> int:
        return int((self.most_recent_command or {}).get("id", 0))

    def finish(self, error: BaseException | None) -> None:
        cmd = dict(self.most_recent_command or {})
        cmd.update(
            cmd_status="Failed" if error else "Success",
            exit_status=1 if error else 0,
            stderr=str(error) if error else "",
            error=type(error).__name__ if error else None,
            finished=_now(),
        )
        cmd.pop("pid", None)
        self.most_recent_command = cmd
        self.progress = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def settle_interrupted(st: Status) -> bool:
    """A command recorded as running whose process is gone was cut off (the agent was
    killed, the host lost power): record it as failed. True if it was."""
    cmd = st.most_recent_command
    if not (cmd and cmd.get("cmd_status") == "Running" and not _alive(int(cmd.get("pid", 0)))):
        return False
    cmd = {**cmd, "cmd_status": "Failed", "exit_status": None, "stderr": "interrupted (the agent stopped)"}
    cmd.pop("pid", None)
    st.most_recent_command = cmd
    return True


def reconcile(
    st: Status, slots: dict[str, Any], running: str, versions: dict[str, str], failed: frozenset[str] = frozenset()
) -> Status:
    """Make `st` agree with the slots (`SlotState.to_json()`) and the running version.

    `versions` maps a slot to the version last written there (slots.json); `failed` holds
    the versions this host rolled back from."""
    active = slots["active"]
    inactive = "B" if active == "A" else "A"
    flags = slots[inactive]
    settle_interrupted(st)
    valid = flags["tries_left"] > 0 or flags["successful"]
    if st.update_state in (STAGED, READY):
        if not valid or versions.get(inactive) != st.staged_version:
            st.update_state = AVAILABLE if st.chosen_update else IDLE
            st.staged_version = None
        elif flags["priority"] > slots[active]["priority"]:
            st.update_state = READY
        else:
            st.update_state = STAGED
    if st.chosen_update and st.chosen_update.get("version") == running:
        # Booted into what was chosen: the update is done.
        st.update_state, st.chosen_update, st.staged_version = IDLE, None, None
    elif st.chosen_update and st.chosen_update.get("version") in failed and st.update_state == AVAILABLE:
        # Tried and rolled back from: not chosen again (see last_failure).
        st.update_state, st.chosen_update = IDLE, None
    st.active_partition = {"slot": active, "version": running, "next_to_boot": slots["next"] == active}
    st.staging_partition = {
        "slot": inactive,
        "version": versions.get(inactive) if valid else None,
        "next_to_boot": slots["next"] == inactive,
    }
    return st


def current(paths: Paths, slots: dict[str, Any], running: str,
            max_attempts: int = failures.DEFAULT_MAX_BOOT_ATTEMPTS) -> Status:
    """The status file reconciled with the slots, the slot versions and the failures log:
    what the agent acts on and what the API reports. A version whose boot merely did not
    finish, and may be retried now, is not treated as failed (a power cut is not a bad
    release): only final verdicts and retries not yet due are."""
    from datetime import UTC, datetime

    log = failures.read(paths.failures)
    now = datetime.now(UTC)
    failed = frozenset(v.version for v in failures.verdicts(log, max_attempts).values()
                       if v.final or (v.retry_at is not None and v.retry_at > now))
    st = reconcile(Status.load(paths.status), slots, running, read_versions(paths), failed)
    st.last_failure = log[-1] if log else None
    return st
