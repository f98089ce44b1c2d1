#!/usr/bin/env python3
"""Fleet locks: FleetLock acquire + release through `kiln fleet serve` over a 3-member etcd
cluster, 100 concurrent agents, against etcd's own floors measured in the same run.

Everything runs on this machine's loopback: three etcd members (Debian's etcd-server), one
`kiln fleet serve` process, and the load in this process (threads).

- kiln, uncontended: 100 agents, each in a group of its own (1 slot), each cycle a
  `POST /v1/pre-reboot` then `POST /v1/steady-state` with Kiln's own FleetLock client (the
  one the update daemon uses): what one lock round trip costs when nobody waits.
- kiln, contended: 100 agents in one group of 3 slots; each retries a refused pre-reboot
  after 5 ms, then releases at once: grants per second through one semaphore key.
- floor, txn: the same 100 threads talking to etcd directly through its JSON gateway
  (etcd3gw, as the server does): a compare-and-swap put of a key of their own, then its
  delete. Two etcd writes: the least a lock and an unlock can cost in etcd.
- floor, etcdctl lock: `etcdctl lock NAME -- true`, one after another: what an operator's
  shell script would pay per lock (a process start included).

Reported: p50/p99 latency of one acquire + release and throughput (cycles/s), kiln/floor
ratios.

With `--guest`: two VMs of the 1.0.0 --debug-console build (bench/update.py's builds, TCG,
1 vCPU each) with `strategy = "fleet-lock"` in one group of 1 slot, the server above and
a repository on 127.0.0.1. Once both are ready, the CPU time over 60 idle seconds (utime +
stime from /proc/PID/stat) and the resident memory (VmRSS, VmHWM) of the process the update
daemon runs in are read in each guest: since issue 14 that is kiln-agent.service, so the
figures are the whole agent's (daemon, API and mTLS listener, health gate), not the daemon
alone; then 2.0.0 is published and the rollout's timeline taken from the serial
consoles (arrival times on this side): drain (slot held), ready on 2.0.0, slot given back.

Writes bench/results/fleet.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _bench as B

sys.path.insert(0, str(B.REPO))
sys.path.insert(0, str(B.BENCH))

from tests.etcd_cluster import etcd_cluster
from tests.fleet_helpers import ServerProcess

from kiln.fleet.etcd import Etcd
from kiln.host.update.fleetlock import FleetLockClient, LockRefused
from kiln.vm.qemu import free_port

AGENTS = 100


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def load(agents: int, seconds: float, cycle: Callable[[int], None]) -> dict[str, Any]:
    """`agents` threads running `cycle(i)` for `seconds`; latency of each cycle, throughput."""
    lat: list[list[float]] = [[] for _ in range(agents)]
    errors: list[str] = []
    start = threading.Barrier(agents + 1)
    stop = time.monotonic() + seconds + 0.5

    def worker(i: int) -> None:
        start.wait()
        while time.monotonic() < stop:
            t = time.perf_counter()
            try:
                cycle(i)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                return
            lat[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(agents)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    every = [x for xs in lat for x in xs]
    return {
        "cycles": len(every), "seconds": round(elapsed, 2), "per_s": round(len(every) / elapsed, 1),
        "p50_ms": round(pct(every, 0.50) * 1000, 2) if every else None,
        "p99_ms": round(pct(every, 0.99) * 1000, 2) if every else None,
        "errors": errors[:5],
    }


def kiln_uncontended(url: str, seconds: float) -> dict[str, Any]:
    clients = [FleetLockClient(url, f"agent-{i}", f"bench-solo-{i}") for i in range(AGENTS)]

    def cycle(i: int) -> None:
        clients[i].pre_reboot()
        clients[i].steady_state()

    return load(AGENTS, seconds, cycle)


def kiln_contended(url: str, seconds: float) -> dict[str, Any]:
    clients = [FleetLockClient(url, f"agent-{i}", "bench-shared") for i in range(AGENTS)]
    refused = [0]

    def cycle(i: int) -> None:
        while True:
            try:
                clients[i].pre_reboot()
                break
            except LockRefused:
                refused[0] += 1
                time.sleep(0.005)
        clients[i].steady_state()

    out = load(AGENTS, seconds, cycle)
    out["refusals"] = refused[0]
    return out


def floor_txn(endpoints: list[str], seconds: float) -> dict[str, Any]:
    etcd = Etcd(endpoints)

    def cycle(i: int) -> None:
        key = f"bench/floor/{i}"
        if not etcd.swap(key, b"held", 0):
            raise RuntimeError(f"{key} was not free")
        etcd.delete(key)

    return load(AGENTS, seconds, cycle)


def floor_etcdctl(endpoints: list[str], runs: int) -> dict[str, Any]:
    times = []
    for i in range(runs):
        t = time.perf_counter()
        subprocess.run(["etcdctl", f"--endpoints={','.join(endpoints)}", "lock", f"bench-cli-{i % 4}", "--", "true"],
                       check=True, capture_output=True, timeout=30)
        times.append(time.perf_counter() - t)
    return {"cycles": runs, "p50_ms": round(statistics.median(times) * 1000, 2),
            "p99_ms": round(pct(times, 0.99) * 1000, 2), "per_s": round(runs / sum(times), 1)}


GUEST_UD = """
[settings.updates]
metadata-base-url = "http://10.0.2.2:{repo}/metadata/"
targets-base-url = "http://10.0.2.2:{repo}/targets/"
strategy = "fleet-lock"
check-interval = "{interval}"
[settings.updates.fleet-lock]
url = "http://10.0.2.2:{fleet}"
group = "bench-vm"
"""
IDLE_SECONDS = 60
IDLE_INTERVAL = "1h"  # the default: the idle window holds no check
ROLLOUT_INTERVAL = "20s"  # then checks come often, for the rollout
# The update daemon is a thread of the host agent (kiln-agent.service, issue 14): what is
# measured is that whole process, the daemon with the API, the mTLS listener and the gate.
DAEMON_UNIT = "kiln-agent.service"
DAEMON_PID = f"systemctl show -p MainPID --value {DAEMON_UNIT}"


def daemon_cost(vm: Any) -> dict[str, Any]:
    """CPU seconds the process holding the idle daemon used over IDLE_SECONDS, and its memory."""
    pid = vm.check(DAEMON_PID).strip()
    hz = int(vm.check("getconf CLK_TCK").strip() or 100)

    def cpu() -> float:
        fields = vm.check(f"cat /proc/{pid}/stat").rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / hz  # utime, stime (fields 14, 15)

    before = cpu()
    time.sleep(IDLE_SECONDS)
    after = cpu()
    status = dict(line.split(":", 1) for line in vm.check(f"cat /proc/{pid}/status").splitlines() if ":" in line)
    kib = {k: int(status[k].split()[0]) for k in ("VmRSS", "VmHWM")}
    return {"process": f"{DAEMON_UNIT} (the whole agent)", "cpu_s": round(after - before, 3), "idle_s": IDLE_SECONDS,
            "cpu_percent": round(100 * (after - before) / IDLE_SECONDS, 3),
            "rss_kib": kib["VmRSS"], "hwm_kib": kib["VmHWM"]}


def guest(server: ServerProcess, tmp: Path) -> dict[str, Any]:
    import re
    import shutil

    import update as U

    from kiln.repo import publish
    from kiln.repo.serve import RepoServer
    from kiln.vm.qemu import Vm, VmConfig

    bench_repo, _, releases, info = U.builds(reuse=True)
    rel1, rel2 = releases[("1.0.0", True)], releases[("2.0.0", True)]
    repo = tmp / "repo"
    shutil.copytree(bench_repo, repo)
    repo_port = free_port()
    out: dict[str, Any] = {"builds_reused": info.get("reused"), "idle_check_interval": IDLE_INTERVAL,
                           "rollout_check_interval": ROLLOUT_INTERVAL}
    vms = []
    with RepoServer(repo, port=repo_port):
        try:
            for i in range(2):
                ud = tmp / f"ud{i}.toml"
                ud.write_text(GUEST_UD.format(repo=repo_port, fleet=server.port, interval=IDLE_INTERVAL))
                disk = tmp / f"disk{i}.img"
                subprocess.run(["cp", "--sparse=always", rel1.disk, disk], check=True)
                log = B.CACHE / "logs" / f"fleet-guest{i}.txt"
                log.parent.mkdir(parents=True, exist_ok=True)
                log.unlink(missing_ok=True)
                vm = Vm(VmConfig(disk, tmp / f"vm{i}", cpus=1, overlay=False, accel="tcg", user_data=ud),
                        serial_log=log)
                vms.append(vm.start())
            for vm in vms:
                vm.wait_ready(U.BOOT_TIMEOUT)
                vm.wait_for(r"kiln-updater: id", 120)
                vm.wait_shell()
            B.log(f"guest: CPU over {IDLE_SECONDS} s of {DAEMON_UNIT}, the daemon idle (check-interval "
                  f"{IDLE_INTERVAL}), and the whole agent's memory")
            out["idle"] = [daemon_cost(vm) for vm in vms]
            for vm in vms:  # now check often, for the rollout
                vm.check(f"kiln settings set updates.check-interval={ROLLOUT_INTERVAL}", timeout=120)
            published = time.monotonic()
            publish.add(repo, rel2.artifacts, waves="none")
            B.log("guest: 2.0.0 published; waiting for both hosts")
            timeline = []
            for vm in vms:
                vm.wait_for(r"kiln-updater: idle: updated to 2\.0\.0", 1800)
                text = vm.output
                events = {"reboot (slot held)": r"kiln-updater: rebooting into the new version",
                          "ready on 2.0.0": r"kiln: ready version=2\.0\.0",
                          "slot given back": r"kiln-updater: idle: updated to 2\.0\.0"}
                row = {}
                for name, rx in events.items():
                    m = re.search(rx, text)
                    row[name] = round(vm.time_at(m.start()) - published, 1) if m else None
                timeline.append(row)
            out["timeline_s"] = timeline
        finally:
            for vm in vms:
                vm.kill()
    return out


def report(r: dict[str, Any]) -> str:
    rows = []
    for name, key in (("kiln, uncontended (own group each)", "kiln_uncontended"),
                      ("kiln, contended (1 group, 3 slots)", "kiln_contended"),
                      ("floor: etcd txn put-if-absent + delete", "floor_txn"),
                      ("floor: etcdctl lock (sequential)", "floor_etcdctl")):
        x = r[key]
        rows.append([name, str(x["cycles"]), f"{x['p50_ms']} ms", f"{x['p99_ms']} ms", f"{x['per_s']}/s"])
    ratios = r["ratios"]
    guest_lines = []
    if "guest" in r:
        g = r["guest"]
        for i, idle in enumerate(g["idle"]):
            what = idle.get("process", "kiln-updater.service")
            guest_lines.append(f"guest {i}: idle daemon, measured as {what}: {idle['cpu_s']} s CPU in "
                               f"{idle['idle_s']} s "
                               f"({idle['cpu_percent']} %), RSS {idle['rss_kib'] / 1024:.1f} MiB "
                               f"(peak {idle['hwm_kib'] / 1024:.1f} MiB)")
        for i, row in enumerate(g["timeline_s"]):
            guest_lines.append(f"guest {i} after publishing 2.0.0: " + ", ".join(f"{k} {v} s" for k, v in row.items()))
    return "\n".join([
        f"FleetLock acquire + release, {AGENTS} concurrent agents, 3-member etcd on loopback "
        f"({r['seconds']} s per load)",
        B.table(rows, ["", "cycles", "p50", "p99", "throughput"]),
        f"kiln uncontended / txn floor: p50 {ratios['p50_vs_txn']:.2f}x, throughput {ratios['throughput_vs_txn']:.2f}x;"
        f" kiln p50 / etcdctl lock p50: {ratios['p50_vs_etcdctl']:.2f}x",
        *guest_lines,
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=15.0, help="length of each load")
    p.add_argument("--guest", action="store_true", help="also two guests: the idle daemon's cost, a rollout")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"machine": B.machine(), "source": B.git_source(), "agents": AGENTS,
                              "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-fleet-") as tmp, etcd_cluster(Path(tmp)) as cluster:
        config = Path(tmp) / "fleet.toml"
        config.write_text("[lock]\ndefault-slots = 1\n[groups.bench-shared]\nslots = 3\n")  # bench-vm: 1 slot
        server = ServerProcess(cluster.endpoints, free_port(), config).start()
        try:
            B.log("floor: etcd txn")
            result["floor_txn"] = floor_txn(cluster.endpoints, args.seconds)
            B.log("kiln: uncontended")
            result["kiln_uncontended"] = kiln_uncontended(server.url, args.seconds)
            B.log("kiln: contended")
            result["kiln_contended"] = kiln_contended(server.url, args.seconds)
            B.log("floor: etcdctl lock")
            result["floor_etcdctl"] = floor_etcdctl(cluster.endpoints, 40)
            if args.guest:
                result["guest"] = guest(server, Path(tmp))
        finally:
            server.kill()
    k, f, c = result["kiln_uncontended"], result["floor_txn"], result["floor_etcdctl"]
    result["ratios"] = {
        "p50_vs_txn": k["p50_ms"] / f["p50_ms"],
        "throughput_vs_txn": k["per_s"] / f["per_s"],
        "p50_vs_etcdctl": k["p50_ms"] / c["p50_ms"],
    }
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    B.emit("fleet", result, report(result), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
