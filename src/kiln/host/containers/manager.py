"""The container manager (Bottlerocket's host-ctr, plus standalone workloads): the parts
every start shares, and the bootstrap containers.

- `pull`, `prepare`, `start_runtime`, `collect_images`: used by the supervisor
  (`supervise.py`, in the host agent), which keeps host containers and workloads
  running as the settings say.
- `run_bootstrap` (kiln-bootstrap-containers.service, before kiln-ready.target): run every
  enabled bootstrap container to completion, in name order; `once` ones are set to `off`
  through the API afterwards; an essential one that fails fails the unit, so the host never
  reports ready (and a new version rolls back).
"""

from __future__ import annotations

import base64
import binascii
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.core.fs import atomic_write
from kiln.core.run import run
from kiln.host.boot.console import say
from kiln.host.containers import ctr, launch, mounts, status
from kiln.host.containers import spec as spec_mod
from kiln.host.containers.spec import KINDS, PERSISTENT_ROOT, Spec, from_settings, normalize_image
from kiln.host.datastore import Datastore

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

    def argv(self, log_uri: str = ctr.LOG_URI) -> list[str]:
        return ctr.run_argv(self.spec, self.persistent, self.sources, self.env_file, log_uri)

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


def _run_to_completion(spec: Spec, prepared: Prepared, state_dir: Path, log_uri: str) -> int:
    """Start the task detached (its output goes to the journal under its id, like every
    container's), wait for its init through a pidfd, delete it; its exit status."""
    launched = launch.start(spec, prepared.argv(log_uri),
                            partial(pull, spec, live_settings(), state_dir, PULL_RETRY_FOR))
    status.write(spec, "running", state_dir, pid=launched.pid)
    try:
        launch.wait(launched)
    finally:
        if launched.pidfd is not None:
            os.close(launched.pidfd)
    code = ctr.delete(spec.runtime, spec.id)
    return 0 if code is None else code


def run_bootstrap(state_dir: Path = status.STATE_DIR, set_off: Callable[[Spec], None] | None = None,
                  log_uri: str = ctr.LOG_URI) -> int:
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
                code = _run_to_completion(spec, prepared, state_dir, log_uri)
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


# -- images ------------------------------------------------------------------------------


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
    if args == ["bootstrap"]:
        try:
            return run_bootstrap()
        except KilnError as e:
            print(f"kiln-bootstrap-containers: {e}", file=sys.stderr, flush=True)
            return 1
    print("usage: python3 -m kiln.host.containers bootstrap | supervise", file=sys.stderr)
    return 2
