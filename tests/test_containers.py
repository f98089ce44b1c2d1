"""The container manager and `kiln exec`, host side, against a real containerd and registry.

A private containerd (own root, state and socket) stands in for the host's two instances
(the specs' runtimes point at it); images come from docker-registry on 127.0.0.1, pushed by
`kiln oci push`. Superpowered containers join PID 1's namespaces, which this sandboxed test
machine does not allow: they are covered by the VM test (tests/vm/test_containers.py).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.core.errors import KilnError
from kiln.host.api import routes as api_routes
from kiln.host.api import stream
from kiln.host.api.client import ApiRefused
from kiln.host.containers import ctr, manager, mounts, spec, status
from kiln.host.containers.control import journal_argv, overview
from kiln.host.containers.spec import Mount, Runtime, Spec, from_settings, normalize_image
from kiln.host.containers.supervise import Supervisor
from kiln.oci.push import Credentials, push
from kiln.oci.registry import LocalRegistry
from kiln.vm.qemu import free_port
from tests.registry import Containerd, OciRegistry, refusing_registry, write_htpasswd
from tests.test_api import ApiHost, check_schema, running_api

# --- pure: settings → specs → ctr argv -------------------------------------------------------


def test_image_references_are_normalized_like_docker() -> None:
    assert normalize_image("busybox") == "docker.io/library/busybox:latest"
    assert normalize_image("library/busybox:1") == "docker.io/library/busybox:1"
    assert normalize_image("10.0.2.2:5000/kiln/admin:1") == "10.0.2.2:5000/kiln/admin:1"
    assert normalize_image("localhost/x") == "localhost/x:latest"
    digest = "sha256:" + "a" * 64
    assert normalize_image(f"ghcr.io/a/b@{digest}") == f"ghcr.io/a/b@{digest}"


def test_specs_from_settings_and_their_digest() -> None:
    tree: dict[str, Any] = {
        "host-containers": {"admin": {"source": "r/admin:1", "enabled": True, "superpowered": True}},
        "bootstrap-containers": {"prep": {"source": "r/b:1", "mode": "once", "essential": True},
                                 "idle": {"source": "r/b:1"}},
        "containers": {"web": {"image": "r/httpd:1", "env": {"B": "2", "A": "1"}, "restart": "on-failure",
                               "mounts": [{"source": "/local/www", "destination": "/www", "read-only": True}]}},
    }
    (admin,) = from_settings(tree, "host")
    assert (admin.kind, admin.id, admin.enabled, admin.superpowered) == ("host", "host-admin", True, True)
    idle, prep = from_settings(tree, "bootstrap")
    assert not idle.enabled and prep.enabled and prep.superpowered and prep.essential and prep.restart == "never"
    (web,) = from_settings(tree, "workload")
    assert web.env == (("A", "1"), ("B", "2")) and web.mounts == (Mount("/local/www", "/www", True),)
    assert web.runtime == spec.WORKLOAD_RUNTIME and admin.runtime == spec.HOST_RUNTIME
    tree["containers"]["web"]["env"]["A"] = "changed"
    assert from_settings(tree, "workload")[0].digest != web.digest  # a change means a restart
    # `once` → `off` is the manager's own bookkeeping, not a reason to restart anything
    tree["bootstrap-containers"]["prep"]["mode"] = "always"
    assert from_settings(tree, "bootstrap")[1].digest == prep.digest
    tree["containers"]["web"] |= {"memory-limit": "1Gi", "cpus": 0.5}
    limited = from_settings(tree, "workload")[0]
    assert (limited.memory_limit, limited.cpus) == (1 << 30, 0.5) and web.memory_limit == 0
    assert spec.memory_bytes("48Mi") == 48 << 20


def test_ctr_argv_superpowered_or_confined() -> None:
    admin = Spec("host", "admin", "reg.example/admin:1", superpowered=True)
    argv = ctr.run_argv(admin, Path("/local/host-containers/admin"))
    # detached, its output to the logger the shim starts; no --rm: the supervisor deletes it
    assert argv[5:8] == ["run", "-d", "--log-uri"] and argv[8] == "binary:///usr/libexec/kiln/container-log"
    assert "--rm" not in argv
    assert {"--privileged", "--net-host"} <= set(argv) and "pid:/proc/1/ns/pid" in argv
    assert "type=bind,src=/,dst=/.kiln/rootfs,options=rbind:rslave:rw" in argv
    assert "type=bind,src=/run/kiln/api.sock,dst=/run/kiln/api.sock,options=bind:rw" in argv
    assert "KILN_CONTAINER=admin" in argv and argv[-2:] == ["reg.example/admin:1", "host-admin"]
    web = Spec("workload", "web", "reg.example/h", command=("httpd", "-f"), network="none",
               mounts=(Mount("/local/www", "/www", True),))
    with pytest.raises(ValueError, match="needs the staged mount sources"):
        ctr.run_argv(web)  # never the configured path itself: it could cross a planted symlink
    argv = ctr.run_argv(web, None, [Path("/run/kiln/mounts/workload-web/0")])
    assert "--seccomp" in argv and "--privileged" not in argv and "--net-host" not in argv
    assert not any("api.sock" in a or "rootfs" in a for a in argv)
    assert "type=bind,src=/run/kiln/mounts/workload-web/0,dst=/www,options=rbind:ro" in argv
    assert argv[-4:] == ["reg.example/h:latest", "workload-web", "httpd", "-f"]
    assert "--memory-limit" not in argv and "--cpus" not in argv
    argv = ctr.run_argv(Spec("workload", "web", "r/h", memory_limit=64 << 20, cpus=0.25))
    assert argv[argv.index("--memory-limit") + 1] == str(64 << 20) and argv[argv.index("--cpus") + 1] == "0.25"


def test_registry_settings_become_hosts_files(tmp_path: Path) -> None:
    settings = {"mirrors": {"10.0.2.2:5000": ["http://10.0.2.2:5000"],
                            "docker.io": ["https://mirror.example", "http://10.0.2.2:5001"],
                            "*": ["https://any.example"]},
                "credentials": {"docker.io": {"username": "u", "password": "p:w"}}}
    ctr.write_hosts_dir(tmp_path / "hosts", settings)
    local = (tmp_path / "hosts/10.0.2.2:5000/hosts.toml").read_text()
    assert 'server = "http://10.0.2.2:5000"' in local and '[host."http://10.0.2.2:5000"]' in local  # asked for
    hub = (tmp_path / "hosts/docker.io/hosts.toml").read_text()
    assert 'server = "https://registry-1.docker.io"' in hub
    assert hub.index('[host."https://mirror.example"]') < hub.index('[host."http://10.0.2.2:5001"]')
    assert "server" not in (tmp_path / "hosts/_default/hosts.toml").read_text()
    assert ctr.credentials_for(settings, "busybox") == ("u", "p:w")
    assert ctr.credentials_for(settings, "10.0.2.2:5000/x") is None


# --- a real containerd and registry ----------------------------------------------------------------


@pytest.fixture
def ctrd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Containerd]:
    with Containerd(tmp_path / "containerd", namespace="kiln") as c:
        rt = Runtime(str(c.socket), "kiln", "test-containerd.service", str(c.dir / "state"))
        monkeypatch.setattr(spec, "HOST_RUNTIME", rt)
        monkeypatch.setattr(spec, "WORKLOAD_RUNTIME", rt)
        monkeypatch.setattr(manager, "start_runtime", lambda s: None)  # it is running already
        yield c


def mirror(reg: OciRegistry) -> dict[str, Any]:
    return {"mirrors": {reg.address: [f"http://{reg.address}"]}}


def test_pull_through_the_settings_and_clear_errors(
    ctrd: Containerd, oci_registry: OciRegistry, tmp_path: Path
) -> None:
    rt = spec.WORKLOAD_RUNTIME
    ref = oci_registry.refs["httpd"]
    # (containerd itself falls back to plain HTTP for loopback registries; the VM test shows
    # that 10.0.2.2 needs the http:// mirror entry.)
    ctr.pull(rt, ref, mirror(oci_registry), tmp_path / "hosts")
    assert ctr.image_present(rt, ref)
    listed = ctrd.ctr("images", "ls").stdout.decode()
    assert oci_registry.digests["httpd"] in listed  # the digest kiln oci push reported
    missing = f"{oci_registry.address}/kiln/nope:1"
    with pytest.raises(ctr.PullFailed, match=r"kiln/nope:1.*not found"):
        ctr.pull(rt, missing, mirror(oci_registry), tmp_path / "hosts")
    with pytest.raises(ctr.PullFailed, match="connection refused"):
        port = free_port()
        ctr.pull(rt, f"127.0.0.1:{port}/kiln/httpd:1", {"mirrors": {f"127.0.0.1:{port}": [f"http://127.0.0.1:{port}"]}},
                 tmp_path / "hosts")


def test_a_registry_that_refuses_is_named_and_credentials_stay_hidden(ctrd: Containerd, tmp_path: Path) -> None:
    with refusing_registry() as port:
        addr = f"127.0.0.1:{port}"
        settings = {"mirrors": {addr: [f"http://{addr}"]},
                    "credentials": {addr: {"username": "ci", "password": "s3cret"}}}
        with pytest.raises(ctr.PullFailed) as e:
            ctr.pull(spec.WORKLOAD_RUNTIME, f"{addr}/kiln/httpd:1", settings, tmp_path / "hosts")
        assert "403" in str(e.value) and "s3cret" not in str(e.value)


def test_credentials_from_the_settings_open_a_private_registry(
    ctrd: Containerd, oci_registry: OciRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docker-registry with htpasswd: no or wrong credentials → 401 named; the right ones pull.
    The password reaches ctr through its terminal, never its command line."""
    calls: list[tuple[list[str], bytes | None]] = []
    real_run = ctr.run

    def spy(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append((argv, kw.get("tty_input")))
        return real_run(argv, **kw)

    monkeypatch.setattr(ctr, "run", spy)
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"fleet": "pull-secret"})
    layout = oci_registry.images["httpd"].layout
    with LocalRegistry(tmp_path / "private", htpasswd=htpasswd) as reg:
        ref = f"{reg.address}/kiln/httpd:1"
        push(layout, ref, plain_http=True, credentials=Credentials("fleet", "pull-secret"))
        settings: dict[str, Any] = {"mirrors": {reg.address: [f"http://{reg.address}"]}}
        rt = spec.WORKLOAD_RUNTIME
        with pytest.raises(ctr.PullFailed, match="401 Unauthorized"):
            ctr.pull(rt, ref, settings, tmp_path / "hosts")
        settings["credentials"] = {reg.address: {"username": "fleet", "password": "n0t-th1s"}}
        with pytest.raises(ctr.PullFailed, match="401 Unauthorized") as e:
            ctr.pull(rt, ref, settings, tmp_path / "hosts")
        assert "n0t-th1s" not in str(e.value)
        settings["credentials"] = {"*": {"username": "fleet", "password": "pull-secret"}}  # any registry
        ctr.pull(rt, ref, settings, tmp_path / "hosts")
        assert ctr.image_present(rt, ref)
    pulls = [(argv, secret) for argv, secret in calls if "pull" in argv]
    assert [secret for _, secret in pulls] == [None, b"n0t-th1s\n", b"pull-secret\n"]
    assert not any("secret" in a or "th1s" in a for argv, _ in pulls for a in argv)
    assert pulls[-1][0][-3:] == ["--user", "fleet", ref]


def _get(port: int, timeout: float = 2) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as r:
        return str(r.read().decode())


def _wait(cond: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = cond()
        except OSError:
            got = None
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def prepare_here(s: Spec, tmp_path: Path) -> manager.Prepared:
    """`manager.prepare` with tmp_path standing for /local (mount sources are under it) and
    the staging and env directories in it too."""
    return manager.prepare(s, tmp_path / "persistent", local=tmp_path, staging=tmp_path / "staging",
                           env_dir=tmp_path / "env")


def web_settings(reg: OciRegistry, port: int, www: Path, restart: str = "always") -> dict[str, Any]:
    return {
        "container-registry": mirror(reg),
        "containers": {"web": {"image": reg.refs["httpd"], "restart": restart, "memory-limit": "64Mi", "cpus": 0.5,
                               "command": ["/bin/httpd", "-f", "-p", str(port), "-h", "/www"], "stop-timeout": 1,
                               "mounts": [{"source": str(www), "destination": "/www", "read-only": True}]}},
    }


LOGGER = """#!/bin/sh
# containerd's binary logger protocol, as /usr/libexec/kiln/container-log speaks it, into files
exec 5>&-
exec /bin/sh -c 'cat <&4 >> {dir}/$CONTAINER_ID.err & exec cat <&3 >> {dir}/$CONTAINER_ID.out'
"""


class Harness:
    """Supervisors on the test's containerd: settings from a dict, status files, lifecycle
    lines and container output (through a logger of the same protocol as the image's) in tmp_path."""

    def __init__(self, tmp_path: Path, settings: dict[str, Any]) -> None:
        self.tmp = tmp_path
        self.settings = settings
        self.state = tmp_path / "state"
        self.logs = tmp_path / "logs"
        self.logs.mkdir(exist_ok=True)
        logger = tmp_path / "container-log"
        logger.write_text(LOGGER.format(dir=self.logs))
        logger.chmod(0o755)
        self.log_uri = f"binary://{logger}"
        self.lines: list[str] = []
        self.threads: list[tuple[Supervisor, threading.Thread]] = []

    def supervisor(self) -> Supervisor:
        """A new supervisor, running in a thread (as the host agent will run it)."""
        sup = Supervisor(lambda: json.loads(json.dumps(self.settings)), self.state, log_uri=self.log_uri,
                         note=lambda cid, line: self.lines.append(line), persistent_root=self.tmp / "persistent",
                         local=self.tmp, staging=self.tmp / "staging", env_dir=self.tmp / "env")
        thread = threading.Thread(target=sup.serve_forever, daemon=True)
        thread.start()
        self.threads.append((sup, thread))
        return sup

    def status(self, s: Spec) -> status.State:
        return status.read(s, self.state) or status.State("", "", "", "")

    def close(self) -> None:
        for sup, thread in self.threads:
            if thread.is_alive():
                sup.stop_all(60)
                sup.shutdown()
                thread.join(30)
                assert not thread.is_alive(), "the supervisor did not stop"
            # before the fixture stops containerd under it
            assert sup.wait_collected(60), "an image collection did not end"


@pytest.fixture
def harness(ctrd: Containerd, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path, {})
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def web(harness: Harness, oci_registry: OciRegistry, tmp_path: Path) -> Iterator[tuple[Supervisor, Spec, int]]:
    """The httpd workload kept running by a Supervisor, serving a directory of ours.

    httpd is the container's PID 1 without a SIGTERM handler, so every stop ends with the
    SIGKILL after the grace period: its stop-timeout is 1 s here instead of 10 (the same
    path, sooner). The image is pulled by the supervisor's first start (it is not there yet).
    """
    port = free_port()
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("served from a mount\n")
    harness.settings |= web_settings(oci_registry, port, www)
    (web_spec,) = from_settings(harness.settings, "workload")
    sup = harness.supervisor()
    _wait(lambda: _get(port), "the workload to serve", 60)
    yield sup, web_spec, port


def cgroup_limits(pid: int) -> tuple[str, str]:
    """(memory limit in bytes, "quota period") of a process's cgroup, cgroup v2 or v1."""
    paths = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # v2, as on a Kiln host
        group = root / paths[""].lstrip("/")
        return (group / "memory.max").read_text().strip(), (group / "cpu.max").read_text().strip()
    memory = root / "memory" / paths["memory"].lstrip("/")
    cpu = root / "cpu" / paths.get("cpu", paths.get("cpu,cpuacct", "")).lstrip("/")
    quota = (cpu / "cpu.cfs_quota_us").read_text().strip() + " " + (cpu / "cpu.cfs_period_us").read_text().strip()
    return (memory / "memory.limit_in_bytes").read_text().strip(), quota


def _pid(s: Spec) -> int:
    return int(_wait(lambda: (t := ctr.tasks(s.runtime).get(s.id)) and t[1] == "RUNNING" and t[0], f"{s.id} to run"))


def test_workload_serves_is_restarted_after_its_process_dies_and_stops_cleanly(
    web: tuple[Supervisor, Spec, int], harness: Harness, ctrd: Containerd
) -> None:
    sup, web_spec, port = web
    assert _get(port) == "served from a mount\n"
    pid, state = ctr.tasks(spec.WORKLOAD_RUNTIME)["workload-web"]
    assert state == "RUNNING"
    assert cgroup_limits(pid) == (str(64 << 20), "50000 100000")  # memory-limit 64Mi, cpus 0.5
    assert _wait(lambda: harness.status(web_spec).pid == pid, "the pid")
    assert harness.status(web_spec).state == "running"
    os.kill(pid, 9)  # the container's process dies
    _wait(lambda: harness.status(web_spec).restarts == 1, "the restart")
    assert "workload-web: exited with status 137; restart 1 in 1 s" in harness.lines
    assert _wait(lambda: _get(port), "serving again") == "served from a mount\n"
    new_pid = _pid(web_spec)
    assert new_pid != pid
    assert _wait(lambda: (st := harness.status(web_spec)).pid == new_pid and st.state == "running", "the new pid")
    # the stop: SIGTERM, which httpd as PID 1 ignores, then SIGKILL after its stop-timeout (1 s)
    t0 = time.monotonic()
    assert sup.stop_all(60) == ["workload-web"]
    assert 1 <= time.monotonic() - t0 < 20
    assert "workload-web: still running 1 s after SIGTERM: SIGKILL" in harness.lines
    assert "workload-web" not in ctr.tasks(spec.WORKLOAD_RUNTIME)
    assert harness.status(web_spec).state == "stopped"
    assert "workload-web" not in ctrd.ctr("containers", "ls", "-q").stdout.decode().split()
    assert not (harness.tmp / "staging/workload-web").exists()  # the pinned mount sources are released
    sup.undrain()  # and back
    assert _wait(lambda: _get(port), "serving after the drain") == "served from a mount\n"


def test_a_stop_that_sigterm_ends_takes_no_grace_period(harness: Harness, oci_registry: OciRegistry) -> None:
    harness.settings |= {"container-registry": mirror(oci_registry), "containers": {"quick": {
        "image": oci_registry.refs["httpd"], "stop-timeout": 30,
        "command": ["/bin/sh", "-c", "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.1; done"]}}}
    (quick,) = from_settings(harness.settings, "workload")
    sup = harness.supervisor()
    _wait(lambda: harness.status(quick).state == "running", "running")
    _wait(lambda: "up" in (harness.logs / "workload-quick.out").read_text(), "its output in the log")
    t0 = time.monotonic()
    assert sup.stop_all(60) == ["workload-quick"]
    assert time.monotonic() - t0 < 10  # not the 30 s stop-timeout
    assert harness.status(quick).exit_code == 0 and not any("SIGKILL" in line for line in harness.lines)
    assert "bye" in (harness.logs / "workload-quick.out").read_text()


@pytest.mark.parametrize(("restart", "code", "state", "runs"), [
    ("never", 3, "failed", 1), ("on-failure", 0, "exited", 1), ("on-failure", 4, "restarting", 3)])
def test_restart_policies(harness: Harness, oci_registry: OciRegistry, tmp_path: Path,
                          restart: str, code: int, state: str, runs: int) -> None:
    marker = tmp_path / "runs"
    marker.mkdir()
    # Each run leaves a file; on-failure with a failing command is stopped after 3 runs.
    secret = "s3cret value, with = and 'quotes'"
    harness.settings |= {"container-registry": mirror(oci_registry), "containers": {"job": {
        "image": oci_registry.refs["httpd"], "restart": restart, "env": {"SECRET": secret},
        "command": ["/bin/sh", "-c",
                    f'printf %s "$SECRET" > /runs/env; mktemp /runs/run.XXXXXX; echo oops >&2; exit {code}'],
        "mounts": [{"source": str(marker), "destination": "/runs"}]}}}
    (job,) = from_settings(harness.settings, "workload")
    prepared = prepare_here(job, tmp_path)
    assert not any(secret in a for a in prepared.argv())  # ctr's command line is world-readable
    assert prepared.env_file is not None and prepared.env_file.stat().st_mode & 0o777 == 0o600
    prepared.release()
    sup = harness.supervisor()
    if runs == 1:
        st = _wait(lambda: (st := harness.status(job)).state == state and st, f"the {state} state")
        assert (st.exit_code, st.restarts) == (code, 0)
        time.sleep(1.5)  # a restart would have come by now
        assert len(list(marker.glob("run.*"))) == 1
    else:
        _wait(lambda: harness.status(job).restarts == runs, "the third failure")
        t0 = time.monotonic()
        sup.stop_all(60)  # while it waits 4 s to restart: the wait is cut short
        assert time.monotonic() - t0 < 3
        assert harness.status(job).state == "stopped"
        assert len(list(marker.glob("run.*"))) == runs
        assert [line.rsplit(";", 1)[-1] for line in harness.lines] == [
            " restart 1 in 1 s", " restart 2 in 2 s", " restart 3 in 4 s"]
    assert (marker / "env").read_text() == secret
    assert "oops" in (harness.logs / "workload-job.err").read_text()  # stderr, through the shim's logger
    assert _wait(lambda: not list((tmp_path / "staging").iterdir()), "the pinned sources to be released")


def test_a_killed_supervisor_is_replaced_by_one_that_adopts_what_runs(
    web: tuple[Supervisor, Spec, int], harness: Harness, ctrd: Containerd
) -> None:
    """What a SIGKILL of kiln-containers.service leaves: tasks running in their shims, status
    files, no supervisor. The next one adopts the task (no second one), and keeps its policy."""
    first, web_spec, port = web
    pid = _pid(web_spec)
    first.shutdown()  # the loop ends; nothing is stopped (as after a SIGKILL)
    harness.threads[0][1].join(10)
    assert ctr.tasks(web_spec.runtime)[web_spec.id] == (pid, "RUNNING")
    second = harness.supervisor()
    _wait(lambda: second._runs.get(web_spec.id), "the adoption")
    assert ctr.tasks(web_spec.runtime) == {web_spec.id: (pid, "RUNNING")}  # the same task, and only it
    assert _get(port) == "served from a mount\n"
    assert harness.status(web_spec).pid == pid
    os.kill(pid, 9)  # the restart policy still holds
    _wait(lambda: harness.status(web_spec).restarts == 1, "the restart")
    new_pid = _pid(web_spec)
    assert new_pid != pid and _wait(lambda: _get(port), "serving again")

    # Dead again while no supervisor ran: the next one finds it ended, deletes it, restarts it.
    second.shutdown()
    harness.threads[1][1].join(10)
    os.kill(new_pid, 9)
    _wait(lambda: ctr.tasks(web_spec.runtime)[web_spec.id][1] == "STOPPED", "the task to end")
    harness.supervisor()
    _wait(lambda: harness.status(web_spec).restarts == 2, "the restart by the third supervisor")
    assert _pid(web_spec) not in (pid, new_pid) and _wait(lambda: _get(port), "serving once more")
    assert "workload-web: exited with status 137; restart 2 in 1 s" in harness.lines


def test_settings_changes_restart_stop_and_start(
    web: tuple[Supervisor, Spec, int], harness: Harness, oci_registry: OciRegistry, tmp_path: Path
) -> None:
    sup, web_spec, port = web
    pid = _pid(web_spec)
    sup.request_sync()  # nothing changed: nothing happens
    time.sleep(1)
    assert _pid(web_spec) == pid and harness.status(web_spec).restarts == 0
    (tmp_path / "www2").mkdir()
    (tmp_path / "www2/index.html").write_text("another directory\n")
    harness.settings["containers"]["web"]["mounts"][0]["source"] = str(tmp_path / "www2")
    harness.settings["containers"]["idle"] = {"image": oci_registry.refs["httpd"], "command": ["sleep", "600"]}
    sup.request_sync()
    assert _wait(lambda: _get(port) == "another directory\n", "the changed workload to serve", 60)
    (changed, idle) = sorted(from_settings(harness.settings, "workload"), key=lambda s: s.name != "web")
    assert _pid(changed) != pid and harness.status(changed).digest == changed.digest != web_spec.digest
    _pid(idle)
    harness.settings["containers"]["idle"]["enabled"] = False
    del harness.settings["containers"]["web"]
    sup.request_sync()
    _wait(lambda: ctr.tasks(spec.WORKLOAD_RUNTIME) == {}, "both to stop")
    _wait(lambda: harness.status(idle).state == "stopped", "the stopped state")
    with pytest.raises(OSError):
        _get(port)


def test_a_container_that_cannot_start_is_failed_and_named(harness: Harness, oci_registry: OciRegistry) -> None:
    harness.settings |= {"container-registry": mirror(oci_registry), "containers": {
        "ghost": {"image": f"{oci_registry.address}/kiln/nope:1"}}}
    (ghost,) = from_settings(harness.settings, "workload")
    harness.supervisor()
    st = _wait(lambda: (st := harness.status(ghost)).state == "failed" and st, "the failure")
    assert "kiln/nope:1" in st.detail and "not found" in st.detail
    assert any(line.startswith("workload-ghost: ") and "not found" in line for line in harness.lines)


# --- the API: containers, exec, removal --------------------------------------------------------------


@pytest.fixture
def api_host(tmp_path: Path) -> Iterator[ApiHost]:
    with running_api(tmp_path / "api") as host:
        host.api.containers_state = tmp_path / "state"
        yield host


def kiln_cli(host: ApiHost, *args: str, input: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kiln.host.cli", "--socket", str(host.socket), *args],
                          input=input, capture_output=True, timeout=timeout, check=False)


def declare(host: ApiHost, s: Spec) -> None:
    """Put the supervised container in the settings (its mount is outside /local, which the
    model refuses: the name and image are what exec and the overview need)."""
    host.client().request("PATCH", "/settings", {"containers": {s.name: {"image": s.image}}})
    host.client().request("POST", "/tx/commit")


def test_exec_streams_exit_status_and_backpressure(
    web: tuple[Supervisor, Spec, int], api_host: ApiHost, oci_registry: OciRegistry, tmp_path: Path
) -> None:
    _sup, web_spec, _port = web
    declare(api_host, web_spec)
    c = api_host.client()
    out = kiln_cli(api_host, "exec", "web", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (out.returncode, out.stdout, out.stderr) == (7, b"out\n", b"err\n"), out.stderr.decode()
    # 8 MiB through the container and back: the client stops reading stdin while the
    # process has not taken the last chunk, so nothing piles up in the API server.
    data = os.urandom(8 << 20)
    out = kiln_cli(api_host, "exec", "-T", "web", "--", "cat", input=data, timeout=120)
    assert out.returncode == 0 and out.stdout == data, out.stderr
    out = kiln_cli(api_host, "exec", "web", "--", "cat", "/www/index.html")
    assert out.stdout == b"served from a mount\n"
    # the state the manager wrote is what the API shows
    (entry,) = [e for e in c.request("GET", "/containers") if e["kind"] == "workload"]
    assert (entry["kind"], entry["name"], entry["state"], entry["restarts"]) == ("workload", "web", "running", 0)


def test_exec_with_a_terminal_follows_its_size(
    web: tuple[Supervisor, Spec, int], api_host: ApiHost, oci_registry: OciRegistry, tmp_path: Path
) -> None:
    _sup, web_spec, _port = web
    declare(api_host, web_spec)
    c = api_host.client()
    # `kiln exec` on a terminal of 33 x 101: the container's terminal has that size (ctr sets
    # it just after the start: a command that asks at once may see 0x0, hence the sleep).
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "kiln.host.cli", "--socket", str(api_host.socket),
                             "exec", "web", "--", "sh", "-c", "sleep 1; stty size"],
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    got = b""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            got += os.read(master, 4096)
        except OSError:
            break
    proc.wait(10)
    os.close(master)
    assert proc.returncode == 0 and b"33 101" in got, got
    # A resize frame mid-session changes it (the raw protocol, as `kiln exec` sends on SIGWINCH):
    # each line typed prints the terminal's size.
    sock, rest = c.upgrade("/exec", {"target": "web", "command": ["sh", "-c", "while read x; do stty size; done"],
                                     "tty": True, "rows": 10, "cols": 20}, stream.PROTOCOL)
    sock.settimeout(2)
    frames, output = stream.Frames(), b""

    def typed_until(expected: bytes) -> None:
        nonlocal output
        deadline = time.monotonic() + 30
        while expected not in output:
            assert time.monotonic() < deadline, f"no {expected!r} in {output!r}"
            sock.sendall(stream.frame(stream.STDIN, b"x\r"))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            output += b"".join(p for k, p in frames.feed(data) if k == stream.STDOUT)

    output += b"".join(p for k, p in frames.feed(rest) if k == stream.STDOUT)
    typed_until(b"10 20")  # the size asked for at the start
    sock.sendall(stream.resize(50, 120))
    typed_until(b"50 120")
    sock.sendall(stream.frame(stream.STDIN, b"\x04"))  # ^D: read fails, the loop ends
    sock.settimeout(30)
    code = None
    while code is None:
        data = sock.recv(65536)
        assert data, "the session ended without an exit status"
        code = next((stream.unpack_int(p) for k, p in frames.feed(data) if k == stream.EXIT), None)
    sock.close()
    assert code == 0


def test_exec_refusals(api_host: ApiHost, ctrd: Containerd) -> None:
    c = api_host.client()
    c.request("PATCH", "/settings", {"containers": {"web": {"image": "r/httpd:1"}}})
    c.request("POST", "/tx/commit")
    with pytest.raises(ApiRefused) as e:
        c.request("POST", "/exec", {"target": "web", "command": ["true"]})
    assert e.value.status == 426
    for body, status_, path in [
        ({"target": "nope", "command": ["true"]}, 404, "target"),
        ({"target": "web", "command": ["true"]}, 409, "target"),  # declared, not running
        ({"target": "web", "command": []}, 400, "command"),
        ({"target": "Web!", "command": ["true"]}, 400, "target"),
        ({"target": "web", "command": ["true"], "rows": 0}, 400, "rows"),
        ({"target": "web", "command": ["true"], "shell": True}, 400, "shell"),
    ]:
        with pytest.raises(ApiRefused) as e:
            c.upgrade("/exec", body, stream.PROTOCOL)
        assert (e.value.status, e.value.body["path"]) == (status_, path), body
    out = kiln_cli(api_host, "exec", "web", "--", "true")
    assert out.returncode == 1 and b"is not running" in out.stderr


def test_logs_route_checks_its_query_and_reads_the_journal(api_host: ApiHost) -> None:
    """The journal itself is read for real in the VM test; here: the refusals, and an answer
    from this machine's journalctl (no such unit: no entries) that matches the document."""
    c = api_host.client()
    c.request("PATCH", "/settings", {"containers": {"web": {"image": "r/httpd:1"}},
                                     "bootstrap-containers": {"prep": {"source": "r/b:1"}}})
    c.request("POST", "/tx/commit")
    doc = json.loads(Path(api_routes.__file__).with_name("openapi.json").read_text())
    got = c.request("GET", "/containers/logs?name=web&lines=5")
    check_schema(doc, "GET", "/containers/logs", 200, got)
    assert (got["kind"], got["unit"], got["entries"]) == ("workload", "kiln-agent.service", [])
    assert c.request("GET", "/containers/logs?name=prep")["unit"] == "kiln-bootstrap-containers.service"
    assert c.request("GET", "/containers/logs?name=admin")["unit"] == "kiln-agent.service"
    # by the container's id: its output (the shim's logger) and the supervisor's lines about it
    web_spec = from_settings(api_host.store.live(), "workload")[0]
    assert "--identifier=workload-web" in journal_argv(web_spec, 5)
    assert journal_argv(web_spec, 5, "s=1")[-1] == "--after-cursor=s=1"
    for query, code, field in [
        ("", 400, "name"), ("name=Web!", 400, "name"), ("name=nope", 404, "name"),
        ("name=web&kind=host", 404, "name"), ("name=web&kind=pod", 400, "kind"),
        ("name=web&lines=0", 400, "lines"), ("name=web&lines=10001", 400, "lines"), ("name=web&lines=-1", 400, "lines"),
        ("name=web&cursor=x;rm", 400, "cursor"),
        ("name=web&cursor=s%3D1%3Bi%3D2", 400, "cursor"),  # well-formed, but journalctl cannot seek to it
    ]:
        with pytest.raises(ApiRefused) as e:
            c.request("GET", f"/containers/logs?{query}")
        assert (e.value.status, e.value.body["path"]) == (code, field), query
        check_schema(doc, "GET", "/containers/logs", code, e.value.body)
    out = kiln_cli(api_host, "logs", "nope")
    assert out.returncode == 1 and b"no container 'nope'" in out.stderr
    assert kiln_cli(api_host, "logs", "web", "-n", "3").returncode == 0


def test_containers_overview_and_removal(api_host: ApiHost, tmp_path: Path) -> None:
    c = api_host.client()
    c.request("PATCH", "/settings", {
        "containers": {"web": {"image": "r/httpd:1"}, "db": {"image": "r/db:1", "enabled": False}},
        "bootstrap-containers": {"prep": {"source": "r/b:1", "mode": "once"}}})
    c.request("POST", "/tx/commit")
    tree = api_host.store.live()
    (web_spec,) = [s for s in from_settings(tree, "workload") if s.name == "web"]
    status.write(web_spec, "running", tmp_path / "state", pid=4242)
    assert {e["name"]: e for e in c.request("GET", "/containers")}["web"]["pid"] == 4242
    status.write(web_spec, "failed", tmp_path / "state", detail="cannot pull r/httpd:1: not found", pid=4242)
    by_name = {e["name"]: e for e in c.request("GET", "/containers")}
    assert by_name["web"]["state"] == "failed" and "not found" in by_name["web"]["detail"]
    assert "pid" not in by_name["web"]  # only while running
    assert by_name["db"]["state"] == "disabled" and by_name["prep"]["mode"] == "once"
    assert by_name["admin"]["kind"] == "host" and by_name["admin"]["state"] == "disabled"  # the default
    assert overview(tree, tmp_path / "state") == c.request("GET", "/containers")

    before = api_host.state()
    for target, code in [("/settings?keys=motd", 400), ("/settings?keys=containers", 400),
                         ("/settings?keys=containers.nope", 404), ("/settings", 400)]:
        with pytest.raises(ApiRefused) as e:
            c.request("DELETE", target)
        assert e.value.status == code, target
    assert api_host.state() == before  # refused: nothing changed
    got = c.request("DELETE", "/settings?keys=containers.web,bootstrap-containers.prep")
    assert got["changed"] == ["settings.bootstrap-containers.prep.mode", "settings.bootstrap-containers.prep.source",
                              "settings.containers.web.image"]
    assert "containers" in got["apply"]["services"]
    assert set(c.request("GET", "/settings")["containers"]) == {"db"}
    out = kiln_cli(api_host, "settings", "unset", "containers.db")
    assert out.returncode == 0 and b"settings.containers.db" in out.stdout
    assert "containers" not in c.request("GET", "/settings")


def test_registry_passwords_are_hidden_from_readers(api_host: ApiHost) -> None:
    c = api_host.client()
    c.request("PATCH", "/settings", {"container-registry": {"credentials": {
        "docker.io": {"username": "u", "password": "p1"}, "10.0.2.2:5000": {"username": "v", "password": "p2"}}}})
    c.request("POST", "/tx/commit")
    seen = api_host.api.visible(api_host.store.live(), "reader")["container-registry"]["credentials"]
    assert seen == {"docker.io": {"username": "u", "password": "<redacted>"},
                    "10.0.2.2:5000": {"username": "v", "password": "<redacted>"}}


def test_user_data_and_persistent_directory(tmp_path: Path) -> None:
    s = Spec("host", "admin", "r/a", user_data=base64.b64encode(b"#!/bin/sh\necho hi\n").decode())
    d = manager.prepare(s, tmp_path).persistent
    assert d == tmp_path / "admin" and (d / "user-data").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert oct((d / "user-data").stat().st_mode & 0o777) == "0o600"
    manager.prepare(Spec("host", "admin", "r/a"), tmp_path)
    assert not (d / "user-data").exists()  # user data removed from the settings: gone here too
    with pytest.raises(KilnError, match=r"host-containers\.admin\.user-data is not valid base64"):
        manager.prepare(Spec("host", "admin", "r/a", user_data="a"), tmp_path)


def _mounted_at(path: Path) -> bool:
    """A mount point per the kernel's table (os.path.ismount misses binds within one file system)."""
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_workload_sources_are_made_and_pinned(tmp_path: Path) -> None:
    """A missing source becomes a directory, an existing file stays a file; each is bound at
    a private staging path that is the same object, and released afterwards."""
    local = tmp_path / "local"
    local.mkdir()
    (local / "conf.json").write_text("{}")
    web = Spec("workload", "web", "r/h", mounts=(Mount(str(local / "data/www"), "/www"),
                                                  Mount(str(local / "conf.json"), "/etc/conf.json", True)),
               env=(("A", "1"), ("B", "two words")))
    prepared = manager.prepare(web, tmp_path, local=local, staging=tmp_path / "staging", env_dir=tmp_path / "env")
    try:
        assert (local / "data/www").is_dir() and (local / "conf.json").read_text() == "{}"
        www, conf = prepared.sources
        assert _mounted_at(www) and os.path.samestat(www.stat(), (local / "data/www").stat())
        assert conf.read_text() == "{}" and os.path.samestat(conf.stat(), (local / "conf.json").stat())
        argv = prepared.argv()
        assert f"type=bind,src={www},dst=/www,options=rbind:rw" in argv
        assert f"type=bind,src={conf},dst=/etc/conf.json,options=rbind:ro" in argv
        assert argv[argv.index("--env-file") + 1] == str(tmp_path / "env/workload-web")
        assert (tmp_path / "env/workload-web").read_text() == "A=1\nB=two words\n"
        assert "--env" not in argv and not any("two words" in a for a in argv)
    finally:
        prepared.release()
    assert not _mounted_at(www) and not (tmp_path / "staging/workload-web").exists()


@pytest.mark.parametrize("where", ["middle", "last", "missing-below"])
def test_a_symlink_on_the_way_to_a_source_is_refused(tmp_path: Path, where: str) -> None:
    """A workload that shares /local/shared could plant links there: none is followed, and
    nothing is created outside /local through one."""
    local, outside = tmp_path / "local", tmp_path / "host-etc"
    (local / "shared").mkdir(parents=True)
    outside.mkdir()
    (outside / "shadow").write_text("root:x:0:0\n")
    if where == "last":
        (local / "shared/etc").symlink_to(outside)
        source = local / "shared/etc"
    elif where == "middle":
        (local / "shared/link").symlink_to(outside)
        source = local / "shared/link/shadow"
    else:  # the source does not exist yet: creating it must not go through the link
        (local / "shared/link").symlink_to(outside)
        source = local / "shared/link/new/dir"
    web = Spec("workload", "web", "r/h", mounts=(Mount(str(source), "/data"),))
    with pytest.raises(mounts.UnsafeMount, match="symlink"):
        manager.prepare(web, tmp_path, local=local, staging=tmp_path / "staging", env_dir=tmp_path / "env")
    assert sorted(p.name for p in outside.iterdir()) == ["shadow"]
    assert not (tmp_path / "staging/workload-web").exists()


def test_mount_arguments_keep_their_fields() -> None:
    assert mounts.mount_arg(Path("/run/kiln/mounts/w/0"), "/www", True) == (
        "type=bind,src=/run/kiln/mounts/w/0,dst=/www,options=rbind:ro")
    for dst in ["/x,src=/", '/a"b', "/a=b"]:  # the model refuses these; the argument check does too
        with pytest.raises(mounts.UnsafeMount, match="would change the mount's fields"):
            mounts.mount_arg(Path("/run/kiln/mounts/w/0"), dst, False)


def test_what_a_killed_supervisor_left_is_cleared(ctrd: Containerd, oci_registry: OciRegistry, tmp_path: Path) -> None:
    rt = spec.WORKLOAD_RUNTIME
    ref = normalize_image(oci_registry.refs["httpd"])
    ctr.pull(rt, ref, mirror(oci_registry), tmp_path / "hosts")
    ctrd.ctr("run", "-d", "--net-host", ref, "workload-left", "/bin/httpd", "-f", "-p", str(free_port()))
    ctrd.ctr("containers", "create", ref, "workload-created")
    assert ctr.tasks(rt)["workload-left"][1] == "RUNNING"
    ctr.remove_stale(rt, "workload-left")
    ctr.remove_stale(rt, "workload-created")
    ctr.remove_stale(rt, "workload-never")  # nothing there: nothing to do
    assert ctr.tasks(rt) == {} and ctrd.ctr("containers", "ls", "--quiet").stdout == b""


def test_unused_images_are_removed_with_their_content(
    web: tuple[Supervisor, Spec, int], ctrd: Containerd, oci_registry: OciRegistry, tmp_path: Path
) -> None:
    """Kept: what the settings name (enabled or not) and what a container still uses."""
    _sup, web_spec, _port = web
    rt = spec.WORKLOAD_RUNTIME
    admin, bootstrap = oci_registry.refs["admin"], oci_registry.refs["bootstrap"]
    for ref in (admin, bootstrap):
        ctr.pull(rt, ref, mirror(oci_registry), tmp_path / "hosts")
    blobs = ctrd.dir / "root/io.containerd.content.v1.content/blobs/sha256"
    before = len(list(blobs.iterdir()))
    tree = {"host-containers": {"admin": {"source": admin, "enabled": False}}}
    # httpd: not in the settings, but its container exists (the web fixture runs it)
    assert manager.collect_images(tree) == [normalize_image(bootstrap)]
    assert set(ctr.images(rt)) == {normalize_image(admin), normalize_image(web_spec.image)}
    assert len(list(blobs.iterdir())) == before - 3  # its manifest, config and layer
    assert manager.collect_images(tree) == []


def test_resolv_conf_from_dhcp_leases(tmp_path: Path) -> None:
    leases = tmp_path / "leases"
    leases.mkdir()
    (leases / "2").write_text("# This is private data. Do not parse.\nADDRESS=10.0.2.15\nDNS=10.0.2.3 10.0.2.4\n")
    (leases / "3").write_text("ADDRESS=192.168.1.5\nDNS=10.0.2.3\n")
    dest = tmp_path / "resolv.conf"
    dest.symlink_to(tmp_path / "dangling")  # what a stub-resolver link looks like without resolved
    manager.write_resolv_conf(leases, dest)
    assert dest.read_text().splitlines()[1:] == ["nameserver 10.0.2.3", "nameserver 10.0.2.4"]
    manager.write_resolv_conf(tmp_path / "none", dest)  # no lease: the file still exists
    assert dest.read_text().startswith("# Written by Kiln") and "nameserver" not in dest.read_text()


def test_frames_arrive_whole_whatever_the_reads_and_bad_ones_are_refused() -> None:
    data = stream.frame(stream.STDOUT, b"a" * 70000) + stream.resize(50, 120) + stream.exit_status(-3)
    frames = stream.Frames()
    got = [f for i in range(0, len(data), 999) for f in frames.feed(data[i:i + 999])]
    assert got == [(stream.STDOUT, b"a" * 70000), (stream.RESIZE, b"\x00\x32\x00\x78"),
                   (stream.EXIT, b"\xff\xff\xff\xfd")]
    assert stream.unpack_pair(got[1][1]) == (50, 120) and stream.unpack_int(got[2][1]) == -3
    with pytest.raises(stream.ProtocolError):
        list(stream.Frames().feed(b"1" + (stream.MAX_FRAME + 1).to_bytes(4, "big")))
    with pytest.raises(stream.ProtocolError):
        stream.unpack_pair(b"\x00")


def test_enabled_without_an_image_says_which_key(tmp_path: Path) -> None:
    admin = from_settings({"host-containers": {"admin": {"enabled": True}}}, "host")[0]
    with pytest.raises(KilnError, match=r"settings\.host-containers\.admin\.source is not set"):
        manager.pull(admin, {}, tmp_path)



def test_logs_follow_polls_with_the_apis_line_limit() -> None:
    """After its first answer `kiln logs -f` asks for the API's largest `lines`: with the
    user's -n there, journalctl kept only the last N entries after the cursor, and a restart
    note that came with other lines in one interval was skipped. The client's copy of the
    limit must be the API's; the following itself is checked in tests/vm/test_containers.py."""
    from kiln.host.api import containers as api_containers
    from kiln.host.cli import containers as cli_containers

    assert cli_containers.LOG_LINES == api_containers.LOG_LINES
