#!/usr/bin/env python3
"""Containers in a guest (TCG): settings → serving, the admin image's pull, memory of the
supervisor, of each container's logger and of the second containerd.

One guest (the default variant built with --debug-console, or `--image`), booted with
`kiln.vm.qemu.Vm` / `VmConfig(accel="tcg", cpus=2, cold_reboot=True)` and user data that
turns on the mutual-TLS API (`kiln.pki.user_data`), names the admin image and makes the
workstation's docker-registry (127.0.0.1, reached as 10.0.2.2) a plain-HTTP mirror of itself.
Kiln's admin and httpd images are built with `kiln oci build` and pushed there first.
Side by side in one run:

1. settings → serving (`--runs`, default 3, interleaved with the floor): from the moment
   `kiln --endpoint … settings set containers.wN.image=REF containers.wN.command=[httpd … -p P]`
   is started on the workstation until HTTP GET on P's forwarded port returns the image's
   page. The first run pulls the httpd image; the later ones find it present. The floor is
   what a user would type instead, in the guest's shell, with the image already pulled:
   `ctr --address /run/containerd/containerd.sock -n bench run -d --net-host REF fN
   /bin/httpd -f -p P2 -h /www`, timed from the moment the line is sent to the serial
   console until the page is served. Kiln's time is split on one clock (the guest's
   monotonic clock, offset to the workstation's by a serial round trip): the supervisor
   (a thread of kiln-agent.service, woken by the settings' restart command) writing the
   container's status `starting`, `pulling` (first use of the image only), containerd's
   shim start (its journal), the container process's start (/proc/PID/stat), status
   `running` (the supervisor holds a pidfd on it) and the first HTTP 200. The status files
   and hosts directories are watched from inside the guest with inotify (a small Python
   process that sleeps in read(2) between events).
2. admin: `settings set host-containers.admin.enabled=true` until `GET /containers` (what
   `kiln containers` shows) says running, polled every 0.5 s in process, split the same
   way, with the host containerd's own start (it starts only when something needs it).
   Then the admin image's pull on the host containerd, `--pull-runs` times (default 3):
   with admin disabled and every copy removed (`ctr images rm --sync`: containerd's
   garbage collection has run, no blob left), `ctr … -n bench images pull --hosts-dir DIR
   REF` (cold), the same again (already present), and split into `ctr content fetch`
   (download) + `ctr images pull` (unpack). The image's compressed and uncompressed size
   from its OCI layout, and its size on the guest's disk.
3. memory: /proc/meminfo and the cgroups (memory.current, anon/file) of containerd.service,
   kiln-host-containerd.service, kiln-agent.service (where the supervisor runs) and every
   container, with Rss, Pss, USS (private pages) and anonymous memory of each process
   (smaps_rollup): before and after enabling admin, and with the workloads and the floor's
   containers running. Kiln's memory per container is its logger (2 × `cat`, started
   by the shim, in containerd's cgroup) plus the supervisor's growth per container. Then
   the CPU the same units, processes and containers use over 30 idle seconds (cpu.stat,
   /proc/PID/stat), in % of one vCPU.

Attribution probes in the idle guest (median of 3) time the settings' restart command (a
reload of the supervisor with nothing to change), one `ctr` call and the `ctr tasks ls` the
supervisor makes after each start; on the workstation, a `kiln settings set` of a key that
starts no container.

Writes bench/results/containers.json; the serial console and the guest journal go to
bench/.cache/logs/containers-*.txt. Run as root (kiln build).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B

from kiln import pki
from kiln.vm.qemu import Forward, Vm, VmConfig, free_port

KILN = Path(sys.executable).parent / "kiln"
API_PORT = 50000
WORKLOAD_SOCK = "/run/containerd/containerd.sock"
HOST_SOCK = "/run/host-containerd/containerd.sock"
HOST_ROOT = "/var/lib/host-containerd"
HOSTS_DIR = "/tmp/bench-hosts"  # the guest's registry hosts directory for the ctr commands typed here
BOOT_TIMEOUT = 600.0
SERVE_TIMEOUT = 300.0
POLL_S = 0.05  # HTTP polling of the forwarded port
LIST_POLL_S = 0.5  # GET /containers polling
PAGE = (B.REPO / "variants" / "containers" / "httpd" / "index.html").read_text()
LOGS = B.CACHE / "logs"

# ------------------------------------------------------------------ guest scripts (python3 -I in the guest)
TRACER = r"""
import ctypes, json, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
IN_MOVED_TO, IN_CREATE, IN_ISDIR = 0x80, 0x100, 0x40000000
d = "/run/kiln/containers"
os.makedirs(d, exist_ok=True)
fd = libc.inotify_init1(0)
if fd < 0 or libc.inotify_add_watch(fd, d.encode(), IN_MOVED_TO | IN_CREATE) < 0:
    sys.exit("inotify failed")
out = open(sys.argv[1], "a", buffering=1)
print(json.dumps({"t": time.monotonic(), "name": "tracer-started"}), file=out)
while True:
    buf = os.read(fd, 65536)
    now = time.monotonic()
    i = 0
    while i < len(buf):
        _wd, mask, _cookie, n = struct.unpack_from("iIII", buf, i)
        name = buf[i + 16:i + 16 + n].rstrip(b"\0").decode(errors="replace")
        i += 16 + n
        if name.startswith("."):
            continue
        ev = {"t": now, "name": name}
        if mask & IN_MOVED_TO and name.endswith(".json"):
            try:
                with open(os.path.join(d, name)) as f:
                    st = json.load(f)
                ev["state"] = st.get("state")
                ev["since_mono"] = st.get("since", 0) - (time.time() - time.monotonic())
            except (OSError, ValueError):
                pass
        elif mask & IN_CREATE and mask & IN_ISDIR:
            ev["dir"] = True
        else:
            continue
        print(json.dumps(ev), file=out)
"""

TIMER = r"""
import json, subprocess, sys, time
t0 = time.monotonic()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
print(json.dumps({"s": time.monotonic() - t0, "rc": p.returncode, "err": p.stderr.decode()[-300:]}))
"""

# Unit timestamps, the unit's processes and a container's process, all on the guest's
# monotonic clock (process start times are in clock ticks since boot).
FACTS = r"""
import base64, json, os, subprocess, sys
q = json.loads(base64.b64decode(sys.argv[1]))
TCK = os.sysconf("SC_CLK_TCK")
def start_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return int(s[s.rindex(")") + 2:].split()[19]) / TCK
def argv(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
def show(unit):
    props = ["InactiveExitTimestampMonotonic", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic",
             "MainPID", "ControlGroup", "ActiveState"]
    out = subprocess.run(["systemctl", "show", unit, *[f"-p{p}" for p in props]], capture_output=True,
                         text=True).stdout
    v = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    r = {k: (int(v[k]) / 1e6 if v.get(k, "0").isdigit() and int(v[k]) else None) for k in props[:3]}
    r["state"] = v.get("ActiveState")
    procs = []
    cg = v.get("ControlGroup")
    if cg:
        for dirpath, _dirs, _files in os.walk("/sys/fs/cgroup" + cg):
            try:
                pids = open(os.path.join(dirpath, "cgroup.procs")).read().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    procs.append({"pid": int(pid), "argv": argv(pid)[:6], "start": start_of(pid)})
                except OSError:
                    pass
    r["procs"] = procs
    return r
out = {"units": {u: show(u) for u in q.get("units", [])}}
if q.get("cid"):
    ls = subprocess.run(["ctr", "--address", q["sock"], "-n", q["ns"], "tasks", "ls"], capture_output=True,
                        text=True).stdout
    for line in ls.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == q["cid"] and parts[1].isdigit():
            out["task"] = {"pid": int(parts[1]), "status": parts[2], "start": start_of(parts[1])}
with open("/proc/uptime") as f:
    out["now"] = float(f.read().split()[0])
print(json.dumps(out))
"""

# Memory: /proc/meminfo, each unit's cgroup and processes, every container's cgroup.
MEMORY = r"""
import json, os, subprocess, sys
def kb(line):
    return int(line.split()[1]) * 1024
def meminfo():
    return {l.split(":")[0]: kb(l) for l in open("/proc/meminfo") if l.split()[-1] == "kB"}
def proc(pid):
    r = {"pid": int(pid)}
    try:
        raw = open(f"/proc/{pid}/cmdline", "rb").read()
        r["argv"] = [a.decode(errors="replace") for a in raw.split(b"\0") if a][:4]
        r["uss"] = 0
        for l in open(f"/proc/{pid}/smaps_rollup"):  # exact, unlike VmRSS's batched counters
            if l.startswith("Rss:"):
                r["rss"] = kb(l)
            elif l.startswith("Pss:"):
                r["pss"] = kb(l)
            elif l.startswith(("Private_Clean:", "Private_Dirty:")):
                r["uss"] += kb(l)
            elif l.startswith("Anonymous:"):
                r["anon"] = kb(l)
    except OSError:
        pass
    return r
def cgroup(path):
    d = "/sys/fs/cgroup" + path
    try:
        r = {"path": path, "current": int(open(d + "/memory.current").read())}
    except OSError:
        return None
    stat = dict(l.split() for l in open(d + "/memory.stat"))
    r |= {k: int(stat[k]) for k in ("anon", "file", "kernel", "shmem", "sock") if k in stat}
    procs = []
    for dirpath, _dirs, _files in os.walk(d):
        try:
            procs += open(os.path.join(dirpath, "cgroup.procs")).read().split()
        except OSError:
            pass
    r["procs"] = [proc(p) for p in procs]
    return r
units = {}
for u in sys.argv[1:]:
    v = dict(l.split("=", 1) for l in subprocess.run(["systemctl", "show", u, "-pControlGroup", "-pActiveState",
             "-pMemoryCurrent"], capture_output=True, text=True).stdout.splitlines() if "=" in l)
    units[u] = {"state": v.get("ActiveState"), "memory_current": int(v["MemoryCurrent"])
                if v.get("MemoryCurrent", "").isdigit() else None,
                "cgroup": cgroup(v["ControlGroup"]) if v.get("ControlGroup") else None}
containers = {}
for sock, label in (("/run/containerd/containerd.sock", "workload"), ("/run/host-containerd/containerd.sock", "host")):
    if not os.path.exists(sock):
        continue
    nss = subprocess.run(["ctr", "--address", sock, "namespaces", "ls", "-q"], capture_output=True,
                         text=True).stdout.split()
    for ns in nss:
        ls = subprocess.run(["ctr", "--address", sock, "-n", ns, "tasks", "ls"], capture_output=True, text=True).stdout
        for line in ls.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3 and parts[1].isdigit() and parts[2] == "RUNNING":
                cg = open(f"/proc/{parts[1]}/cgroup").read().strip().split("::", 1)[-1]
                containers[f"{label}/{ns}/{parts[0]}"] = cgroup(cg)
print(json.dumps({"meminfo": meminfo(), "units": units, "containers": containers}))
"""

# CPU time so far of units (and their processes) and of container cgroups: no ctr call, so
# containerd is not woken by the measurement itself.
CPU = r"""
import json, os, subprocess, sys
TCK = os.sysconf("SC_CLK_TCK")
def usage(path):
    d = "/sys/fs/cgroup" + path
    try:
        stat = dict(l.split() for l in open(d + "/cpu.stat"))
    except OSError:
        return None
    procs = {}
    for dirpath, _dirs, _files in os.walk(d):
        try:
            pids = open(os.path.join(dirpath, "cgroup.procs")).read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                s = open(f"/proc/{pid}/stat").read()
                f = s[s.rindex(")") + 2:].split()
                argv = [a.decode(errors="replace") for a in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0") if a]
                procs[pid] = {"argv": argv[:4], "cpu_s": (int(f[11]) + int(f[12])) / TCK}
            except OSError:
                pass
    return {"usage_s": int(stat["usage_usec"]) / 1e6, "procs": procs}
out = {}
for name in sys.argv[1:]:
    if name.startswith("/"):
        out[name] = usage(name)
        continue
    cg = subprocess.run(["systemctl", "show", name, "-pControlGroup", "--value"], capture_output=True,
                        text=True).stdout.strip()
    out[name] = usage(cg) if cg else None
print(json.dumps({"now": float(open("/proc/uptime").read().split()[0]), "cgroups": out}))
"""

SCRIPTS = {"tracer": TRACER, "timer": TIMER, "facts": FACTS, "memory": MEMORY, "cpu": CPU}
IDLE_S = 30.0  # the window idle CPU is measured over
# The supervisor is a thread of the host agent: its memory is the agent's, and its growth per
# container is the agent's growth. (The results' keys still say "supervisor (kiln-containers
# .service)" for the run made while it was a service of its own; bench/report.py reads them.)
SUPERVISOR = "kiln-agent.service"
# The units before and after the host agent (a unit that does not exist is left out).
SERVICES = ("containerd.service", "kiln-host-containerd.service", "kiln-containers.service",
            "kiln-apiserver.service", "kiln-api-remote.service", SUPERVISOR)


# ------------------------------------------------------------------ helpers
def serving(port: int) -> bool:
    """GET / on the forwarded port returns the httpd image's page (no proxy, a new connection)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        return r.status == 200 and r.read().decode() == PAGE
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def span(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def med_key(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    return B.median([r.get(key) for r in rows])


class Guest:
    """The booted guest: its debug shell, its clock, and `kiln` over mutual TLS from here."""

    def __init__(self, vm: Vm, fleet: Path, api_port: int) -> None:
        self.vm, self.fleet, self.api_port = vm, fleet, api_port
        self.seq = 0
        self.installed: set[str] = set()
        from kiln.host.api.client import Client

        self.client = Client.remote("127.0.0.1", api_port, pki.client_context(fleet))

    def offset(self) -> float:
        """guest monotonic − workstation monotonic, from the serial round trip with the
        smallest delay of five (/proc/uptime: 10 ms steps; no suspend, so it is CLOCK_MONOTONIC)."""
        best: tuple[float, float] | None = None
        for _ in range(5):
            self.seq += 1
            self.vm.mark()
            t0 = time.monotonic()
            self.vm.send(f"read up _ < /proc/uptime; echo CK$((0+{self.seq}))=$up\n")
            m = self.vm.wait_for(rf"CK{self.seq}=([\d.]+)\n", 30)  # \n: all of the number
            t1 = time.monotonic()
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, float(m.group(1)) - (t0 + t1) / 2)
        assert best is not None
        return best[1]

    def install(self, name: str) -> None:
        if name not in self.installed:
            data, dest = b64(SCRIPTS[name]), f"/tmp/bench-{name}"
            self.vm.check(f": > {dest}.b64")
            for i in range(0, len(data), 1024):  # a terminal line holds at most 4095 characters
                self.vm.check(f"printf %s {data[i:i + 1024]} >> {dest}.b64")
            self.vm.check(f"base64 -d {dest}.b64 > {dest}.py")
            self.installed.add(name)

    def py(self, name: str, *args: str, timeout: float = 180) -> Any:
        self.install(name)
        out = self.vm.check(f"python3 -I /tmp/bench-{name}.py {' '.join(args)}", timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def facts(self, units: Sequence[str] = (), sock: str = "", ns: str = "", cid: str = "") -> dict[str, Any]:
        q = {"units": list(units), "sock": sock, "ns": ns, "cid": cid}
        got: dict[str, Any] = self.py("facts", b64(json.dumps(q)))
        return got

    def timed(self, command: str, timeout: float = 600) -> dict[str, Any]:
        """One command timed inside the guest (the timer's own interpreter start is not counted)."""
        got: dict[str, Any] = self.py("timer", "sh", "-c", json.dumps(command), timeout=timeout)
        return got

    def kiln_argv(self, *args: str) -> list[str]:
        return [str(KILN), "--endpoint", f"127.0.0.1:{self.api_port}", "--pki", str(self.fleet), *args]

    def kiln(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run(self.kiln_argv(*args), capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"kiln {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done.stdout

    def containers(self) -> dict[str, dict[str, Any]]:
        listed: list[dict[str, Any]] = self.client.request("GET", "/containers")
        return {f"{e['kind']}:{e['name']}": e for e in listed}

    def trace(self) -> list[dict[str, Any]]:
        out = self.vm.check("cat /tmp/bench-trace.log")
        events = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events

    def shims(self) -> dict[str, float]:
        """containerd's `starting signal loop` (a shim is up) per namespace/container id, guest monotonic."""
        return shim_starts(self.vm.check(
            "journalctl -o short-monotonic --no-pager -u containerd.service -u kiln-host-containerd.service "
            "| grep 'starting signal loop' || true", timeout=120))

    def journal(self) -> str:
        units = self.vm.check("journalctl -o short-monotonic --no-pager -u kiln-containers.service "
                              "-u containerd.service -u kiln-host-containerd.service -u kiln-apiserver.service "
                              "-u kiln-api-remote.service -u kiln-agent.service", timeout=120)
        # the containers' own entries (output and the supervisor's lines), by identifier
        ids = self.vm.check("journalctl -o short-monotonic --no-pager -t host-admin "
                            "-t workload-w1 -t workload-w2 -t workload-w3", timeout=120)
        return units + ids


class Waiter(threading.Thread):
    """Runs a command on the workstation and records when it ended."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__(daemon=True)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.ended: float | None = None
        self.out = self.err = ""

    def run(self) -> None:
        self.out, self.err = self.proc.communicate()
        self.ended = time.monotonic()


def shim_starts(journal: str) -> dict[str, float]:
    """containerd's `starting signal loop` (a shim is up) per namespace/container id, guest monotonic."""
    found: dict[str, float] = {}
    rx = re.compile(r"^\[\s*([\d.]+)\].*starting signal loop.*io\.containerd\.runtime\.v2\.task/([^/\s]+)/([^\s\"]+)")
    for line in journal.splitlines():
        m = rx.search(line)
        if m:
            found.setdefault(f"{m.group(2)}/{m.group(3)}", float(m.group(1)))
    return found


# ------------------------------------------------------------------ 1. settings → serving
def timeline(t0: float, off: float, facts: dict[str, Any], events: list[dict[str, Any]], cid: str,
             shim: float | None) -> dict[str, float | None]:
    """Guest events of one Kiln container, in seconds after `t0` (workstation monotonic)."""

    def rel(guest_t: float | None) -> float | None:
        return None if guest_t is None else guest_t - off - t0

    mine = [e for e in events if e["name"] in (f"{cid}.json", f"hosts-{cid}") and e["t"] - off >= t0 - 1]

    def first(name: str, state: str | None = None) -> float | None:
        for e in mine:
            if e["name"] == name and (state is None or e.get("state") == state):
                return float(e.get("since_mono") or e["t"])
        return None

    return {
        "status_starting": rel(first(f"{cid}.json", "starting")),  # the supervisor's plan started it
        "status_pulling": rel(first(f"{cid}.json", "pulling")),  # first use of the image only
        "pull_start": rel(first(f"hosts-{cid}")),
        "shim_start": rel(shim),
        "task_start": rel(facts.get("task", {}).get("start")),
        "status_running": rel(first(f"{cid}.json", "running")),  # pid read, pidfd open, task listed
    }


KILN_SEGMENTS = (
    ("CLI start + API apply + reload, until the supervisor starts it", None, "status_starting"),
    ("supervisor: prepare, ctr run -d (pull on first use) → shim up", "status_starting", "shim_start"),
    ("shim up → container process started", "shim_start", "task_start"),
    ("process start → first HTTP 200 seen", "task_start", "serving"),
)


def segments(t: dict[str, float | None], names: Sequence[tuple[str, str | None, str]]) -> dict[str, float | None]:
    out = {}
    for label, a, b in names:
        start = 0.0 if a is None else t.get(a)
        out[label] = span(start, t.get(b))
    return out


def wait_serving(port: int, t0: float, timeout: float = SERVE_TIMEOUT) -> float:
    while True:
        if serving(port):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"nothing served on 127.0.0.1:{port} within {timeout:.0f} s")
        time.sleep(POLL_S)


def kiln_workload(g: Guest, name: str, guest_port: int, host_port: int, ref: str) -> dict[str, Any]:
    off = g.offset()
    command = json.dumps(["/bin/httpd", "-f", "-p", str(guest_port), "-h", "/www"], separators=(",", ":"))
    argv = g.kiln_argv("settings", "set", f"containers.{name}.image={ref}", f"containers.{name}.command={command}")
    t0 = time.monotonic()
    w = Waiter(argv)
    w.start()
    served = wait_serving(host_port, t0)
    w.join(120)
    if w.proc.returncode != 0:
        raise RuntimeError(f"kiln settings set failed: {w.err.strip()[-2000:]}")
    cid = f"workload-{name}"
    facts = g.facts([], WORKLOAD_SOCK, "kiln", cid)
    t = timeline(t0, off, facts, g.trace(), cid, g.shims().get(f"kiln/{cid}"))
    t["serving"] = served
    t["cli_returned"] = span(t0, w.ended)
    return {"name": name, "port": guest_port, "served_s": served, "cli_s": t["cli_returned"], "events_s": t,
            "segments_s": segments(t, KILN_SEGMENTS), "clock_offset_s": off}


def floor_workload(g: Guest, name: str, guest_port: int, host_port: int, ref: str) -> dict[str, Any]:
    off = g.offset()
    g.seq += 1
    n = g.seq
    g.vm.mark()
    ended: list[float] = []

    def watch() -> None:
        g.vm.wait_for(rf"FL{n}=(\d+)", SERVE_TIMEOUT)
        ended.append(time.monotonic())

    watcher = threading.Thread(target=watch, daemon=True)
    t0 = time.monotonic()
    watcher.start()
    g.vm.send(f"ctr --address {WORKLOAD_SOCK} -n bench run -d --net-host {ref} {name} "
              f"/bin/httpd -f -p {guest_port} -h /www; echo FL$((0+{n}))=$?\n")
    served = wait_serving(host_port, t0)
    watcher.join(SERVE_TIMEOUT)
    facts = g.facts([], WORKLOAD_SOCK, "bench", name)
    task = facts.get("task", {}).get("start")
    shim = g.shims().get(f"bench/{name}")
    t = {"shim_start": None if shim is None else shim - off - t0,
         "task_start": None if task is None else task - off - t0,
         "ctr_returned": ended[0] - t0 if ended else None, "serving": served}
    return {"name": name, "port": guest_port, "served_s": served, "events_s": t, "clock_offset_s": off,
            "segments_s": segments(t, (("command sent → shim up", None, "shim_start"),
                                       ("shim up → container process started", "shim_start", "task_start"),
                                       ("process start → first HTTP 200 seen", "task_start", "serving")))}


# ------------------------------------------------------------------ 2. admin
ADMIN_SEGMENTS = (
    ("CLI start + API apply + reload, until the supervisor starts it", None, "status_starting"),
    ("supervisor: host containerd started (systemctl start), prepare, ctr run -d", "status_starting",
     "status_pulling"),
    ("ctr images pull (cold) + ctr run -d → shim up", "status_pulling", "shim_start"),
    ("shim up → container init started", "shim_start", "task_start"),
)


def admin_enable(g: Guest) -> dict[str, Any]:
    off = g.offset()
    t0 = time.monotonic()
    w = Waiter(g.kiln_argv("settings", "set", "host-containers.admin.enabled=true"))
    w.start()
    listed = None
    polls = 0
    while listed is None:
        time.sleep(LIST_POLL_S)
        polls += 1
        try:
            if g.containers().get("host:admin", {}).get("state") == "running":
                listed = time.monotonic() - t0
        except Exception as e:  # the API answers again in a moment
            B.log(f"GET /containers: {e}")
        if time.monotonic() - t0 > SERVE_TIMEOUT:
            raise TimeoutError(f"admin not running after {SERVE_TIMEOUT:.0f} s: {g.containers()}")
    w.join(120)
    cid = "host-admin"
    facts: dict[str, Any] = {}
    for _ in range(30):  # the task's start time comes from ctr: wait until it lists it
        facts = g.facts(["kiln-host-containerd.service"], HOST_SOCK, "kiln", cid)
        if "task" in facts:
            break
        time.sleep(1)
    t = timeline(t0, off, facts, g.trace(), cid, g.shims().get(f"kiln/{cid}"))
    hc = facts["units"].get("kiln-host-containerd.service", {})
    t["host_containerd_start"] = None if hc.get("InactiveExitTimestampMonotonic") is None else (
        hc["InactiveExitTimestampMonotonic"] - off - t0)
    t["host_containerd_ready"] = None if hc.get("ActiveEnterTimestampMonotonic") is None else (
        hc["ActiveEnterTimestampMonotonic"] - off - t0)
    t["listed_running"] = listed
    t["cli_returned"] = span(t0, w.ended)
    return {"listed_running_s": listed, "task_started_s": t["task_start"], "cli_s": t["cli_returned"],
            "polls": polls, "events_s": t, "segments_s": segments(t, ADMIN_SEGMENTS),
            "host_containerd_start_s": span(t["host_containerd_start"], t["host_containerd_ready"]),
            "clock_offset_s": off}


def blob_count(g: Guest) -> int:
    out = g.vm.check(f"ls {HOST_ROOT}/io.containerd.content.v1.content/blobs/sha256 2>/dev/null | wc -l")
    return int(out.strip() or 0)


def admin_pulls(g: Guest, ref: str, runs: int) -> dict[str, Any]:
    """Cold and warm pulls of the admin image on the host containerd (admin disabled, image removed)."""
    g.kiln("settings", "set", "host-containers.admin.enabled=false")
    deadline = time.monotonic() + 120
    while "host-admin" in g.vm.check(f"ctr --address {HOST_SOCK} -n kiln tasks ls"):
        if time.monotonic() > deadline:
            raise TimeoutError("admin did not stop")
        time.sleep(1)
    base = f"ctr --address {HOST_SOCK} -n bench"
    g.vm.check(f"ctr --address {HOST_SOCK} -n kiln images rm --sync {ref} || true")
    rows: list[dict[str, Any]] = []
    disk: dict[str, Any] = {}
    for i in range(runs):
        B.log(f"admin pull {i + 1}/{runs}")
        g.vm.check(f"{base} images rm --sync {ref} >/dev/null 2>&1 || true")
        row: dict[str, Any] = {"blobs_before": blob_count(g)}
        row["cold"] = g.timed(f"{base} images pull --hosts-dir {HOSTS_DIR} {ref}")
        if i == 0:
            disk = {
                "ctr_images_ls": g.vm.check(f"{base} images ls"),
                "du_kib": g.vm.check(f"du -sk {HOST_ROOT}/io.containerd.content.v1.content "
                                     f"{HOST_ROOT}/io.containerd.snapshotter.v1.overlayfs"),
            }
        row["present"] = g.timed(f"{base} images pull --hosts-dir {HOSTS_DIR} {ref}")
        g.vm.check(f"{base} images rm --sync {ref} >/dev/null")
        row["blobs_after_rm"] = blob_count(g)
        row["fetch"] = g.timed(f"{base} content fetch --hosts-dir {HOSTS_DIR} {ref}")
        row["unpack"] = g.timed(f"{base} images pull --hosts-dir {HOSTS_DIR} {ref}")
        g.vm.check(f"{base} images rm --sync {ref} >/dev/null")
        rows.append(row)
    for r in rows:
        for k in ("cold", "present"):
            if r[k]["rc"] != 0:
                raise RuntimeError(f"admin pull ({k}) failed: {r[k]['err']}")
    med = {k: B.median([r[k]["s"] for r in rows if r[k]["rc"] == 0]) for k in ("cold", "present", "fetch", "unpack")}
    return {"runs": rows, "median_s": med, "on_disk": disk}


# ------------------------------------------------------------------ 3. memory
MEASURES = ("rss", "pss", "uss", "anon")


def by_program(procs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """RSS, PSS, USS (private pages: what exiting would free) and anonymous memory summed per program
    (argv[0]'s base name; `python3 -m X` as X)."""
    out: dict[str, dict[str, int]] = {}
    for p in procs:
        argv = p.get("argv") or ["?"]
        name = argv[0].rsplit("/", 1)[-1]
        if name.startswith("python3") and "-m" in argv[:-1]:
            name = argv[argv.index("-m") + 1]
        e = out.setdefault(name, {"count": 0, **dict.fromkeys(MEASURES, 0)})
        e["count"] += 1
        for k in MEASURES:
            e[k] += p.get(k, 0)
    return out


def summarize_memory(snap: dict[str, Any]) -> dict[str, Any]:
    """The numbers the report uses, from one MEMORY snapshot."""
    mi = snap["meminfo"]
    used = mi["MemTotal"] - mi["MemFree"] - mi["Buffers"] - mi["Cached"] - mi.get("SReclaimable", 0)

    def unit(u: str) -> dict[str, Any] | None:
        e = snap["units"].get(u)
        if not e or not e.get("cgroup"):
            return None
        cg = e["cgroup"]
        procs = cg["procs"]
        return {**{k: sum(p.get(k, 0) for p in procs) for k in MEASURES},
                "memory_current": e["memory_current"], "anon": cg.get("anon"), "file": cg.get("file"),
                "by_program": by_program(procs),
                "shims": [{k: p.get(k) for k in MEASURES} for p in procs
                          if (p.get("argv") or [""])[0].endswith("containerd-shim-runc-v2")],
                "processes": [{"argv": p.get("argv"), **{k: p.get(k) for k in MEASURES}} for p in procs]}

    units = {u: unit(u) for u in snap["units"]}
    containers = {k: None if v is None else {"memory_current": v["current"], "anon": v.get("anon"),
                                             "file": v.get("file")}
                  for k, v in snap["containers"].items()}
    return {"used": used, "available": mi["MemAvailable"], "total": mi["MemTotal"], "units": units,
            "containers": containers}


def program(unit: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    return None if unit is None else unit["by_program"].get(name)


def median_of(entries: Sequence[dict[str, Any] | None], keys: Sequence[str]) -> dict[str, float | None]:
    return {k: B.median([e.get(k) for e in entries if e]) for k in keys}


def loggers(unit: dict[str, Any] | None) -> dict[str, Any] | None:
    """The containers' loggers in a containerd's cgroup (the shim starts them there): two `cat`s
    each (stdout, stderr; /usr/libexec/kiln/container-log leaves nothing else), plus any `sh`
    an older logger kept, summed, with how many loggers there are."""
    if unit is None:
        return None
    sh, cat = unit["by_program"].get("sh"), unit["by_program"].get("cat")
    if not cat:
        return None
    return {"count": cat["count"] // 2, **{k: cat[k] + (sh[k] if sh else 0) for k in MEASURES}}


def memory_view(m: dict[str, Any]) -> dict[str, Any]:
    """The second containerd, the supervisor, each container's logger, from the three snapshots."""
    b0, b1, b2 = m["before_admin"], m["with_admin"], m["with_workloads"]
    hc, cd = b1["units"].get("kiln-host-containerd.service"), b1["units"].get("containerd.service")
    cd2 = b2["units"].get("containerd.service")
    sup1, sup2 = b1["units"].get(SUPERVISOR), b2["units"].get(SUPERVISOR)
    wl_loggers = loggers(cd2)
    n = wl_loggers["count"] if wl_loggers else 0
    per_logger = None if not wl_loggers else {k: wl_loggers[k] / n for k in MEASURES}
    growth = None if not (sup1 and sup2 and n) else {k: (sup2[k] - sup1[k]) / n for k in MEASURES}
    per_container = None if per_logger is None else {
        k: per_logger[k] + max(0.0, growth[k] if growth else 0.0) for k in MEASURES}
    cgs = ("memory_current", "anon", "file")
    return {
        "guest used before admin": b0["used"],
        "guest used with admin": b1["used"],
        "guest used with the workloads": b2["used"],
        "guest used delta, admin enabled": b1["used"] - b0["used"],
        "guest MemAvailable delta, admin enabled": b0["available"] - b1["available"],
        "guest used delta, the workloads (kiln and floor)": b2["used"] - b1["used"],
        "host containerd cgroup (with admin's shim and logger)": None if hc is None else {
            k: hc[k] for k in (*cgs, *MEASURES)},
        "host containerd process": program(hc, "containerd"),
        "admin's shim": program(hc, "containerd-shim-runc-v2"),
        "admin's logger (2 cat)": loggers(hc),
        "workload containerd cgroup, same moment (no container)": None if cd is None else {
            k: cd[k] for k in (*cgs, *MEASURES)},
        "workload containerd process, same moment": program(cd, "containerd"),
        "supervisor (kiln-containers.service), admin running": None if sup1 is None else {
            k: sup1[k] for k in (*cgs, *MEASURES)},
        "supervisor, with the workloads": None if sup2 is None else {k: sup2[k] for k in (*cgs, *MEASURES)},
        "supervisor growth per workload": growth,
        "workload logger (2 cat), per container": per_logger,
        "Kiln per running container (logger + supervisor growth)": per_container,
        "admin container cgroup": next((v for n_, v in b1["containers"].items() if n_.endswith("/host-admin")), None),
        "workload shim (median)": median_of(cd2["shims"] if cd2 else [], MEASURES),
        "workload container cgroup (median)": median_of(
            [v for n_, v in b2["containers"].items() if n_.startswith("workload/")], cgs),
        "kiln workloads": n,
    }


def idle_cpu(c0: dict[str, Any], c1: dict[str, Any]) -> dict[str, Any]:
    """CPU used while nothing was asked of the guest, in % of one vCPU: per unit (the supervisor's
    among them), per program in each unit, per container."""
    dt = float(c1["now"]) - float(c0["now"])

    def pct(a: float, b: float) -> float:
        return 100.0 * (b - a) / dt

    out: dict[str, Any] = {"window_s": dt, "units": {}, "containers": {}}
    for name, e1 in c1["cgroups"].items():
        e0 = c0["cgroups"].get(name)
        if not e0 or not e1:
            continue
        if name.startswith("/"):
            out["containers"][name] = pct(e0["usage_s"], e1["usage_s"])
            continue
        entry: dict[str, Any] = {"total": pct(e0["usage_s"], e1["usage_s"]), "programs": {}}
        for pid, p1 in e1["procs"].items():
            p0 = e0["procs"].get(pid)
            if p0 is None:
                continue
            prog = by_program([{"argv": p1["argv"]}])
            label = next(iter(prog))
            entry["programs"][label] = entry["programs"].get(label, 0.0) + pct(p0["cpu_s"], p1["cpu_s"])
        out["units"][name] = entry
    out["workload container (median)"] = B.median(
        [v for k, v in out["containers"].items() if "/kiln/workload-" in k or "/bench/" in k])
    return out


# ------------------------------------------------------------------ attribution probes
def probes(g: Guest, httpd_ref: str) -> dict[str, float | None]:
    wl = f"ctr --address {WORKLOAD_SOCK} -n kiln"
    guest = {
        "python3 -I -c pass": "python3 -I -c pass",
        "the settings' restart command, nothing to change (reload of the supervisor)":
            f"systemctl kill --kill-whom=main --signal=SIGUSR1 {SUPERVISOR}",
        "one ctr call (ctr version)": f"{wl} version",
        "the pid check after pidfd_open (ctr tasks ls)": f"{wl} tasks ls",
    }
    out: dict[str, float | None] = {}
    for label, cmd in guest.items():
        out[label] = B.median([g.timed(cmd)["s"] for _ in range(3)])

    def host_set() -> float:
        t0 = time.monotonic()
        g.kiln("settings", "set", f"motd=bench {time.time()}")
        return time.monotonic() - t0

    out["workstation: kiln settings set motd=… (apply renders motd, starts nothing)"] = B.median(
        [host_set() for _ in range(3)])
    return out


# ------------------------------------------------------------------ images
def oci_images(base: Path) -> tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]:
    """Build admin and httpd with `kiln oci build`, start docker-registry, push both.
    Returns (the running LocalRegistry, its refs by key, each image's sizes)."""
    import gzip

    from kiln.oci.build import build_spec
    from kiln.oci.push import push
    from kiln.oci.registry import LocalRegistry
    from kiln.oci.spec import load_spec

    built = {k: build_spec(load_spec(B.REPO / "variants" / "containers" / f"{k}.toml"), base / "layouts" / k)
             for k in ("admin", "httpd")}
    reg = LocalRegistry(base / "registry").start()
    refs, sizes = {}, {}
    try:
        for key, res in built.items():
            pushed = push(res.output, f"{reg.address}/{res.name}:{res.tag}", plain_http=True)
            refs[key] = f"{res.name}:{res.tag}"
            uncompressed = 0
            for layer in res.layers:
                blob = res.output / "blobs" / "sha256" / layer.descriptor.digest.split(":", 1)[1]
                with gzip.open(blob, "rb") if layer.descriptor.media_type.endswith("gzip") else open(blob, "rb") as f:
                    while chunk := f.read(1 << 20):
                        uncompressed += len(chunk)
            sizes[key] = {"digest": pushed.digest, "manifest": res.manifest.size, "config": res.config.size,
                          "layers_compressed": sum(x.descriptor.size for x in res.layers),
                          "layers_uncompressed": uncompressed, "layer_media_type": res.layers[0].descriptor.media_type,
                          "entries": sum(x.entries for x in res.layers),
                          "packages": [f"{p.name} {p.version}" for p in res.packages]}
    except BaseException:
        reg.stop()
        raise
    return reg, refs, sizes


# ------------------------------------------------------------------ the run
def measure(image: Path, work: Path, runs: int, pull_runs: int) -> dict[str, Any]:
    from kiln.host.containers.ctr import hosts_toml

    B.log("building the admin and httpd images (kiln oci build), serving them on 127.0.0.1")
    reg, names, sizes = oci_images(work / "oci")
    out: dict[str, Any] = {"images": sizes}
    try:
        gw = f"10.0.2.2:{reg.port}"
        refs = {k: f"{gw}/{v}" for k, v in names.items()}
        fleet = work / "pki"
        pki.init(fleet)
        user_data = work / "user-data.toml"
        user_data.write_text(pki.user_data(fleet) + f"""
[settings.container-registry.mirrors]
"{gw}" = ["http://{gw}"]

[settings.host-containers.admin]
enabled = false
source = "{refs['admin']}"
""")
        api = free_port()
        kiln_ports = [(8081 + i, free_port()) for i in range(runs)]
        floor_ports = [(8181 + i, free_port()) for i in range(runs)]
        forwards = (Forward(api, API_PORT), *(Forward(h, gp) for gp, h in kiln_ports + floor_ports))
        clock = B.SerialClock()
        vm = Vm(VmConfig(image, work / "vm", cpus=2, accel="tcg", cold_reboot=True, user_data=user_data,
                         forwards=forwards), echo=clock)
        try:
            B.log("booting (TCG, 2 vCPUs)")
            vm.start()
            clock.start(vm.started_at)
            vm.wait_ready(BOOT_TIMEOUT)
            out["ready_s"] = time.monotonic() - vm.started_at
            vm.wait_shell(120)
            g = Guest(vm, fleet, api)
            hosts = f"{HOSTS_DIR}/{gw}"
            toml = b64(hosts_toml(gw, [f"http://{gw}"]))
            vm.check(f"mkdir -p {hosts} && echo {toml} | base64 -d > {hosts}/hosts.toml")
            g.install("tracer")
            vm.check("(python3 -I /tmp/bench-tracer.py /tmp/bench-trace.log </dev/null >/dev/null 2>&1 &)")
            time.sleep(10)  # the boot's stragglers (DATA growth, timesyncd) and the tracer settle
            B.log("memory before admin")
            mem: dict[str, Any] = {"before_admin": g.py("memory", *SERVICES)}

            B.log("enabling admin through the API")
            out["admin_enable"] = admin_enable(g)
            time.sleep(10)
            mem["with_admin"] = g.py("memory", *SERVICES)

            kiln_rows: list[dict[str, Any]] = []
            floor_rows: list[dict[str, Any]] = []
            bench_pull: dict[str, Any] | None = None
            for i in range(runs):
                gp, hp = kiln_ports[i]
                B.log(f"kiln {i + 1}/{runs}: settings set containers.w{i + 1} → serving on {gp}")
                kiln_rows.append(kiln_workload(g, f"w{i + 1}", gp, hp, refs["httpd"]))
                B.log(f"  served after {kiln_rows[-1]['served_s']:.2f} s")
                if bench_pull is None:  # the floor's image, pulled untimed into its own namespace
                    bench_pull = g.timed(f"ctr --address {WORKLOAD_SOCK} -n bench images pull --hosts-dir {HOSTS_DIR} "
                                         f"{refs['httpd']}")
                    if bench_pull["rc"] != 0:
                        raise RuntimeError(f"pulling httpd into the bench namespace failed: {bench_pull['err']}")
                gp, hp = floor_ports[i]
                B.log(f"floor {i + 1}/{runs}: ctr run -d f{i + 1} → serving on {gp}")
                floor_rows.append(floor_workload(g, f"f{i + 1}", gp, hp, refs["httpd"]))
                B.log(f"  served after {floor_rows[-1]['served_s']:.2f} s")
            time.sleep(5)
            mem["with_workloads"] = g.py("memory", *SERVICES)
            out["workloads"] = {"kiln": kiln_rows, "floor": floor_rows, "bench_namespace_pull": bench_pull}
            B.log(f"idle CPU over {IDLE_S:.0f} s")
            watched = [*SERVICES, *(v["path"] for v in mem["with_workloads"]["containers"].values() if v)]
            cpu0 = g.py("cpu", *watched)
            time.sleep(IDLE_S)
            out["idle_cpu_raw"] = [cpu0, g.py("cpu", *watched)]
            B.log("attribution probes")
            out["probes_s"] = probes(g, refs["httpd"])
            B.log("admin image pulls on the host containerd")
            out["admin_pull"] = admin_pulls(g, refs["admin"], pull_runs)
            out["memory_raw"] = mem
            LOGS.mkdir(parents=True, exist_ok=True)
            (LOGS / "containers-journal.txt").write_text(g.journal())
            (LOGS / "containers-trace.txt").write_text("".join(json.dumps(e) + "\n" for e in g.trace()))
        finally:
            vm.kill()
            LOGS.mkdir(parents=True, exist_ok=True)
            (LOGS / "containers-serial.txt").write_text(clock.text())
    finally:
        reg.stop()
    out["memory"] = {k: summarize_memory(v) for k, v in out["memory_raw"].items()}
    return out


def derive(r: dict[str, Any]) -> dict[str, Any]:
    """Medians and ratios from the raw rows."""
    k, f = r["workloads"]["kiln"], r["workloads"]["floor"]
    later = k[1:]
    seg_labels = [s[0] for s in KILN_SEGMENTS]
    d: dict[str, Any] = {
        "kiln_first_s": k[0]["served_s"] if k else None,
        "kiln_first_segments_s": k[0]["segments_s"] if k else {},
        "kiln_later_median_s": med_key(later, "served_s"),
        "kiln_later_segments_median_s": {s: B.median([x["segments_s"][s] for x in later]) for s in seg_labels},
        "kiln_cli_median_s": med_key(k, "cli_s"),
        "floor_median_s": med_key(f, "served_s"),
        "floor_segments_median_s": {s: B.median([x["segments_s"][s] for x in f]) for s in f[0]["segments_s"]}
        if f else {},
        "floor_ctr_returned_median_s": B.median([x["events_s"]["ctr_returned"] for x in f]),
    }
    d["ratios"] = {"kiln later / floor": B.ratio(d["kiln_later_median_s"], d["floor_median_s"]),
                   "kiln first / floor": B.ratio(d["kiln_first_s"], d["floor_median_s"])}
    a, p = r["admin_enable"], r["admin_pull"]["median_s"]
    floor_task = B.median([x["events_s"]["task_start"] for x in f])
    by_hand = None if p["cold"] is None or floor_task is None else p["cold"] + floor_task
    d["admin"] = {"listed_running_s": a["listed_running_s"], "task_started_s": a["task_started_s"],
                  "by_hand_s": by_hand,
                  "ratio init started / by hand": B.ratio(a["task_started_s"], by_hand),
                  "ratio listed running / by hand": B.ratio(a["listed_running_s"], by_hand)}
    d["memory"] = memory_view(r["memory"])
    d["idle_cpu_percent"] = idle_cpu(*r["idle_cpu_raw"])
    return d


# ------------------------------------------------------------------ report
def report(r: dict[str, Any]) -> str:
    d = r["derived"]
    n_k, n_f = len(r["workloads"]["kiln"]), len(r["workloads"]["floor"])
    lines = [f"1. settings set → serving (TCG, 2 vCPUs): {n_k} kiln runs (the first pulls httpd), {n_f} floor runs", ""]
    rows = [["kiln, first (pull)", B.fmt_s(d["kiln_first_s"], 2), B.fmt_ratio(d["ratios"]["kiln first / floor"])],
            [f"kiln, later (median of {max(n_k - 1, 0)})", B.fmt_s(d["kiln_later_median_s"], 2),
             B.fmt_ratio(d["ratios"]["kiln later / floor"])],
            ["  kiln settings set returned (median, all)", B.fmt_s(d["kiln_cli_median_s"], 2), ""],
            [f"floor: ctr run -d in the guest shell (median of {n_f})", B.fmt_s(d["floor_median_s"], 2), "1.00"],
            ["  ctr run -d returned (median)", B.fmt_s(d["floor_ctr_returned_median_s"], 2), ""]]
    lines.append(B.table(rows, ["", "to serving", "/ floor"]))
    lines.append("")
    rows = [[label, B.fmt_s(d["kiln_first_segments_s"].get(label), 2),
             B.fmt_s(d["kiln_later_segments_median_s"].get(label), 2)] for label, _a, _b in KILN_SEGMENTS]
    lines.append(B.table(rows, ["kiln, where the time goes", "first", "later (median)"]))
    lines.append("")
    lines.append(B.table([[k, B.fmt_s(v, 2)] for k, v in d["floor_segments_median_s"].items()],
                         ["floor, where the time goes (median)", ""]))
    a = r["admin_enable"]
    lines += ["", "2. admin: settings set host-containers.admin.enabled=true", ""]
    rows = [[k, B.fmt_s(v, 2)] for k, v in a["segments_s"].items()]
    rows += [["admin's init process started", B.fmt_s(a["task_started_s"], 2)],
             [f"GET /containers says running (polled every {LIST_POLL_S} s)", B.fmt_s(a["listed_running_s"], 2)],
             ["  kiln settings set returned", B.fmt_s(a["cli_s"], 2)],
             ["  host containerd start (inside the supervisor's start)", B.fmt_s(a["host_containerd_start_s"], 2)],
             ["by hand: cold ctr pull + ctr run -d to process start (medians)", B.fmt_s(d["admin"]["by_hand_s"], 2)]]
    lines.append(B.table(rows, ["", "time"]))
    lines.append(f"init started / by hand: {B.fmt_ratio(d['admin']['ratio init started / by hand'])}; "
                 f"listed running / by hand: {B.fmt_ratio(d['admin']['ratio listed running / by hand'])}")
    p = r["admin_pull"]["median_s"]
    s = r["images"]["admin"]
    lines += ["", f"admin image: {B.fmt_mib(s['layers_compressed'])} compressed, "
              f"{B.fmt_mib(s['layers_uncompressed'])} uncompressed ({s['entries']} entries); "
              f"pulls on the host containerd, median of {len(r['admin_pull']['runs'])}", ""]
    lines.append(B.table([["cold (no blob left)", B.fmt_s(p["cold"], 2)],
                          ["already present", B.fmt_s(p["present"], 2)],
                          ["ctr content fetch (download only)", B.fmt_s(p["fetch"], 2)],
                          ["ctr images pull after the fetch (unpack)", B.fmt_s(p["unpack"], 2)]], ["ctr pull", "time"]))
    lines += ["", B.table([[k, B.fmt_s(v, 2)] for k, v in r["probes_s"].items()], ["probe (median of 3)", "time"])]
    m = d["memory"]
    lines += ["", "3. memory (memory.current and anon of cgroups; RSS, PSS, USS of their processes)", ""]
    rows = []
    for label, e in m.items():
        if isinstance(e, dict):
            rows.append([label, *(B.fmt_mib(e.get(k)) if e.get(k) is not None else "" for k in
                                  ("memory_current", "anon", "rss", "pss", "uss"))])
    lines.append(B.table(rows, ["", "memory.current", "anon", "RSS", "PSS", "USS"]))  # dict rows only
    lines.append(f"guest used memory (total − free − buffers − cache): {B.fmt_mib(m['guest used before admin'])}"
                 f" → {B.fmt_mib(m['guest used with admin'])} with admin "
                 f"(+{B.fmt_mib(m['guest used delta, admin enabled'])}; MemAvailable −"
                 f"{B.fmt_mib(m['guest MemAvailable delta, admin enabled'])}) → "
                 f"{B.fmt_mib(m['guest used with the workloads'])} with {m['kiln workloads']} kiln workloads "
                 f"and the floor's containers")
    per, shim = m["Kiln per running container (logger + supervisor growth)"], m["workload shim (median)"]
    if per:
        lines.append(f"Kiln per running container beyond the shim: {B.fmt_mib(per['rss'])} RSS, "
                     f"{B.fmt_mib(per['pss'])} PSS, {B.fmt_mib(per['anon'])} anonymous (target ≤ 3 MiB); "
                     f"the shim itself: {B.fmt_mib(shim.get('rss'))} RSS")
    c = d["idle_cpu_percent"]
    rows = [[name, f"{e['total']:.2f} %"] for name, e in c["units"].items()]
    wc = c["workload container (median)"]
    rows.append(["one httpd container (median)", "-" if wc is None else f"{wc:.2f} %"])
    lines += ["", B.table(rows, [f"idle CPU over {c['window_s']:.0f} s (% of one vCPU)", ""])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3, help="kiln workloads and floor containers (default 3)")
    ap.add_argument("--pull-runs", type=int, default=3, help="cold pulls of the admin image (default 3)")
    ap.add_argument("--image", type=Path, help="a disk.img built with --debug-console (default: build one)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.pull_runs < 1:
        ap.error("--runs and --pull-runs must be at least 1")
    if args.image is None and os.geteuid() != 0:
        ap.error("run as root (kiln build), or give --image")
    info = B.machine()
    busy = B.other_work(warn=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-containers-") as tmp:
        work = Path(tmp)
        image = args.image
        build_info: dict[str, Any] = {"image": str(image) if image else None}
        if image is None:
            from kiln.build.pipeline import BuildOptions, build
            from kiln.core.progress import Progress
            from kiln.variant import load_variant

            B.log("building the default image with --debug-console")
            res = build(BuildOptions(load_variant(), work / "image", debug_console=True), Progress(quiet=True))
            image = res.disk
            build_info = {"image": None, "build_s": round(res.timings["total"], 1), "sizes": res.sizes}
        r = measure(image, work, args.runs, args.pull_runs)
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    r["derived"] = derive(r)
    result = {
        "benchmark": "containers",
        "machine": info,
        "other_work_at_start": busy,
        "other_work_at_end": B.other_work(),
        "source": B.git_source(),
        "wall_seconds": round(time.monotonic() - t0, 1),
        "build": build_info,
        "guest": {"accel": "tcg", "cpus": 2, "memory_mib": 1024},
        **r,
    }
    B.emit("containers", result, report(result), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
