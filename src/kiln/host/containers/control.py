"""The API's view of containers: what is declared, what runs, what `kiln exec` may enter,
and what they printed (`kiln logs`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.core.run import run
from kiln.host.containers import ctr, status
from kiln.host.containers.spec import KINDS, Kind, Spec, find, from_settings

BOOTSTRAP_UNIT = "kiln-bootstrap-containers.service"  # runs every bootstrap container in turn
SUPERVISOR_UNIT = "kiln-agent.service"  # its supervisor keeps host containers and workloads running
CURSOR = re.compile(r"^[a-z]=[0-9a-f]{1,64}(;[a-z]=[0-9a-f]{1,64}){0,15}$")  # journal cursors


class NoSuchContainer(LookupError):
    pass


class NotRunning(RuntimeError):
    pass


def overview(tree: dict[str, Any], state_dir: Path = status.STATE_DIR) -> list[dict[str, Any]]:
    """Every declared container with its last known state (the manager's status files)."""
    out = []
    for kind in KINDS:
        for spec in from_settings(tree, kind):
            st = status.read(spec, state_dir)
            entry: dict[str, Any] = {"kind": kind, "name": spec.name, "image": spec.image,
                                     "enabled": spec.enabled}
            if kind == "bootstrap":
                entry |= {"mode": spec.mode, "essential": spec.essential}
            if st is None:
                entry["state"] = "stopped" if spec.enabled else "disabled"
            else:
                entry |= {"state": st.state if spec.enabled or st.state == "exited" else "disabled",
                          "detail": st.detail, "restarts": st.restarts, "exit-code": st.exit_code,
                          "since": round(st.since, 3), "current": st.digest == spec.digest}
                if st.state == "running" and st.pid is not None:
                    entry["pid"] = st.pid
            out.append(entry)
    return out


def target(tree: dict[str, Any], name: str, kind: Kind | None = None) -> Spec:
    """The running container `kiln exec NAME` means: a host container first, then a workload."""
    specs = _declared(tree, name, (kind,) if kind else ("host", "workload"))
    if not specs:
        raise NoSuchContainer(f"no container '{name}' in settings.host-containers or settings.containers")
    for spec in specs:
        if ctr.tasks(spec.runtime).get(spec.id, (0, ""))[1] == "RUNNING":
            return spec
    raise NotRunning(f"container '{name}' ({specs[0].where}) is not running")


def _declared(tree: dict[str, Any], name: str, kinds: tuple[Kind, ...]) -> list[Spec]:
    """The containers called `name` in the settings, in the order of `kinds`."""
    return [s for k in kinds if (s := find(tree, k, name)) is not None]


class LogsUnavailable(RuntimeError):
    pass


class BadCursor(ValueError):
    pass


def log_target(tree: dict[str, Any], name: str, kind: Kind | None = None) -> Spec:
    """The declared container `kiln logs NAME` means: host, then bootstrap, then workload."""
    specs = _declared(tree, name, (kind,) if kind else KINDS)
    if specs:
        return specs[0]
    raise NoSuchContainer(f"no container '{name}' in settings.host-containers, "
                          "settings.bootstrap-containers or settings.containers")


def journal_argv(spec: Spec, lines: int, cursor: str | None = None) -> list[str]:
    """The one `journalctl` command line for a container's entries: its output (written by the
    shim's logger) and the supervisor's lines about it share its id as SYSLOG_IDENTIFIER."""
    argv = ["journalctl", "--no-pager", "--quiet", "--output=json", "--output-fields=MESSAGE",
            f"--identifier={spec.id}", f"--lines={lines}"]
    if cursor:
        argv.append(f"--after-cursor={cursor}")
    return argv


def logs(spec: Spec, lines: int, cursor: str | None = None) -> dict[str, Any]:
    """The last `lines` journal entries of the container (after `cursor`, if given).

    `unit` names the service that runs it (bootstrap containers: the bootstrap unit; the
    others: the supervisor). The returned cursor is where the next call (`kiln logs -f`)
    carries on.
    """
    unit = BOOTSTRAP_UNIT if spec.kind == "bootstrap" else SUPERVISOR_UNIT
    try:
        proc = run(journal_argv(spec, lines, cursor), check=False, timeout=20)
    except KilnError as e:  # not installed, or timed out
        raise LogsUnavailable(str(e)) from None
    if proc.returncode != 0:
        why = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
        if cursor and why and "cursor" in why[-1]:
            raise BadCursor(f"{why[-1]} (a cursor from an earlier answer, or none)")
        raise LogsUnavailable(f"journalctl failed for {spec.id}: {why[-1] if why else f'exit {proc.returncode}'}")
    entries = []
    for line in proc.stdout.splitlines():
        entry = json.loads(line)
        message = entry.get("MESSAGE")
        if isinstance(message, list):  # not UTF-8: the journal hands over the bytes
            message = bytes(message).decode(errors="replace")
        entries.append({"time": int(entry["__REALTIME_TIMESTAMP"]) / 1e6, "message": message or ""})
        cursor = entry["__CURSOR"]
    return {"kind": spec.kind, "name": spec.name, "unit": unit, "entries": entries, "cursor": cursor}
