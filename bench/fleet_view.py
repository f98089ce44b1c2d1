#!/usr/bin/env python3
"""The fleet's view at scale: N hosts' reports through `kiln fleet serve` into a 3-member etcd
cluster, then what a dashboard costs the server.

- ingest: N hosts (default 20,000) each `POST /v1/report` once with Kiln's FleetLock client,
  32 at a time: reports/s and the server's CPU time per report, against the floor of the
  same number of etcd puts of the same size straight through etcd's JSON gateway (etcd3gw,
  as the server does), 32 at a time. A report costs the server a put and a read of the
  group's semaphore (it tells a failed holder whether it still holds its slot).
- read: `GET /v1/status` (hosts per version/state/group from every report) cold (its
  5-second cache expired) and warm, `GET /v1/hosts?q=…` (a filtered page), wall time and the
  server's CPU time per cold status (utime + stime from /proc/PID/stat).
- memory: the server process's peak RSS (VmHWM) after all of it.

Writes bench/results/fleet_view.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _bench as B

sys.path.insert(0, str(B.REPO))
sys.path.insert(0, str(B.BENCH))

from tests.etcd_cluster import etcd_cluster
from tests.fleet_helpers import ServerProcess

from kiln.fleet.etcd import Etcd
from kiln.fleet.hosts import HostReport
from kiln.host.update.fleetlock import FleetLockClient
from kiln.vm.qemu import free_port

PARALLEL = 32
TICKS = 100  # /proc/PID/stat clock ticks per second (USER_HZ)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def host_id(i: int) -> str:
    return f"{i:032x}"


def ingest(url: str, n: int) -> dict[str, Any]:
    def one(i: int) -> None:
        FleetLockClient(url, host_id(i), f"group-{i % 10}", timeout=60).report(
            "1.0.0" if i % 3 else "2.0.0", None, slot="AB"[i % 2], state="idle", target=None)

    t = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as ex:
        list(ex.map(one, range(n)))
    elapsed = time.monotonic() - t
    return {"reports": n, "seconds": round(elapsed, 1), "per_s": round(n / elapsed, 1)}


def floor_puts(endpoints: list[str], n: int) -> dict[str, Any]:
    etcd = Etcd(endpoints)
    value = HostReport(host_id(0), "group-0", "1.0.0", "A", "idle", None, None, "2026-12-02T00:00:00Z").to_bytes()

    def one(i: int) -> None:
        etcd.put(f"bench/floor-view/{host_id(i)}", value)

    t = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as ex:
        list(ex.map(one, range(n)))
    elapsed = time.monotonic() - t
    return {"puts": n, "seconds": round(elapsed, 1), "per_s": round(n / elapsed, 1)}


def timed_get(url: str) -> tuple[float, Any]:
    t = time.monotonic()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = json.load(r)
    return time.monotonic() - t, body


def reads(server: ServerProcess, n: int) -> dict[str, Any]:
    assert server.proc is not None
    pid = server.proc.pid
    cold, cpu = [], []
    for _ in range(3):
        time.sleep(5.5)  # past the summary's cache
        c0 = cpu_seconds(pid)
        s, body = timed_get(f"{server.url}/v1/status")
        cpu.append(cpu_seconds(pid) - c0)
        cold.append(s)
        assert body["hosts"]["total"] == n, body["hosts"]["total"]
    warm = [timed_get(f"{server.url}/v1/status")[0] for _ in range(3)]
    filtered = [timed_get(f"{server.url}/v1/hosts?q=abc&limit=200")[0] for _ in range(3)]
    return {
        "status_cold_s": round(B.median(cold) or 0, 2), "status_cold_cpu_s": round(B.median(cpu) or 0, 2),
        "status_warm_s": round(B.median(warm) or 0, 3), "hosts_filtered_s": round(B.median(filtered) or 0, 3),
        "server_hwm_mib": round(hwm_mib(pid), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=20_000)
    args = p.parse_args(argv)
    info = B.machine()
    B.other_work(warn=True)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-view-") as tmp, etcd_cluster(Path(tmp) / "etcd") as etcd:
        server = ServerProcess(etcd.endpoints, free_port()).start()
        try:
            B.log(f"{args.hosts} reports through kiln fleet serve")
            assert server.proc is not None
            c0 = cpu_seconds(server.proc.pid)
            kiln = ingest(server.url, args.hosts)
            kiln["server_cpu_ms_per_report"] = round((cpu_seconds(server.proc.pid) - c0) * 1000 / args.hosts, 2)
            B.log(f"{args.hosts} etcd puts (floor)")
            floor = floor_puts(etcd.endpoints, args.hosts)
            B.log("dashboard reads")
            read = reads(server, args.hosts)
        finally:
            server.kill()
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"machine": info, "source": B.git_source(), "parallel": PARALLEL, "hosts": args.hosts,
              "ingest": kiln, "floor": floor, "read": read, "ingest_ratio": B.ratio(floor["per_s"], kiln["per_s"])}
    print(B.table([
        ["reports in (kiln fleet serve)", f"{kiln['per_s']:.0f}/s",
         f"{kiln['seconds']} s, server CPU {kiln['server_cpu_ms_per_report']} ms each"],
        ["etcd puts (floor)", f"{floor['per_s']:.0f}/s", f"{floor['seconds']} s"],
        ["GET /v1/status, cold", f"{read['status_cold_s']} s", f"server CPU {read['status_cold_cpu_s']} s"],
        ["GET /v1/status, cached", f"{read['status_warm_s']} s", ""],
        ["GET /v1/hosts?q= (200)", f"{read['hosts_filtered_s']} s", ""],
        ["server peak RSS", f"{read['server_hwm_mib']} MiB", ""],
    ], [f"{args.hosts} hosts", "rate / time", ""]))
    print(f"kiln/floor ingest time: {B.fmt_ratio(result['ingest_ratio'])}")
    B.write_result("fleet_view", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
