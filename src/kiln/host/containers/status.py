"""What each container is doing, as the supervisor last wrote it (read by the API, and by a
restarted supervisor for restart counts and the digest of what runs).

One small JSON file per container under /run/kiln/containers, replaced by rename: the API
reads them without talking to containerd, and a manager killed mid-write leaves the
previous state, never half of one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.core.fs import atomic_write
from kiln.host.containers.spec import Spec

STATE_DIR = Path("/run/kiln/containers")


@dataclass
class State:
    kind: str
    name: str
    image: str
    state: str  # pulling, starting, running, restarting, exited, failed, stopped
    detail: str = ""
    digest: str = ""
    restarts: int = 0
    exit_code: int | None = None
    since: float = 0.0
    pid: int | None = None  # the container's init, as the host sees it (while running)


def path(spec: Spec, root: Path = STATE_DIR) -> Path:
    return root / f"{spec.id}.json"


def write(spec: Spec, state: str, root: Path = STATE_DIR, **kw: Any) -> State:
    st = State(spec.kind, spec.name, spec.image, state, digest=spec.digest, since=time.time(), **kw)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(path(spec, root), json.dumps(asdict(st), sort_keys=True).encode() + b"\n", mode=0o644)
    return st


def read(spec: Spec, root: Path = STATE_DIR) -> State | None:
    try:
        data = json.loads(path(spec, root).read_bytes())
        return State(**data)
    except (OSError, ValueError, TypeError):
        return None
