"""The gateway to containerd: argv for Debian's `ctr`, and the registry host files it reads.

Kiln talks to containerd through `ctr` rather than a gRPC client: the image already ships
it with containerd, and grpcio + protobuf would not fit the root filesystem. Every call
names its containerd socket and namespace, so the two instances never mix.

Registry settings become a containerd hosts directory (`hosts.toml` per registry, rendered
fresh for every pull): mirrors in order, then the registry itself. An `http://` endpoint is
the only way to reach a registry over plain HTTP, so plain HTTP is always an explicit choice
for that one registry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.core.fs import atomic_write
from kiln.core.run import CommandError, run
from kiln.host.containers.mounts import mount_arg
from kiln.host.containers.spec import (
    API_SOCKET,
    HOST_USR_MOUNT,
    IN_CONTAINER_DIR,
    KILN_LAUNCHER,
    PERSISTENT_ROOT,
    ROOTFS_MOUNT,
    Runtime,
    Spec,
    normalize_image,
    registry_of,
)

CTR = "/usr/bin/ctr"
# The shim starts this for each task and gives it the task's stdout and stderr (fds 3, 4):
# the container's output reaches the journal under its id with no process of Kiln's in between.
LOG_URI = "binary:///usr/libexec/kiln/container-log"
PULL_TIMEOUT = 600.0
CALL_TIMEOUT = 60.0


class PullFailed(KilnError):
    """The image could not be pulled: it does not exist, the registry refused, or is unreachable."""


def base(rt: Runtime) -> list[str]:
    return [CTR, "--address", rt.address, "--namespace", rt.namespace]


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def hosts_toml(registry: str, mirrors: Sequence[str]) -> str:
    """containerd's hosts.toml for `registry`: the mirrors first, the registry as fallback."""
    server = "https://registry-1.docker.io" if registry == "docker.io" else f"https://{registry}"
    plain = [m for m in mirrors if m.rstrip("/") == f"http://{registry}"]
    if plain:  # the registry itself, over plain HTTP: no https fallback to try first
        server = plain[0].rstrip("/")
    lines = ["# Rendered by Kiln from settings.container-registry for each pull."]
    if registry != "_default":
        lines.append(f"server = {_toml_str(server)}")
    # Every endpoint as a [host] entry, the registry itself over plain HTTP too: ctr 1.6
    # does not use `server` alone for an http:// registry (measured), only [host] entries.
    for m in mirrors:
        lines += ["", f"[host.{_toml_str(m.rstrip('/'))}]", 'capabilities = ["pull", "resolve"]']
    return "\n".join(lines) + "\n"


def write_hosts_dir(dest: Path, registry_settings: dict[str, Any]) -> None:
    """One directory per registry with mirrors (`*` is containerd's `_default`)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True, mode=0o700)
    for registry, mirrors in sorted((registry_settings.get("mirrors") or {}).items()):
        name = "_default" if registry == "*" else registry
        (dest / name).mkdir()
        atomic_write(dest / name / "hosts.toml", hosts_toml(name, mirrors).encode(), mode=0o600)


def credentials_for(registry_settings: dict[str, Any], image: str) -> tuple[str, str] | None:
    """(username, password) for the image's registry, or the `*` entry's."""
    creds = registry_settings.get("credentials") or {}
    found = creds.get(registry_of(image)) or creds.get("*")
    if not found or "username" not in found:
        return None
    return found["username"], found.get("password", "")


def pull_argv(rt: Runtime, ref: str, hosts_dir: Path, username: str | None) -> list[str]:
    """`ctr images pull`; with a username alone ctr asks for the password on its terminal,
    so the password is never on a command line (where /proc shows it to every process)."""
    user = ["--user", username] if username is not None else []
    return [*base(rt), "images", "pull", "--hosts-dir", str(hosts_dir), *user, ref]


def pull(rt: Runtime, image: str, registry_settings: dict[str, Any], hosts_dir: Path) -> None:
    """Pull and unpack `image` into `rt` (skipped by containerd for content it already has)."""
    ref = normalize_image(image)
    write_hosts_dir(hosts_dir, registry_settings)
    creds = credentials_for(registry_settings, image)
    argv = pull_argv(rt, ref, hosts_dir, creds[0] if creds else None)
    try:
        run(argv, timeout=PULL_TIMEOUT, tty_input=(creds[1] + "\n").encode() if creds else None)
    except CommandError as e:
        raise PullFailed(f"cannot pull {ref}: {_reason(e.stderr, creds[1] if creds else None)}") from None


def _reason(stderr: str, secret: str | None) -> str:
    """ctr's last error line, without its prefix (and never with the password)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "ctr failed without a message"
    last = last.removeprefix("ctr: ")
    if secret:
        last = last.replace(secret, "<password>")
    return last


def image_present(rt: Runtime, image: str) -> bool:
    return normalize_image(image) in images(rt)


def images(rt: Runtime) -> list[str]:
    if not os.path.exists(rt.address):
        return []
    return run([*base(rt), "images", "ls", "--quiet"], timeout=CALL_TIMEOUT).stdout.decode().split()


def images_in_use(rt: Runtime) -> set[str]:
    """The images of the containers that exist (running, or stopping and not yet removed)."""
    out = run([*base(rt), "containers", "ls"], timeout=CALL_TIMEOUT).stdout.decode()
    return {parts[1] for line in out.splitlines()[1:] if len(parts := line.split()) >= 2}


def remove_images(rt: Runtime, refs: Sequence[str]) -> None:
    """Delete image records; with --sync containerd's garbage collector frees their content
    before ctr returns."""
    run([*base(rt), "images", "rm", "--sync", *refs], check=False, timeout=PULL_TIMEOUT)


def remove_stale(rt: Runtime, cid: str) -> None:
    """Whatever a killed supervisor left behind under `cid`: the task, then the container."""
    run([*base(rt), "tasks", "kill", "--signal", "SIGKILL", cid], check=False, timeout=CALL_TIMEOUT)
    run([*base(rt), "tasks", "delete", "--force", cid], check=False, timeout=CALL_TIMEOUT)
    run([*base(rt), "containers", "delete", cid], check=False, timeout=CALL_TIMEOUT)


def kill(rt: Runtime, cid: str, signal: str = "SIGKILL", exec_id: str | None = None,
         timeout: float = CALL_TIMEOUT, init_only: bool = False) -> None:
    """Signal every process of container `cid`, its init alone, or only the exec'd process `exec_id`."""
    which = ["--exec-id", exec_id] if exec_id else [] if init_only else ["--all"]
    run([*base(rt), "tasks", "kill", *which, "--signal", signal, cid], check=False, timeout=timeout)


def tasks(rt: Runtime) -> dict[str, tuple[int, str]]:
    """The tasks of the namespace: container id → (pid, status: RUNNING, STOPPED, CREATED…)."""
    if not os.path.exists(rt.address):
        return {}
    proc = run([*base(rt), "tasks", "ls"], check=False, timeout=CALL_TIMEOUT)
    out: dict[str, tuple[int, str]] = {}
    for line in proc.stdout.decode().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[1].isdigit():
            out[parts[0]] = (int(parts[1]), parts[2])
    return out


EXIT_CODE = re.compile(r"exit with non-zero exit code (\d+)")


def delete(rt: Runtime, cid: str) -> int | None:
    """Delete the ended task of `cid`, then the container; the task's exit status (ctr prints
    only a non-zero one), or None when there was no task to delete."""
    proc = run([*base(rt), "tasks", "delete", cid], check=False, timeout=CALL_TIMEOUT)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0 and "not found" not in err:  # still running: force it (the caller killed it)
        proc = run([*base(rt), "tasks", "delete", "--force", cid], check=False, timeout=CALL_TIMEOUT)
        err = proc.stderr.decode(errors="replace")
    run([*base(rt), "containers", "delete", cid], check=False, timeout=CALL_TIMEOUT)
    if proc.returncode != 0:
        return None
    found = EXIT_CODE.search(err)
    return int(found.group(1)) if found else 0


def run_argv(spec: Spec, persistent: Path | None = None, sources: Sequence[Path] = (),
             env_file: Path | None = None, log_uri: str = LOG_URI) -> list[str]:
    """`ctr run -d` for `spec`: ctr returns once the task runs; the supervisor watches the
    task's init through a pidfd and deletes task and container when it ends (no `--rm`:
    nothing of ours stays attached).

    A workload's mounts bind `sources` (the pinned sources `mounts.stage` made, in spec
    order) and its env comes from `env_file`: both are required when the spec has any.
    """
    if len(sources) != len(spec.mounts) or (spec.env and env_file is None):
        raise ValueError(f"{spec.id}: run_argv needs the staged mount sources and the env file")
    argv = [*base(spec.runtime), "run", "-d", "--log-uri", log_uri, "--label", f"kiln.digest={spec.digest}"]
    if spec.network == "host":
        argv.append("--net-host")
    if spec.superpowered:
        # Bottlerocket's superpowered: every capability, the host's PID namespace and root.
        argv += ["--privileged", "--with-ns", "pid:/proc/1/ns/pid",
                 "--mount", f"type=bind,src=/,dst={ROOTFS_MOUNT},options=rbind:rslave:rw"]
    else:
        argv.append("--seccomp")  # containerd's default profile, beside the default capabilities
    if spec.kind != "workload":
        dir_ = persistent or PERSISTENT_ROOT / spec.name
        argv += [
            "--mount", f"type=bind,src={dir_},dst={IN_CONTAINER_DIR}/{spec.name},options=rbind:rw",
            "--mount", f"type=bind,src={API_SOCKET},dst={API_SOCKET},options=bind:rw",
            "--mount", f"type=bind,src=/usr,dst={HOST_USR_MOUNT},options=rbind:ro",
            "--mount", f"type=bind,src={KILN_LAUNCHER},dst=/usr/local/bin/kiln,options=bind:ro",
            # Its own name: the persistent directory and user data are under it.
            "--env", f"KILN_CONTAINER={spec.name}",
        ]
    for m, source in zip(spec.mounts, sources, strict=True):
        argv += ["--mount", mount_arg(source, m.destination, m.read_only)]
    if env_file is not None:
        argv += ["--env-file", str(env_file)]
    if spec.memory_limit:
        argv += ["--memory-limit", str(spec.memory_limit)]
    if spec.cpus:
        argv += ["--cpus", f"{spec.cpus:g}"]
    return [*argv, normalize_image(spec.image), spec.id, *spec.command]


def exec_argv(spec: Spec, exec_id: str, command: Sequence[str], tty: bool) -> list[str]:
    argv = [*base(spec.runtime), "tasks", "exec", "--exec-id", exec_id]
    if tty:
        argv.append("--tty")
    return [*argv, spec.id, *command]
