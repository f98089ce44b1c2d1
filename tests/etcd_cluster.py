"""Real etcd members on loopback ports (Debian's etcd-server), started and stopped by tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kiln.core.run import which
from kiln.vm.qemu import free_port


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    base: Path
    members: list[Member] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, m: Member, *, new: bool) -> None:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        argv = [
            which("etcd"), "--name", m.name, "--data-dir", str(m.data),
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", "new" if new else "existing",
            "--initial-cluster-token", f"kiln-test-{self.base.name}",
            # Loopback under a busy TCG guest: a little slack before elections.
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--logger", "zap", "--log-outputs", str(m.log),
        ]
        m.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)

    def kill(self, m: Member) -> None:
        """SIGKILL, as a crash; the data directory stays (restart() brings it back)."""
        if m.proc and m.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout=10)
        m.proc = None

    def restart(self, m: Member) -> None:
        self.start(m, new=False)
        wait_healthy([m], timeout=60)

    def leader(self) -> Member:
        import json

        for m in self.members:
            if m.proc is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                req = urllib.request.Request(f"{m.client_url}/v3/maintenance/status", data=b"{}", method="POST")
                with urllib.request.urlopen(req, timeout=2) as r:
                    st = json.loads(r.read())
                if st.get("leader") == st.get("header", {}).get("member_id"):
                    return m
        raise RuntimeError("no etcd member says it leads")


def wait_healthy(members: list[Member], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for m in members:
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{m.client_url}/health", timeout=2) as r:
                if b'"true"' in r.read():
                    break
            if m.proc is not None and m.proc.poll() is not None:
                raise RuntimeError(f"etcd {m.name} exited: see {m.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd {m.name} not healthy after {timeout:.0f} s: see {m.log}")
            time.sleep(0.1)


@contextlib.contextmanager
def etcd_cluster(base: Path, size: int = 3) -> Iterator[EtcdCluster]:
    """A fresh `size`-member cluster on 127.0.0.1; every member is killed at the end."""
    cluster = EtcdCluster(base)
    for i in range(size):
        d = base / f"m{i}"
        d.mkdir(parents=True, exist_ok=True)
        cluster.members.append(Member(f"m{i}", free_port(), free_port(), d / "data", d / "etcd.log"))
    try:
        for m in cluster.members:
            cluster.start(m, new=True)
        wait_healthy(cluster.members)
        yield cluster
    finally:
        for m in cluster.members:
            cluster.kill(m)
