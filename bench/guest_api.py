#!/usr/bin/env python3
"""The settings path inside a booted Kiln guest (QEMU TCG): start-up, memory, boot share.

Boots the default image built with a debug console (needed to look inside), first with
user data that turns on the mutual-TLS remote API, then once more (a reboot), and measures:

- boot share:  kiln-settings.service's wall time and kiln-ready.target's time since boot
               (systemd's monotonic timestamps), first boot (user data, generators, full
               render, restarts) and second boot (render cache current: nothing to do);
               the pipeline's own step timings (/run/kiln/boot-settings.json);
- API start:   with kiln-apiserver.service stopped (its socket still listening), one GET
               from a Python client inside the guest: connect → first response, which
               includes the server's socket-activated start; then the same GET warm
               (median of 20) — the alternative, a server already running;
- memory:      VmRSS and VmHWM of every long-lived Kiln process (API server, remote API,
               update daemon) beside containerd for scale, and the peak RSS (VmHWM, read
               by the process itself as it exits) of the one-shot Kiln processes (the boot
               pipeline, fast and full; the `kiln` client).

Target: the Kiln agents together under 60 MiB resident. Writes bench/results/guest_api.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
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

# The long-lived Kiln processes of a host with the remote API and automatic updates on.
AGENTS = ("kiln-apiserver", "kiln-api-remote", "kiln-updater")

FIRST_RESPONSE = r"""
import socket, time, json
t0 = time.monotonic()
s = socket.socket(socket.AF_UNIX); s.connect("/run/kiln/api.sock")
s.sendall(b"GET /settings?keys=settings.motd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(json.dumps({"seconds": time.monotonic() - t0, "status": data.split(b" ", 2)[1].decode()}))
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


def monotonic_prop(vm: Vm, unit: str, prop: str) -> float | None:
    raw = vm.check(f"systemctl show -p {prop} --value {unit}").strip()
    return int(raw) / 1e6 if raw.isdigit() and int(raw) else None


def boot_share(vm: Vm) -> dict[str, Any]:
    start = monotonic_prop(vm, "kiln-settings.service", "InactiveExitTimestampMonotonic")
    end = monotonic_prop(vm, "kiln-settings.service", "ActiveEnterTimestampMonotonic")
    ready = monotonic_prop(vm, "kiln-ready.target", "ActiveEnterTimestampMonotonic")  # since the kernel started
    steps = json.loads(vm.check("cat /run/kiln/boot-settings.json"))
    wall = None if start is None or end is None else end - start
    return {
        "settings_unit_start_s": start,
        "settings_unit_wall_s": wall,
        "settings_pipeline_work_s": steps.get("total"),
        "settings_steps_s": steps.get("steps"),
        "ready_target_s": ready,
        "share_of_ready": None if wall is None or not ready else wall / ready,
        "apply": steps["apply"] if isinstance(steps.get("apply"), str) else "rendered and restarted",
    }


def guest_py(vm: Vm, code: str, *args: str) -> Any:
    vm.check(f"echo {base64.b64encode(code.encode()).decode()} | base64 -d > /tmp/bench.py")
    return json.loads(vm.check(f"python3 -I /tmp/bench.py {' '.join(args)}", timeout=180).strip().splitlines()[-1])


def memory_of(vm: Vm, unit: str) -> dict[str, int] | None:
    """VmRSS and VmHWM (bytes) of a unit's main process, or None when it is not running."""
    pid = vm.check(f"systemctl show -p MainPID --value {unit}").strip()
    if not pid.isdigit() or pid == "0":
        return None
    out: dict[str, int] = {}
    for line in vm.check(f"grep -E '^Vm(RSS|HWM):' /proc/{pid}/status").splitlines():
        key, value = line.split()[:2]
        out[key.rstrip(":")] = int(value) * 1024
    return out


def peak_of(vm: Vm, *module_args: str) -> int | None:
    got = guest_py(vm, PEAK_HWM, *module_args)
    return got["vmhwm_bytes"] if isinstance(got.get("vmhwm_bytes"), int) else None


def measure(image: Path, work: Path) -> dict[str, Any]:
    fleet = work / "pki"
    pki.init(fleet)
    user_data = work / "user-data.toml"
    # The remote API and the update daemon on, as on a host in a fleet: every long-lived Kiln agent
    # runs. (No repository answers the daemon's checks here; it waits a day between them.)
    user_data.write_text(pki.user_data(fleet) + '\n[settings]\nmotd = "bench"\n'
                         '\n[settings.updates]\nstrategy = "immediate"\ncheck-interval = "24h"\n')
    port = free_port()
    vm = Vm(VmConfig(image, work / "vm", accel="tcg", user_data=user_data, forwards=(Forward(port, 50000),)),
            serial_log=work / "serial.log")
    out: dict[str, Any] = {}
    try:
        vm.start()
        vm.wait_ready(300)
        vm.wait_shell()
        out["first_boot"] = boot_share(vm)
        # API start-to-first-response: stop the server; the socket stays and activates it again.
        vm.check("systemctl stop kiln-apiserver.service")
        cold = guest_py(vm, FIRST_RESPONSE)
        warm = [guest_py(vm, FIRST_RESPONSE)["seconds"] for _ in range(20)]
        out["api"] = {"first_response_s": cold["seconds"], "status": cold["status"],
                      "warm_request_median_s": statistics.median(warm)}
        memory = {unit: memory_of(vm, f"{unit}.service") for unit in (*AGENTS, "containerd")}
        out["rss_bytes"] = {unit: m["VmRSS"] if m else None for unit, m in memory.items()}
        out["hwm_bytes"] = {unit: m["VmHWM"] if m else None for unit, m in memory.items()}
        out["peak_hwm_bytes"] = {
            "boot pipeline (render cache current)": peak_of(vm, "kiln.host.boot.pipeline"),
            "kiln settings get (client)": peak_of(vm, "kiln.host.cli", "settings", "get"),
        }
        vm.check("rm -f /var/lib/kiln/rendered/manifest.json")
        out["peak_hwm_bytes"]["boot pipeline (full render + restarts)"] = peak_of(vm, "kiln.host.boot.pipeline")
        vm.mark()
        vm.send("reboot\n")
        vm.wait_ready(300)
        vm.wait_shell()
        out["second_boot"] = boot_share(vm)
    finally:
        vm.kill()
    missing = [unit for unit in AGENTS if not out["rss_bytes"].get(unit)]
    if missing:
        raise RuntimeError(f"not running in the guest: {missing}")
    agents = sum(out["rss_bytes"][unit] for unit in AGENTS)
    out["agents"] = list(AGENTS)
    out["agents_resident_bytes"] = agents
    out["agents_target_bytes"] = 60 * B.MiB
    out["agents_target_met"] = agents < 60 * B.MiB
    return out


def report(r: dict[str, Any]) -> str:
    rows = []
    for boot in ("first_boot", "second_boot"):
        b = r[boot]
        rows.append([
            boot.replace("_", " "), B.fmt_s(b["settings_unit_wall_s"], 2), B.fmt_s(b["settings_pipeline_work_s"], 2),
            B.fmt_s(b["ready_target_s"], 2), B.fmt_ratio(b["share_of_ready"]), b["apply"],
        ])
    lines = [B.table(rows, ["boot", "kiln-settings wall", "pipeline work", "ready target", "share", "apply"]), ""]
    a = r["api"]
    lines.append(B.table([["socket-activated start → first response", B.fmt_s(a["first_response_s"], 3)],
                          ["warm request (server running)", B.fmt_s(a["warm_request_median_s"], 4)],
                          ["ratio cold/warm", B.fmt_ratio(B.ratio(a["first_response_s"], a["warm_request_median_s"]))]],
                         ["API in the guest", "time"]))
    lines.append("")
    mem = [[k, B.fmt_mib(v), B.fmt_mib(r["hwm_bytes"].get(k))] for k, v in r["rss_bytes"].items()]
    mem += [[f"peak: {k}", "", B.fmt_mib(v)] for k, v in r["peak_hwm_bytes"].items()]
    mem.append(["Kiln agents resident together (target < 60 MiB)",
                B.fmt_mib(r["agents_resident_bytes"]) + (" ok" if r["agents_target_met"] else " MISSED"), ""])
    lines.append(B.table(mem, ["process", "VmRSS", "VmHWM"]))
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
