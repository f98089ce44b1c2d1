"""The API's view of containers: what is declared, what runs, and what `kiln exec` may enter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.host.containers import ctr, status
from kiln.host.containers.spec import KINDS, Kind, Spec, find, from_settings


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
            out.append(entry)
    return out


def target(tree: dict[str, Any], name: str, kind: Kind | None = None) -> Spec:
    """The running container `kiln exec NAME` means: a host container first, then a workload."""
    kinds: tuple[Kind, ...] = (kind,) if kind else ("host", "workload")
    specs = [s for k in kinds if (s := find(tree, k, name)) is not None]
    if not specs:
        raise NoSuchContainer(f"no container '{name}' in settings.host-containers or settings.containers")
    for spec in specs:
        if ctr.tasks(spec.runtime).get(spec.id, (0, ""))[1] == "RUNNING":
            return spec
    raise NotRunning(f"container '{name}' ({specs[0].where}) is not running")
