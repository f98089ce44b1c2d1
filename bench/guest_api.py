#!/usr/bin/env python3
"""The host agent inside a booted Kiln guest (QEMU TCG): its boot share, the API's first answers, Kiln's memory.

Boots the default image built with a debug console (needed to look inside) with user data
that turns on the mutual-TLS remote API and the update daemon, then once more (a reboot).
On each boot it measures:

- boot share:  kiln-agent.service from its start (InactiveExitTimestampMonotonic) to READY=1
               (ActiveEnterTimestampMonotonic): the interpreter, the imports and the settings
               pipeline, beside the pipeline's own work (/run/kiln/boot-settings.json `total`)
               and kiln-ready.target's ActiveEnter (time since the kernel started); first boot
               (user data, generators, full render, restarts) and second boot (render cache
               current);
- API, first response after boot: a GET on /run/kiln/api.sock from a Python client in the
               guest (connect → response) as soon as the ready line has been seen and the
               debug shell answers: the agent already serves, this is its first request;
- API, restart: `systemctl kill -s SIGKILL kiln-agent.service`, then the same GET at once
               (connect → response: systemd's restart, RestartSec included, the interpreter
               start and the imports; the socket stays open in kiln-agent.socket), split at the
               new main process's exec and its READY=1; then 20 GETs to the running agent
               (median);
- memory:      at ready with the remote API and the update daemon running (after the daemon's
               `kiln-updater: id` line): VmRSS and VmHWM of kiln-agent.service's main process
               and of kiln-containers.service's (the container supervisor) when it runs, with
               containerd for scale; the agent again after the restart.

At the end of the first boot, the peak RSS (VmHWM, read by the process itself as it exits)
of the one-shot Kiln processes: the `kiln` client, and the boot pipeline run on its own
(`python3 -m kiln.host.boot.pipeline`, render cache current, then a full render).

Targets (issue 14): Kiln's resident memory at ready (agent + supervisor) ≤ 40 MiB; API
first response after boot ≤ 0.2 s. Writes bench/results/guest_api.json; the serial log and
the agent's journal of each boot go to bench/.cache/logs/guest_api-*.txt.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B

from kiln import pki
from kiln.build.pipeline import BuildOptions, build
from kiln.core.progress import Progress
from kiln.variant import load_variant
from kiln.vm.qemu import Forward, Vm, VmConfig, free_port

AGENT = "kiln-agent.service"  # settings pipeline, API (local + mTLS), health gate, update daemon
SUPERVISOR = "kiln-containers.service"  # the container supervisor (when it runs)
KILN_UNITS = (AGENT, SUPERVISOR)
KILN_TARGET_BYTES = 40 * 1024 * 1024  # issue 14: Kiln's own resident memory at ready
FIRST_RESPONSE_TARGET_S = 0.2  # issue 14: API first response after boot
WARM_REQUESTS = 20
UPDATER_LINE = r"kiln-updater: id "
UPDATER_PHASE = r"kiln-updater: (?!id )[\w-]+: "  # the phase after the daemon's first pass
LOGS = B.CACHE / "logs"

# GETs on the API socket, each on a new connection, timed connect → whole response; after the
# interpreter and its imports, so only the agent's side counts. argv[1]: how many.
_GET_FN = r"""
import json, socket, subprocess, sys, time
def get():
    t0 = time.monotonic()
    s = socket.socket(socket.AF_UNIX)
    s.connect("/run/kiln/api.sock")
    s.sendall(b"GET /settings?keys=settings.motd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return time.monotonic() - t0, data.split(b" ", 2)[1].decode()
"""
GET = _GET_FN + r"""
got = [get() for _ in range(int(sys.argv[1]))]
print(json.dumps({"seconds": [t for t, _ in got], "status": sorted({s for _, s in got})}))
"""

# SIGKILL the agent, then a GET at once; the split from systemd's own timestamps (CLOCK_MONOTONIC
# in µs, the clock of time.monotonic()).
RESTART = _GET_FN + r"""
t_kill = time.monotonic()
subprocess.run(["systemctl", "kill", "-s", "SIGKILL", "kiln-agent.service"], check=True)
t0 = time.monotonic()
took, status = get()
t1 = t0 + took
# The local API answers before READY=1 (the mTLS listener is bound in between): wait for the new
# process's READY=1 (ActiveEnter after its exec) before reading it, at most a minute.
while True:
    shown = subprocess.run(["systemctl", "show", "-p", "ExecMainStartTimestampMonotonic", "-p",
                            "ActiveEnterTimestampMonotonic", "-p", "NRestarts", "kiln-agent.service"],
                           capture_output=True, text=True, check=True).stdout
    props = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    exec_start = int(props["ExecMainStartTimestampMonotonic"]) / 1e6
    ready = int(props["ActiveEnterTimestampMonotonic"]) / 1e6
    if ready >= exec_start or time.monotonic() - t1 > 60:
        break
    time.sleep(0.1)
ready_seen = ready >= exec_start
print(json.dumps({
    "status": status,
    "kill_to_response_s": t1 - t_kill,
    "connect_to_response_s": t1 - t0,
    "kill_to_exec_s": exec_start - t_kill,
    "exec_to_response_s": t1 - exec_start,
    "exec_to_ready1_s": ready - exec_start if ready_seen else None,
    "response_before_ready1": ready_seen and t1 < ready,
    "n_restarts": int(props["NRestarts"]),
}))
"""

# Every process in each unit's cgroup (argv: units) with its VmRSS: what the main PID alone misses.
CGROUP = r"""
import json, subprocess, sys
out = {}
for unit in sys.argv[1:]:
    cg = subprocess.run(["systemctl", "show", "-p", "ControlGroup", "--value", unit], capture_output=True,
                        text=True).stdout.strip()
    procs = []
    try:
        pids = open(f"/sys/fs/cgroup{cg}/cgroup.procs").read().split() if cg else []
    except OSError:
        pids = []
    for pid in pids:
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
            rss = [int(l.split()[1]) * 1024 for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:")]
        except OSError:
            continue
        procs.append({"pid": int(pid), "cmdline": cmd[:160], "rss_bytes": rss[0] if rss else None})
    out[unit] = procs
print(json.dumps(out))
"""

# The peak resident memory of a one-shot command, read by the process itself: an atexit hook
# reads VmHWM from its own /proc/self/status after the command's work, before the interpreter
# releases its memory, and writes it to a file. Not getrusage(RUSAGE_CHILDREN).ru_maxrss: Linux
# starts a child's ru_maxrss at its parent's size when it execs, so it says as much about the
# parent as about the child. The command is a Python module, run as `python3 -I -m` runs it.
PEAK_HWM = r"""
import json, os, subprocess, sys
OUT = "/tmp/bench-hwm"
WRAP = (
    "import atexit, runpy, sys\n"
    "def _hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            with open(%r, 'w') as f:\n"
    "                f.write(line.split()[1])\n"
    "atexit.register(_hwm)\n"
    "module = sys.argv[1]\n"
    "sys.argv = [module, *sys.argv[2:]]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
) % OUT
if os.path.exists(OUT):
    os.unlink(OUT)
proc = subprocess.run(["python3", "-I", "-c", WRAP, *sys.argv[1:]], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL, check=False)
kib = int(open(OUT).read()) if os.path.exists(OUT) else None
print(json.dumps({"vmhwm_bytes": None if kib is None else kib * 1024, "returncode": proc.returncode}))
"""


# The debug shell shares the serial console with the guest's console messages (the update
# daemon's lines, systemd's): a command's output can have foreign lines in it, so every reader
# below picks out only the lines it expects.
def show(vm: Vm, unit: str, *props: str) -> dict[str, str]:
    out = vm.check(f"systemctl show {' '.join(f'-p {p}' for p in props)} {unit}")
    pairs = (line.strip().split("=", 1) for line in out.splitlines() if "=" in line)
    return {k: v for k, v in pairs if k in props}


def seconds(raw: str | None) -> float | None:
    """A systemd *TimestampMonotonic (µs since the kernel started) in seconds; None when unset."""
    return int(raw) / 1e6 if raw and raw.isdigit() and int(raw) else None


def boot_share(vm: Vm) -> dict[str, Any]:
    agent = show(vm, AGENT, "InactiveExitTimestampMonotonic", "ExecMainStartTimestampMonotonic",
                 "ActiveEnterTimestampMonotonic", "NRestarts")
    start = seconds(agent.get("InactiveExitTimestampMonotonic"))
    ready1 = seconds(agent.get("ActiveEnterTimestampMonotonic"))
    entered = "ActiveEnterTimestampMonotonic"
    ready = seconds(show(vm, "kiln-ready.target", entered).get(entered))
    booted = seconds(show(vm, "kiln-booted.target", entered).get(entered))
    steps = B.json_line(vm.check("tr -d '\\n' < /run/kiln/boot-settings.json; echo"))
    wall = None if start is None or ready1 is None else ready1 - start
    work = steps.get("total")
    return {
        "agent_start_s": start,  # since the kernel started
        "agent_exec_s": seconds(agent.get("ExecMainStartTimestampMonotonic")),
        "agent_ready1_s": ready1,
        "agent_start_to_ready1_s": wall,
        "pipeline_work_s": work,
        "agent_startup_s": None if wall is None or work is None else wall - work,  # interpreter, imports, API
        "pipeline_steps_s": steps.get("steps"),
        "ready_target_s": ready,
        "booted_target_s": booted,
        "share_of_ready": None if wall is None or not ready else wall / ready,
        "agent_restarts": int(agent["NRestarts"]) if agent.get("NRestarts", "").isdigit() else None,
        "apply": steps["apply"] if isinstance(steps.get("apply"), str) else "rendered and restarted",
    }


def guest_py(vm: Vm, code: str, *args: str) -> Any:
    vm.check(f"echo {base64.b64encode(code.encode()).decode()} | base64 -d > /tmp/bench.py")
    return B.json_line(vm.check(f"python3 -I /tmp/bench.py {' '.join(args)}", timeout=180))


def memory_of(vm: Vm, unit: str) -> dict[str, int] | None:
    """VmRSS and VmHWM (bytes) of a unit's main process, or None when it is not running."""
    pids = [line.strip() for line in vm.check(f"systemctl show -p MainPID {unit}").splitlines()
            if re.fullmatch(r"MainPID=\d+", line.strip())]
    pid = pids[-1].split("=")[1] if pids else "0"
    if pid == "0":
        return None
    out: dict[str, int] = {}
    for line in vm.check(f"grep -E '^Vm(RSS|HWM):' /proc/{pid}/status").splitlines():
        if m := re.fullmatch(r"(VmRSS|VmHWM):\s+(\d+) kB", line.strip()):
            out[m.group(1)] = int(m.group(2)) * 1024
    return out if {"VmRSS", "VmHWM"} <= set(out) else None


def peak_of(vm: Vm, *module_args: str) -> int | None:
    got = guest_py(vm, PEAK_HWM, *module_args)
    return got["vmhwm_bytes"] if isinstance(got.get("vmhwm_bytes"), int) else None


def seen_after(vm: Vm, offset: int, pattern: str, timeout: float) -> bool:
    """Whether `pattern` shows on the console after `offset` within `timeout` (the shell's
    marks move wait_for's position, so this reads the output itself)."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rx.search(vm.output, offset):
            return True
        time.sleep(0.5)
    return False


def one_boot(vm: Vm, name: str) -> dict[str, Any]:
    """Everything measured on one boot, from its ready line on."""
    ready_line = vm.wait_ready(420)
    ready_at = vm.time_at(ready_line.start())
    vm.wait_shell()
    vm.check(f"echo {base64.b64encode(GET.encode()).decode()} | base64 -d > /tmp/bench-get.py")
    asked = time.monotonic()
    first = B.json_line(vm.check("python3 -I /tmp/bench-get.py 1", timeout=180))
    out: dict[str, Any] = {
        "api_first_response_s": first["seconds"][0],
        "api_first_status": first["status"],
        "api_first_asked_after_ready_line_s": asked - ready_at,  # seen on this side
    }
    out.update(boot_share(vm))
    # Memory at ready: the update daemon running in the agent (its first line), the API answered once.
    out["updater_started"] = seen_after(vm, ready_line.start(), UPDATER_LINE, 120)
    out["updater_first_pass"] = seen_after(vm, ready_line.start(), UPDATER_PHASE, 60)  # its first check done
    memory = {unit: memory_of(vm, unit) for unit in (*KILN_UNITS, "containerd.service")}
    out["rss_bytes"] = {unit: m["VmRSS"] if m else None for unit, m in memory.items()}
    out["hwm_bytes"] = {unit: m["VmHWM"] if m else None for unit, m in memory.items()}
    out["kiln_resident_bytes"] = sum(out["rss_bytes"][u] or 0 for u in KILN_UNITS) if out["rss_bytes"][AGENT] else None
    # Every process of the Kiln units (children too), and what they hold together.
    out["cgroup_processes"] = guest_py(vm, CGROUP, *KILN_UNITS)
    out["kiln_cgroups_resident_bytes"] = sum(p["rss_bytes"] or 0 for procs in out["cgroup_processes"].values()
                                             for p in procs)
    # The restart: SIGKILL, then a GET that waits on the socket systemd keeps.
    out["restart"] = guest_py(vm, RESTART)
    warm = guest_py(vm, GET, str(WARM_REQUESTS))
    out["api_warm_median_s"] = sorted(warm["seconds"])[len(warm["seconds"]) // 2]
    out["api_warm_status"] = warm["status"]
    after = memory_of(vm, AGENT)
    out["agent_after_restart"] = after
    journal = vm.check("journalctl -b -u kiln-agent.service --no-pager -o short-monotonic | tail -n 300", timeout=120)
    (LOGS / f"guest_api-journal-{name}.txt").write_text(journal)
    out["agent_journal_problems"] = [line.strip() for line in journal.splitlines()
                                     if re.search(r"crashed|Traceback|Error|not listening|failed", line)][:10]
    return out


def measure(image: Path, work: Path) -> dict[str, Any]:
    fleet = work / "pki"
    pki.init(fleet)
    user_data = work / "user-data.toml"
    # The remote API and the update daemon on, as on a host in a fleet. (No repository answers
    # the daemon's checks here; it waits a day between them.)
    user_data.write_text(pki.user_data(fleet) + '\n[settings]\nmotd = "bench"\n'
                         '\n[settings.updates]\nstrategy = "immediate"\ncheck-interval = "24h"\n')
    port = free_port()
    LOGS.mkdir(parents=True, exist_ok=True)
    serial = LOGS / "guest_api-serial.txt"
    serial.unlink(missing_ok=True)
    # cold_reboot: the reboot is a new QEMU on the same disk; QEMU 7.2's warm reset under TCG
    # sometimes hangs for good (it did here: no output for minutes after `reboot: Restarting system`).
    vm = Vm(VmConfig(image, work / "vm", accel="tcg", user_data=user_data, forwards=(Forward(port, 50000),),
                     cold_reboot=True), serial_log=serial)
    out: dict[str, Any] = {"design": "agent", "agent_unit": AGENT, "supervisor_unit": SUPERVISOR}
    try:
        vm.start()
        B.log("first boot")
        out["first_boot"] = one_boot(vm, "first")
        out["peak_hwm_bytes"] = {
            "kiln settings get (client)": peak_of(vm, "kiln.host.cli", "settings", "get"),
            "boot pipeline alone (render cache current)": peak_of(vm, "kiln.host.boot.pipeline"),
        }
        vm.check("rm -f /var/lib/kiln/rendered/manifest.json")
        out["peak_hwm_bytes"]["boot pipeline alone (full render + restarts)"] = peak_of(vm, "kiln.host.boot.pipeline")
        vm.mark()
        vm.send("reboot\n")
        B.log("second boot")
        out["second_boot"] = one_boot(vm, "second")
    finally:
        vm.kill()
    resident = [out[b]["kiln_resident_bytes"] for b in ("first_boot", "second_boot")]
    if None in resident:  # recorded all the same (the report skips it), and said
        B.log(f"{AGENT}'s memory not read on a boot (see {LOGS}/guest_api-*.txt)")
    first = [out[b]["api_first_response_s"] for b in ("first_boot", "second_boot")]
    out["kiln_target_bytes"] = KILN_TARGET_BYTES
    out["kiln_target_met"] = None if None in resident else max(r or 0 for r in resident) <= KILN_TARGET_BYTES
    out["api_first_response_target_s"] = FIRST_RESPONSE_TARGET_S
    out["api_first_response_target_met"] = max(first) <= FIRST_RESPONSE_TARGET_S
    return out


def report(r: dict[str, Any]) -> str:
    boots = ("first_boot", "second_boot")
    rows = []
    for boot in boots:
        b = r[boot]
        rows.append([
            boot.replace("_", " "), B.fmt_s(b["agent_start_s"], 2), B.fmt_s(b["agent_start_to_ready1_s"], 2),
            B.fmt_s(b["pipeline_work_s"], 2), B.fmt_s(b["agent_startup_s"], 2), B.fmt_s(b["ready_target_s"], 2),
            B.fmt_ratio(b["share_of_ready"]), b["apply"],
        ])
    lines = [B.table(rows, ["boot", "agent start", "start → READY=1", "pipeline work", "the rest", "ready target",
                            "share", "apply"]), ""]
    api = []
    for boot in boots:
        b, rs = r[boot], r[boot]["restart"]
        api += [
            [f"{boot.replace('_', ' ')}: first response after the ready line", B.fmt_s(b["api_first_response_s"], 3)],
            [f"{boot.replace('_', ' ')}: SIGKILL → response (kill → exec {B.fmt_s(rs['kill_to_exec_s'], 2)}, "
             f"exec → response {B.fmt_s(rs['exec_to_response_s'], 2)}, exec → READY=1 "
             f"{B.fmt_s(rs['exec_to_ready1_s'], 2)})", B.fmt_s(rs["kill_to_response_s"], 3)],
            [f"{boot.replace('_', ' ')}: running agent (median of {WARM_REQUESTS})",
             B.fmt_s(b["api_warm_median_s"], 4)],
        ]
    lines += [B.table(api, ["API in the guest", "time"]), ""]
    mem = []
    for boot in boots:
        b = r[boot]
        for unit, rss in b["rss_bytes"].items():
            mem.append([f"{boot.replace('_', ' ')}: {unit}", B.fmt_mib(rss), B.fmt_mib(b["hwm_bytes"].get(unit))])
        after = b.get("agent_after_restart") or {}
        mem.append([f"{boot.replace('_', ' ')}: {AGENT} after its restart", B.fmt_mib(after.get("VmRSS")),
                    B.fmt_mib(after.get("VmHWM"))])
        mem.append([f"{boot.replace('_', ' ')}: Kiln at ready (agent + supervisor; target ≤ 40 MiB)",
                    B.fmt_mib(b["kiln_resident_bytes"]), ""])
        mem.append([f"{boot.replace('_', ' ')}: every process of the two units (children too)",
                    B.fmt_mib(b["kiln_cgroups_resident_bytes"]), ""])
        for unit, procs in b["cgroup_processes"].items():
            for p in procs:
                mem.append([f"  {unit} pid {p['pid']}: {p['cmdline'][:60]}", B.fmt_mib(p["rss_bytes"]), ""])
    mem += [[f"peak: {k}", "", B.fmt_mib(v)] for k, v in r["peak_hwm_bytes"].items()]
    lines.append(B.table(mem, ["process", "VmRSS", "VmHWM"]))
    met = {True: "ok", False: "MISSED", None: "not measured"}[r["kiln_target_met"]]
    lines.append(f"Kiln resident at ready ≤ 40 MiB: {met}; "
                 f"API first response after boot ≤ 0.2 s: {'ok' if r['api_first_response_target_met'] else 'MISSED'}")
    for boot in boots:
        for line in r[boot]["agent_journal_problems"]:
            lines.append(f"{boot.replace('_', ' ')}, agent journal: {line}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--image", type=Path, help="a disk.img built with --debug-console (default: build one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    info = B.machine()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-guest-") as tmp:
        work = Path(tmp)
        image = args.image
        if image is None:
            B.log("building the default image with --debug-console")
            image = build(BuildOptions(load_variant(), work / "image", debug_console=True), Progress(quiet=True)).disk
        t0 = time.monotonic()
        B.log("booting (TCG, 1 vCPU), measuring, rebooting")
        result = measure(image, work)
        result["elapsed_s"] = time.monotonic() - t0
    data = {"machine": info, "result": result}
    B.write_result("guest_api", data)
    print(json.dumps(data, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
