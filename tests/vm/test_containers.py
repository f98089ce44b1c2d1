"""VM: host, bootstrap and workload containers pulled from a real registry, `kiln exec` over mTLS.

One guest, three boots. docker-registry runs on the host's 127.0.0.1 (the session's
`oci_registry`, images built by `kiln oci build`) and the guest reaches it at 10.0.2.2,
over plain HTTP because its user data says so for that registry.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln import pki
from kiln.vm.qemu import Forward, Vm, free_port
from tests.conftest import Images, raw_copy
from tests.registry import OciRegistry, refusing_registry

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]


def b64(script: str) -> str:
    return base64.b64encode(script.encode()).decode()


class Host:
    """The guest as the workstation sees it: `kiln` over mTLS, the workload's forwarded port."""

    def __init__(self, vm: Vm, fleet: Path, api_port: int, web_port: int) -> None:
        self.vm, self.fleet, self.api_port, self.web_port = vm, fleet, api_port, web_port

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kiln.cli.main", "--endpoint", f"127.0.0.1:{self.api_port}",
                "--pki", str(self.fleet), *args]

    def kiln(self, *args: str, timeout: float = 180, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, check=False,
                              input=input)

    def ok(self, *args: str, timeout: float = 180) -> str:
        done = self.kiln(*args, timeout=timeout)
        assert done.returncode == 0, f"kiln {' '.join(args)}: {done.stderr}"
        return done.stdout

    def containers(self) -> dict[str, dict[str, Any]]:
        return {f"{e['kind']}:{e['name']}": e for e in json.loads(self.ok("containers", "--json"))}

    def until(self, what: str, cond: Callable[[], Any], timeout: float = 180) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = cond()
            except (OSError, AssertionError) as e:
                last = e
            else:
                if last:
                    return last
            time.sleep(2)
        raise AssertionError(f"timed out waiting for {what} (last: {last!r}); containers: {self.containers()}")

    def web(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/", timeout=5) as r:
            return str(r.read().decode())

    def tasks(self, runtime: str) -> str:
        return self.vm.check(f"ctr --address /run/{runtime}/containerd.sock -n kiln tasks ls")


@pytest.fixture
def refusing() -> Iterator[int]:
    with refusing_registry() as port:
        yield port


@contextlib.contextmanager
def ctrl_c_reaches_children() -> Iterator[None]:
    """A run started in the background (`nohup … &`, a CI script) ignores SIGINT, and an ignored
    signal stays ignored across exec: a child started then never sees the Ctrl-C a test sends
    it. A handler, unlike SIG_IGN, is reset by exec, so children started inside this block
    begin with SIGINT's default (Python's KeyboardInterrupt)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def lines_until(proc: subprocess.Popen[str], text: str, timeout: float) -> list[str]:
    """Lines `proc` prints until one contains `text`, it ends, or `timeout` passes (read in
    a thread: a stream that stays open but silent must not block the test)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout or ():
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if text in line:
            break
    return seen


def test_containers_from_user_data_exec_over_mtls_and_bootstrap_across_reboots(
    images: Images, boot: Callable[..., Vm], oci_registry: OciRegistry, refusing: int, tmp_path: Path
) -> None:
    build = images.get(debug_console=True)
    fleet = tmp_path / "pki"
    pki.init(fleet)
    reg = f"10.0.2.2:{oci_registry.port}"
    ref = {k: f"{reg}/{img.name}:{img.tag}" for k, img in oci_registry.images.items()}
    # The bootstrap container prepares what the workload serves, through the host's root.
    prepare = ("mkdir -p /.kiln/rootfs/local/www\n"
               "echo 'hello from a bootstrap container' > /.kiln/rootfs/local/www/index.html\n"
               "echo ran >> /.kiln/rootfs/local/bootstrap-runs\n"
               "echo 'prepared /local/www'\n")
    user_data = tmp_path / "user-data.toml"
    user_data.write_text(pki.user_data(fleet) + f"""
[settings.container-registry.mirrors]
"{reg}" = ["http://{reg}"]

[settings.host-containers.admin]
enabled = true
source = "{ref['admin']}"

[settings.bootstrap-containers.prepare]
source = "{ref['bootstrap']}"
mode = "once"
essential = true
user-data = "{b64(prepare)}"

[settings.containers.web]
image = "{ref['httpd']}"
restart = "always"
memory-limit = "64Mi"
cpus = 0.5
command = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
mounts = [{{ source = "/local/www", destination = "/www", read-only = true }}]
""")
    api_port, web_port = free_port(), free_port()
    disk = raw_copy(build.disk, tmp_path / "disk.img")
    vm = boot(disk, overlay=False, cpus=2, user_data=user_data,
              forwards=(Forward(api_port, 50000), Forward(web_port, 8080)))
    host = Host(vm, fleet, api_port, web_port)

    # --- boot 1: the bootstrap container runs before the ready line, then the rest start.
    vm.wait_for(r"kiln: bootstrap container 'prepare' finished", 420)
    vm.wait_ready(300)
    vm.wait_shell()
    assert host.until("the workload to serve", host.web) == "hello from a bootstrap container\n"
    running = host.until("admin and web running", lambda: (c := host.containers())["host:admin"]["state"] ==
                         "running" and c["workload:web"]["state"] == "running" and c)
    assert running["bootstrap:prepare"]["state"] == "exited" and running["bootstrap:prepare"]["mode"] == "off"
    assert json.loads(host.ok("settings", "get", "bootstrap-containers.prepare.mode", "--json")) == {
        "bootstrap-containers": {"prepare": {"mode": "off"}}}  # `once` flipped through the API

    # --- kiln exec from the workstation, over mutual TLS.
    assert host.ok("exec", "admin", "--", "cat", "/.kiln/rootfs/local/bootstrap-runs") == "ran\n"
    assert host.kiln("exec", "admin", "--", "sh", "-c", "exit 5").returncode == 5
    # sheltie: into PID 1's namespaces, a root shell on the host itself.
    assert host.ok("exec", "admin", "--", "sheltie", "cat", "/proc/1/comm").strip() == "systemd"
    mounts = host.ok("exec", "admin", "--", "sheltie", "cat", "/proc/self/mounts")
    assert re.search(r"^\S+ / erofs ro", mounts, re.M) and " /local " in mounts, mounts
    assert host.ok("exec", "admin", "--", "sheltie", "id", "-u").strip() == "0"
    # The host's kiln client, inside the admin container, on the API socket it was given.
    got = host.ok("exec", "admin", "--", "kiln", "settings", "get", "settings.bootstrap-containers.prepare.mode")
    assert got.strip() == 'settings.bootstrap-containers.prepare.mode = "off"'
    # stdin goes through too
    assert host.kiln("exec", "admin", "--", "wc", "-c", input="x" * 100000).stdout.strip() == "100000"

    # --- the workload comes back after its process dies.
    pid = re.search(r"^workload-web\s+(\d+)\s+RUNNING", host.tasks("containerd"), re.M)
    assert pid, host.tasks("containerd")
    assert host.containers()["workload:web"]["pid"] == int(pid.group(1))  # what `kiln containers` shows
    group = vm.check(f"cat /proc/{pid.group(1)}/cgroup").strip().removeprefix("0::")  # cgroup v2
    limits = vm.check(f"cat /sys/fs/cgroup{group}/memory.max /sys/fs/cgroup{group}/cpu.max")
    assert limits == f"{64 << 20}\n50000 100000\n", (group, limits)
    vm.check(f"kill -9 {pid.group(1)}")
    host.until("a restart", lambda: host.containers()["workload:web"]["restarts"] >= 1)
    assert host.until("serving again", host.web) == "hello from a bootstrap container\n"
    # kiln logs: the container's journal entries, the supervisor's restart note included, over mTLS.
    logs = host.ok("logs", "web", "-n", "50")
    assert re.search(r"^workload-web: exited with status 137; restart 1 in 1 s$", logs, re.M), logs
    assert "prepared /local/www" in host.ok("logs", "prepare")  # what the bootstrap container printed
    entries = [json.loads(line) for line in host.ok("logs", "web", "-n", "1", "--json").splitlines()]
    assert len(entries) == 1 and entries[0]["time"] > 1.7e9
    # kiln logs -f: what happens next arrives while it follows; Ctrl-C ends it.
    with ctrl_c_reaches_children():
        follow = subprocess.Popen(host.argv("logs", "-f", "-n", "1", "web"), stdout=subprocess.PIPE, text=True)
    with follow:
        try:
            assert follow.stdout is not None
            first = follow.stdout.readline()  # the last entry so far: following has begun
            assert first.strip(), first
            again = re.search(r"^workload-web\s+(\d+)\s+RUNNING", host.tasks("containerd"), re.M)
            assert again and again.group(1) != pid.group(1)
            vm.check(f"kill -9 {again.group(1)}")
            shown = lines_until(follow, "exited with status 137; restart 2 in", 120)
            assert shown[-1:] and "restart 2 in" in shown[-1], (
                f"kiln logs -f did not show the second restart in 120 s; it showed {[first, *shown]}; the "
                f"journal: {vm.sh('journalctl -n 30 -t workload-web; journalctl -n 40 -u kiln-agent')[1]}")
            follow.send_signal(signal.SIGINT)
            assert follow.wait(30) == 0
        except BaseException:
            follow.kill()  # a stream that follows never ends: Popen's exit would wait for it forever
            raise
    assert host.until("serving once more", host.web) == "hello from a bootstrap container\n"

    # --- workload mounts stay in /local (real ctr and runc).
    # The mount syntax: a source that would add `src=/` to ctr's --mount is refused by the API.
    evil = host.kiln("settings", "set",
                     'containers.evil.mounts=[{"source": "/local/x,src=/", "destination": "/host"}]')
    assert evil.returncode == 1 and "settings.containers.evil.mounts[0].source" in evil.stderr, evil.stderr
    # A workload plants symlinks in a directory it shares; another workload's sources through
    # them are refused, and nothing is made outside /local through them.
    host.ok("settings", "set", f"containers.planter.image={ref['httpd']}", "containers.planter.restart=never",
            'containers.planter.command=["/bin/sh", "-c", '
            '"ln -s /etc /shared/etc; ln -s / /shared/root; exec sleep 3600"]',
            'containers.planter.mounts=[{"source": "/local/shared", "destination": "/shared"}]')
    host.until("the links", lambda: vm.sh("readlink /local/shared/etc /local/shared/root")[1].split() == ["/etc", "/"])
    host.ok("settings", "set", f"containers.victim.image={ref['httpd']}", f"containers.nosy.image={ref['httpd']}",
            'containers.victim.command=["/bin/sh", "-c", "cat /data/hostname; exec sleep 3600"]',
            'containers.victim.mounts=[{"source": "/local/shared/etc", "destination": "/data"}]',
            'containers.nosy.command=["/bin/sh", "-c", "ls /data; exec sleep 3600"]',
            'containers.nosy.mounts=[{"source": "/local/shared/root/etc/kiln-made-this", "destination": "/data"}]')
    for name in ("victim", "nosy"):
        failed = host.until(f"{name} to be refused",
                            lambda n=name: (e := host.containers().get(f"workload:{n}", {})).get("state") == "failed"
                            and e)
        assert "symlink" in failed["detail"], failed
    tasks = host.tasks("containerd")
    assert "workload-planter" in tasks and "workload-victim" not in tasks and "workload-nosy" not in tasks, tasks
    assert vm.check("test -e /etc/kiln-made-this && echo made || echo none").strip() == "none"
    host.ok("settings", "unset", "containers.planter", "containers.victim", "containers.nosy")

    # --- bad input: clear errors through the API, nothing else disturbed.
    bad = host.kiln("settings", "set", "containers.bad.image=Not An Image")
    assert bad.returncode == 1 and "400" in bad.stderr and "settings.containers.bad.image" in bad.stderr
    host.ok("settings", "set", f"containers.ghost.image={reg}/kiln/nope:1",
            f"containers.denied.image=10.0.2.2:{refusing}/kiln/httpd:1",
            f'container-registry.mirrors."10.0.2.2:{refusing}"=["http://10.0.2.2:{refusing}"]')
    ghost = host.until("the missing image to fail", lambda: (e := host.containers()["workload:ghost"])["state"]
                       == "failed" and e)
    assert "kiln/nope:1" in ghost["detail"] and "not found" in ghost["detail"], ghost
    denied = host.until("the refusal", lambda: (e := host.containers()["workload:denied"])["state"] == "failed" and e)
    assert "403" in denied["detail"], denied
    assert host.web() == "hello from a bootstrap container\n" and host.containers()["host:admin"]["state"] == "running"
    host.ok("settings", "unset", "containers.ghost", "containers.denied")

    # --- removed from the settings: gone. Disabled: stopped.
    host.ok("settings", "unset", "containers.web")
    host.until("the workload to stop", lambda: "workload-web" not in host.tasks("containerd"))
    with pytest.raises(OSError):
        host.web()
    host.ok("settings", "set", "host-containers.admin.enabled=false")
    host.until("admin to stop", lambda: "host-admin" not in host.tasks("host-containerd"))
    refused = host.kiln("exec", "admin", "--", "true")
    assert refused.returncode == 1 and "is not running" in refused.stderr

    # --- an essential bootstrap container that fails: the host never reports ready.
    fail = b64("echo 'cannot prepare this host' >&2\nexit 3\n")
    host.ok("settings", "set", f"bootstrap-containers.fail.source={ref['bootstrap']}",
            "bootstrap-containers.fail.mode=always", "bootstrap-containers.fail.essential=true",
            f"bootstrap-containers.fail.user-data={fail}")
    vm.mark()
    host.ok("reboot")
    vm.wait_for(r"kiln: essential bootstrap container 'fail' failed: exited with status 3; "
                r"this host will not report ready", 420)
    vm.wait_for(r"kiln: not ready: .*kiln-ready\.target", 300)
    vm.wait_shell()
    assert "kiln: ready" not in vm.output[vm.mark():]
    assert vm.check("cat /local/bootstrap-runs") == "ran\n"  # `once` did not run again
    assert vm.check("systemctl is-active kiln-ready.target || true").strip() != "active"

    # --- fixed through the API, the next boot is ready; still only one run of `once`.
    host.ok("settings", "unset", "bootstrap-containers.fail")
    vm.mark()
    host.ok("reboot")
    vm.wait_ready(420)
    vm.wait_shell()
    assert vm.check("cat /local/bootstrap-runs") == "ran\n"
    assert "host-admin" not in host.tasks("host-containerd") if vm.check(
        "test -S /run/host-containerd/containerd.sock && echo y || true").strip() == "y" else True
