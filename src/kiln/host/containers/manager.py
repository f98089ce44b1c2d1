"""The container manager (Bottlerocket's host-ctr, plus standalone workloads).

Three entry points, all run by systemd units:

- `run KIND NAME` (kiln-container@KIND:NAME.service): pull the image, start the container in
  the foreground through `ctr run`, keep it running per its restart policy, stop it cleanly
  on SIGTERM. Its state goes to /run/kiln/containers for the API.
- `bootstrap` (kiln-bootstrap-containers.service, before kiln-ready.target): run every
  enabled bootstrap container to completion, in name order; `once` ones are set to `off`
  through the API afterwards; an essential one that fails fails the unit, so the host never
  reports ready (and a new version rolls back).
- `sync [KIND...]` (kiln-containers.service at boot, and the settings renderer's restart
  command): start, restart or stop the units so they match the settings.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from kiln.core.errors import KilnError
from kiln.core.fs import atomic_write
from kiln.core.run import run
from kiln.host.boot.console import say
from kiln.host.containers import ctr, mounts, status
from kiln.host.containers import spec as spec_mod
from kiln.host.containers.spec import KINDS, PERSISTENT_ROOT, Kind, Spec, find, from_settings, normalize_image
from kiln.host.datastore import Datastore

MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # a run this long resets the restart backoff
PULL_RETRY_FOR = 45.0  # the network may still be coming up at boot
SYSTEMCTL = "/usr/bin/systemctl"


def live_settings() -> dict[str, Any]:
    return Datastore().live()


def _transient(e: ctr.PullFailed) -> bool:
    """Worth retrying: the registry could not be reached (yet), not a refusal or a 404."""
    msg = str(e)
    return any(s in msg for s in ("dial tcp", "no route to host", "network is unreachable",
                                  "i/o timeout", "connection refused", "lookup "))


def pull(spec: Spec, settings: dict[str, Any], state_dir: Path, retry_for: float = 0.0) -> None:
    if not spec.image:
        key = "image" if spec.kind == "workload" else "source"
        raise KilnError(f"{spec.where}.{key} is not set: name the image to run "
                        "(Kiln's admin image: kiln oci build variants/containers/admin.toml, kiln oci push, "
                        "then set it here or in the image with kiln build --admin-image)")
    deadline = time.monotonic() + retry_for
    while True:
        try:
            ctr.pull(spec.runtime, spec.image, settings.get("container-registry") or {},
                     state_dir / f"hosts-{spec.id}")
            return
        except ctr.PullFailed as e:
            if not _transient(e) or time.monotonic() >= deadline:
                raise
            time.sleep(2)


ENV_DIR = Path("/run/kiln/container-env")


@dataclass(frozen=True)
class Prepared:
    """What one run of a container needs beside its image, made by `prepare` and given back
    by `release` when the run ends."""

    spec: Spec
    persistent: Path | None = None  # host and bootstrap containers: their directory
    sources: tuple[Path, ...] = ()  # workload mounts: the pinned sources, in spec order
    env_file: Path | None = None  # workload env (0600): never on ctr's world-readable command line
    staging: Path = mounts.STAGING

    def argv(self) -> list[str]:
        return ctr.run_argv(self.spec, self.persistent, self.sources, self.env_file)

    def release(self) -> None:
        mounts.release(self.spec.id, self.staging)


def prepare(spec: Spec, persistent_root: Path = PERSISTENT_ROOT, *, local: Path = mounts.LOCAL,
            staging: Path = mounts.STAGING, env_dir: Path = ENV_DIR) -> Prepared:
    """The container's persistent directory and user data; a workload's mount sources
    (resolved under /local without following links, made if missing) and its env file."""
    if spec.kind == "workload":
        sources = tuple(mounts.stage(spec.id, [m.source for m in spec.mounts], local, staging))
        env_file = None
        if spec.env:
            env_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            env_file = env_dir / spec.id
            atomic_write(env_file, "".join(f"{k}={v}\n" for k, v in spec.env).encode(), mode=0o600)
        return Prepared(spec, None, sources, env_file, staging)
    d = persistent_root / spec.name
    d.mkdir(parents=True, exist_ok=True, mode=0o750)
    try:
        data = base64.b64decode(spec.user_data, validate=False) if spec.user_data else b""
    except (binascii.Error, ValueError) as e:
        raise KilnError(f"{spec.where}.user-data is not valid base64: {e}") from None
    user_data = d / "user-data"
    if data:
        atomic_write(user_data, data, mode=0o600)
    else:
        user_data.unlink(missing_ok=True)
    return Prepared(spec, d)


def _read_pid(path: Path) -> int | None:
    """The container's init pid as the shim wrote it (runc writes the file whole)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class Runner:
    """Runs one container in the foreground and restarts it per policy until told to stop."""

    def __init__(self, spec: Spec, state_dir: Path = status.STATE_DIR,
                 sleep: Callable[[float], None] | None = None) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.sleep = sleep or self._nap
        self.stopping = False
        self.stop_asked = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        # stop() wakes the wait in once() through this pipe: a signal handler alone would
        # not end a blocking wait, and polling would cost CPU for as long as the container runs.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def stop(self, _sig: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        """Ask for a stop (SIGTERM handler, or another thread): the container gets SIGTERM
        now and SIGKILL after its stop-timeout."""
        if not self.stopping:
            self.stopping, self.stop_asked = True, time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ctr forwards it to the container's init
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _nap(self, seconds: float) -> None:
        """The wait before a restart; a stop ends it at once."""
        select.select([self._wake_r], [], [], seconds)

    def once(self, argv: Sequence[str], started: Callable[..., object] = lambda pid: None) -> int:
        """One run of the container; `started(pid=…)` once its task exists; returns its exit status."""
        ctr.remove_stale(self.spec.runtime, self.spec.id)
        init_pid = self.spec.runtime.init_pid(self.spec.id)
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL)
        if self.stopping:  # the stop came between the check and the start
            self.stop()
        exited = os.pidfd_open(self.proc.pid)
        waiting_start, killed = True, False
        try:
            while True:
                if waiting_start and init_pid.exists():
                    waiting_start = False
                    started(pid=_read_pid(init_pid))
                timeout = 0.1 if waiting_start else None  # until the task exists, then block
                if self.stopping and not killed:
                    grace = self.stop_asked + self.spec.stop_timeout - time.monotonic()
                    if grace <= 0:  # an init that ignores SIGTERM (PID 1 without a handler)
                        ctr.kill(self.spec.runtime, self.spec.id)
                        killed = True
                    else:
                        timeout = grace if timeout is None else min(timeout, grace)
                ready, _, _ = select.select([exited, self._wake_r], [], [], timeout)
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                if exited in ready:
                    return self.proc.wait()
        finally:
            os.close(exited)

    def keep_running(self, prepared: Prepared) -> int:
        spec, restarts, backoff = self.spec, 0, 1.0
        argv = prepared.argv()
        while not self.stopping:
            status.write(spec, "starting", self.state_dir, restarts=restarts)
            started = time.monotonic()
            code = self.once(argv, partial(status.write, spec, "running", self.state_dir, restarts=restarts))
            if self.stopping:
                break
            again = spec.restart == "always" or (spec.restart == "on-failure" and code != 0)
            if not again:
                status.write(spec, "exited" if code == 0 else "failed", self.state_dir, restarts=restarts,
                             exit_code=code, detail=f"exited with status {code}")
                return 0 if code == 0 else 1
            if time.monotonic() - started > STABLE_AFTER:
                backoff = 1.0  # it ran fine for a while: this is a new failure, not a crash loop
            delay, backoff = backoff, min(backoff * 2, MAX_BACKOFF)
            restarts += 1
            status.write(spec, "restarting", self.state_dir, restarts=restarts, exit_code=code,
                         detail=f"exited with status {code}; restarting in {delay:g} s")
            print(f"{spec.id}: exited with status {code}; restart {restarts} in {delay:g} s", flush=True)
            self.sleep(delay)
        status.write(spec, "stopped", self.state_dir, restarts=restarts)
        return 0


def run_container(kind: Kind, name: str, state_dir: Path = status.STATE_DIR) -> int:
    """The body of kiln-container@KIND:NAME.service."""
    spec = find(live_settings(), kind, name)
    if spec is None or not spec.enabled:
        print(f"{kind} container '{name}' is not enabled in the settings: nothing to run", flush=True)
        return 0
    runner = Runner(spec, state_dir)
    signal.signal(signal.SIGTERM, runner.stop)
    signal.signal(signal.SIGINT, runner.stop)
    status.write(spec, "pulling", state_dir)
    try:
        start_runtime(spec)
        pull(spec, live_settings(), state_dir, retry_for=PULL_RETRY_FOR)
        prepared = prepare(spec)
    except KilnError as e:
        status.write(spec, "failed", state_dir, detail=str(e))
        print(f"{spec.where}: {e}", file=sys.stderr, flush=True)
        return 1
    try:
        return runner.keep_running(prepared)
    finally:
        prepared.release()


# -- bootstrap containers --------------------------------------------------------------


LEASES = Path("/run/systemd/netif/leases")
RESOLV_CONF = Path("/etc/resolv.conf")


def write_resolv_conf(leases: Path = LEASES, dest: Path = RESOLV_CONF) -> None:
    """/etc/resolv.conf from networkd's DHCP leases (a Kiln host runs no resolver daemon).

    containerd resolves registry names with it, and `ctr run --net-host` binds it into
    every host-network container, so it must exist even when DHCP gave no DNS server.
    """
    servers: list[str] = []
    for lease in sorted(leases.glob("*")) if leases.is_dir() else []:
        for line in lease.read_text(errors="replace").splitlines():
            if line.startswith("DNS="):
                servers += [s for s in line[4:].split() if s not in servers]
    text = "# Written by Kiln's container manager from the DHCP leases.\n" + "".join(
        f"nameserver {s}\n" for s in servers[:3])
    try:
        if dest.read_text() == text:
            return
    except OSError:
        pass
    atomic_write(dest, text.encode(), mode=0o644)


def start_runtime(spec: Spec) -> None:
    """The containerd `spec` runs on (the host one starts only when something needs it)."""
    write_resolv_conf()
    proc = run([SYSTEMCTL, "start", spec.runtime.unit], check=False, timeout=120)
    if proc.returncode != 0:
        raise KilnError(f"{spec.runtime.unit} did not start: {proc.stderr.decode().strip()}")


def run_bootstrap(state_dir: Path = status.STATE_DIR,
                  set_off: Callable[[Spec], None] | None = None) -> int:
    """Every enabled bootstrap container, in name order, to completion; 1 if an essential one failed."""
    failed_essential = []
    for spec in from_settings(live_settings(), "bootstrap"):
        if not spec.enabled:
            continue
        status.write(spec, "pulling", state_dir)
        try:
            start_runtime(spec)
            pull(spec, live_settings(), state_dir, retry_for=PULL_RETRY_FOR)
            prepared = prepare(spec)
            status.write(spec, "starting", state_dir)
            try:
                code = Runner(spec, state_dir).once(prepared.argv(), partial(status.write, spec, "running", state_dir))
            finally:
                prepared.release()
            error = None if code == 0 else f"exited with status {code}"
        except KilnError as e:
            error = str(e)
        if error is None:
            status.write(spec, "exited", state_dir, exit_code=0)
            say(f"kiln: bootstrap container '{spec.name}' finished")
            if spec.mode == "once":
                (set_off or _set_off)(spec)
            continue
        status.write(spec, "failed", state_dir, detail=error)
        if spec.essential:
            failed_essential.append(spec.name)
            say(f"kiln: essential bootstrap container '{spec.name}' failed: {error}; "
                "this host will not report ready")
        else:
            say(f"kiln: bootstrap container '{spec.name}' failed: {error} (not essential: boot goes on)")
    return 1 if failed_essential else 0


def _set_off(spec: Spec) -> None:
    """`once` is done: record `mode = off` through the API, as any other settings change."""
    from kiln.host.api.client import Client

    client = Client.local()
    tx = "kiln-bootstrap"
    client.request("PATCH", f"/settings?tx={tx}", {"bootstrap-containers": {spec.name: {"mode": "off"}}})
    client.request("POST", f"/tx/commit_and_apply?tx={tx}")


# -- sync: units ↔ settings ---------------------------------------------------------------


def _systemctl(*args: str) -> str:
    return run([SYSTEMCTL, *args], check=False, timeout=60).stdout.decode()


def _loaded_units(kind: Kind) -> dict[str, str]:
    """kiln-container@KIND:* units systemd knows about → their active state."""
    out = _systemctl("list-units", "--all", "--plain", "--no-legend", f"kiln-container@{kind}:*")
    units = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            units[parts[0]] = parts[2]
    return units


def sync(kinds: Sequence[Kind], state_dir: Path = status.STATE_DIR, boot: bool = False) -> list[str]:
    """Start, restart (changed or failed) and stop container units to match the settings."""
    if not boot and not (state_dir / status.BOOTED).exists():
        # A settings change during the boot's own render: kiln-containers.service starts
        # everything once the bootstrap containers have run (Bottlerocket's order).
        return []
    tree = live_settings()
    actions = []
    replaced = boot  # an image may have fallen out of use (at boot: since the last one)
    for kind in kinds:
        if kind == "bootstrap":
            continue  # they run at boot only
        desired = {s.unit: s for s in from_settings(tree, kind) if s.enabled}
        loaded = _loaded_units(kind)
        for unit, active in loaded.items():
            if unit not in desired and active in ("active", "activating", "reloading"):
                actions.append(f"stop {unit}")
                _systemctl("--no-block", "stop", unit)
                replaced = True
        for unit, spec in desired.items():
            st = status.read(spec, state_dir)
            current = loaded.get(unit, "inactive") in ("active", "activating", "reloading")
            if current and st is not None and st.digest == spec.digest and st.state != "failed":
                continue
            actions.append(f"restart {unit}")
            _systemctl("--no-block", "restart", unit)
            replaced = replaced or unit in loaded
    if replaced:  # not for a new container alone: that stays off its start-up path
        try:
            actions += [f"remove image {ref}" for ref in collect_images(tree)]
        except KilnError as e:  # a containerd that does not answer: the next sync tries again
            actions.append(f"images not collected: {e}")
    if boot:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / status.BOOTED).touch()
    return actions


def collect_images(tree: dict[str, Any]) -> list[str]:
    """Remove the images that no declared container names (enabled or not) and no existing
    container uses, so DATA does not fill up with every version ever run."""
    specs = [s for kind in KINDS for s in from_settings(tree, kind)]
    removed = []
    for rt in dict.fromkeys((spec_mod.HOST_RUNTIME, spec_mod.WORKLOAD_RUNTIME)):
        present = ctr.images(rt)
        if not present:
            continue
        keep = {normalize_image(s.image) for s in specs if s.runtime == rt and s.image} | ctr.images_in_use(rt)
        unused = [ref for ref in present if ref not in keep]
        if unused:
            ctr.remove_images(rt, unused)
            removed += unused
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = args[0] if args else ""
    try:
        if cmd == "run" and len(args) == 2 and ":" in args[1]:
            kind, _, name = args[1].partition(":")
            if kind not in KINDS:
                raise KilnError(f"unknown container kind '{kind}' (host, bootstrap, workload)")
            return run_container(kind, name)
        if cmd == "bootstrap":
            return run_bootstrap()
        if cmd in ("sync", "boot-sync"):
            kinds = [k for k in KINDS if k in args[1:]] or list(KINDS)
            for action in sync(kinds, boot=cmd == "boot-sync"):
                print(action, flush=True)
            return 0
    except KilnError as e:
        print(f"kiln-containers: {e}", file=sys.stderr, flush=True)
        return 1
    print("usage: python3 -m kiln.host.containers run KIND:NAME | bootstrap | sync [KIND...] | boot-sync",
          file=sys.stderr)
    return 2
