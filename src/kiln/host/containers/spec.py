"""What should run: the three kinds of containers, read from the live settings.

Host containers (admin, control) and bootstrap containers run on the host's own containerd
(Bottlerocket's host-containerd); workloads run on the workload containerd, so a workload
that fills or wedges its containerd never takes the admin path down with it. Everything
here is pure: settings tree in, frozen specs out, so the manager and tests share it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["host", "bootstrap", "workload"]
KINDS: tuple[Kind, ...] = ("host", "bootstrap", "workload")
SETTINGS_KEY: dict[Kind, str] = {"host": "host-containers", "bootstrap": "bootstrap-containers",
                                  "workload": "containers"}


@dataclass(frozen=True)
class Runtime:
    """One containerd instance: its socket, its state directory and the namespace Kiln's
    containers live in."""

    address: str
    namespace: str
    unit: str
    state: str

    def init_pid(self, cid: str) -> Path:
        """Written by the runc shim once a container's task exists (its init's pid): reading it
        saves a `ctr tasks ls` on every start."""
        return Path(self.state) / "io.containerd.runtime.v2.task" / self.namespace / cid / "init.pid"


HOST_RUNTIME = Runtime("/run/host-containerd/containerd.sock", "kiln", "kiln-host-containerd.service",
                       "/run/host-containerd")
WORKLOAD_RUNTIME = Runtime("/run/containerd/containerd.sock", "kiln", "containerd.service", "/run/containerd")

# Per-container persistent storage on DATA (survives reboots and updates).
PERSISTENT_ROOT = Path("/local/host-containers")
IN_CONTAINER_DIR = "/.kiln/host-containers"
ROOTFS_MOUNT = "/.kiln/rootfs"
HOST_USR_MOUNT = "/.kiln/usr"
# `kiln` inside host containers: the host's client from the host's /usr (no Python needed).
KILN_LAUNCHER = Path(__file__).with_name("kiln-in-container")
API_SOCKET = "/run/kiln/api.sock"


@dataclass(frozen=True)
class Mount:
    source: str
    destination: str
    read_only: bool = False


@dataclass(frozen=True)
class Spec:
    """One container as the manager runs it. `digest` changes whenever a restart is due."""

    kind: Kind
    name: str
    image: str
    enabled: bool = True
    superpowered: bool = False
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    restart: Literal["always", "on-failure", "never"] = "always"
    network: Literal["host", "none"] = "host"
    mounts: tuple[Mount, ...] = ()
    user_data: str = ""
    mode: Literal["off", "once", "always"] = "off"
    essential: bool = False
    memory_limit: int = 0  # bytes; 0: none (workloads only)
    cpus: float = 0.0  # CFS quota in CPUs; 0: none (workloads only)
    stop_timeout: float = 10.0  # seconds from SIGTERM to SIGKILL when stopped (a drain, a reboot)

    @property
    def runtime(self) -> Runtime:
        return WORKLOAD_RUNTIME if self.kind == "workload" else HOST_RUNTIME

    @property
    def id(self) -> str:
        """The containerd container id: kinds share a containerd, so the kind is part of it."""
        return f"{self.kind}-{self.name}"

    @property
    def digest(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k not in ("mode", "stop_timeout")}  # no restart for these
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def where(self) -> str:
        return f"settings.{SETTINGS_KEY[self.kind]}.{self.name}"


def normalize_image(ref: str) -> str:
    """`busybox` → `docker.io/library/busybox:latest`: containerd wants full references."""
    name, at, digest = ref.partition("@")
    first, slash, _ = name.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        name = f"docker.io/{'library/' if not slash else ''}{name}"
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and not at:
        name += ":latest"
    return name + (at + digest if at else "")


def memory_bytes(limit: str) -> int:
    """`512Mi` → bytes (the model allows only Mi and Gi); "" → 0, no limit."""
    if not limit:
        return 0
    return int(limit[:-2]) << (20 if limit.endswith("Mi") else 30)


def registry_of(ref: str) -> str:
    return normalize_image(ref).split("/", 1)[0]


def from_settings(tree: dict[str, Any], kind: Kind) -> list[Spec]:
    """The containers of one kind declared in a live settings tree, by name."""
    out = []
    for name, raw in sorted((tree.get(SETTINGS_KEY[kind]) or {}).items()):
        out.append(_spec(kind, name, raw))
    return out


def find(tree: dict[str, Any], kind: Kind, name: str) -> Spec | None:
    raw = (tree.get(SETTINGS_KEY[kind]) or {}).get(name)
    return None if raw is None else _spec(kind, name, raw)


def _spec(kind: Kind, name: str, raw: dict[str, Any]) -> Spec:
    if kind == "workload":
        return Spec(
            kind, name, raw.get("image", ""),
            enabled=raw.get("enabled", True),
            command=tuple(raw.get("command") or ()),
            env=tuple(sorted((raw.get("env") or {}).items())),
            restart=raw.get("restart", "always"),
            network=raw.get("network", "host"),
            mounts=tuple(Mount(m.get("source", ""), m.get("destination", m.get("source", "")),
                               m.get("read-only", False)) for m in raw.get("mounts") or ()),
            memory_limit=memory_bytes(raw.get("memory-limit", "")),
            cpus=float(raw.get("cpus", 0.0)),
            stop_timeout=float(raw.get("stop-timeout", 10)),
        )
    if kind == "host":
        return Spec(kind, name, raw.get("source", ""), enabled=raw.get("enabled", False),
                    superpowered=raw.get("superpowered", False), user_data=raw.get("user-data", ""))
    mode = raw.get("mode", "off")
    # Bootstrap containers prepare the host (disks, kernel settings): they get its root.
    return Spec(kind, name, raw.get("source", ""), enabled=mode != "off", superpowered=True,
                restart="never", user_data=raw.get("user-data", ""), mode=mode,
                essential=raw.get("essential", False))
