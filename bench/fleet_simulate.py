#!/usr/bin/env python3
"""Fleet simulator: `kiln fleet simulate` planning a rollout of 100,000 hosts (and 10,000
beside it) with the default waves, against running every daemon pass of a small fleet.

Each size runs `kiln fleet simulate` as its own process (`python -m kiln.cli.main`), so its
peak resident memory (getrusage of that child alone, via wait4) is its own. The release is
a manifest.json with 1.0.0 and 2.0.0, 2.0.0 on the built-in `default` waves; one FleetLock
group per 1,000 hosts, 1 slot each, checks every hour, reboots of 40-90 s (uniform).

Reported per size: the simulation's own wall time (summary.json's `wall_s`: the event loop,
every daemon pass), the whole command's wall and CPU time (Python start, imports, reading
the release, writing the timeline, summary and three PNG plots), peak RSS, daemon passes
and events per second, and what the simulation found (time to 50/90/100 %, peak concurrent
reboots). Then the same 2,000-host fleet with and without `--exact` (every check and every
lock retry of every daemon run through Updater.step): what the shortcuts save, and how
far apart the two predictions are. Target: 100,000 hosts in under 60 s.

Writes bench/results/fleet_simulate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import _bench as B

sys.path.insert(0, str(B.REPO))

from kiln.host.update.manifest import format_time
from kiln.repo import schedule

START = datetime(2027, 1, 4, tzinfo=UTC)  # a Monday
TARGET_S = 60.0
COMMON = ["--reboot-time", "uniform:40s-90s", "--check-interval", "1h", "--slots", "1", "--seed", "1"]


def manifest(path: Path) -> Path:
    image = {"target": "x.img.zst", "size": 1, "sha256": "0" * 64}

    def release(version: str, waves: dict[str, str]) -> dict[str, Any]:
        return {"variant": "container-host", "arch": "amd64", "version": version, "max_version": version,
                "waves": waves, "images": {"boot": image, "root": image, "hash": image},
                "verity": {"root_hash": "0" * 64, "salt": "0" * 64, "data_blocks": 1}}

    waves = {str(seed): format_time(t) for seed, t in schedule.load("default").at(START).items()}
    path.write_text(json.dumps({"updates": [release("1.0.0", {}), release("2.0.0", waves)], "migrations": {}}))
    return path


def run(release: Path, out: Path, hosts: int, *extra: str) -> dict[str, Any]:
    """One `kiln fleet simulate` process: its summary, wall and CPU time, and peak RSS."""
    argv = [sys.executable, "-m", "kiln.cli.main", "fleet", "simulate", "--hosts", str(hosts), "--release",
            str(release), "--output", str(out), *COMMON, *extra]
    B.log(" ".join(argv[3:]))
    t = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=B.REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"kiln fleet simulate failed ({proc.returncode}): {err[-2000:]}")
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    plan = json.loads((out / "timeline.json").read_text())
    work = summary["work"]
    return {
        "hosts": hosts, "args": argv[3:],
        "simulation_s": summary["wall_s"], "command_wall_s": round(wall, 2),
        "command_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "simulated_days": round(summary["simulated_s"] / 86400, 2),
        "daemon_passes": work["daemon_passes"], "events": work["events"],
        "passes_per_s": round(work["daemon_passes"] / summary["wall_s"]) if summary["wall_s"] else None,
        "checks_not_run": work["checks_before_the_wave_not_run"], "parked": work["parked"],
        "timeline_points": len(plan["points"]),
        "files_kib": {p.name: round(p.stat().st_size / 1024, 1) for p in sorted(out.iterdir())},
        "time_to_s": {k: v and v["after_s"] for k, v in summary["time_to"].items()},
        "time_to": {k: v and v["after"] for k, v in summary["time_to"].items()},
        "peak_concurrent_reboots": summary["peak_concurrent_reboots"], "slots_total": summary["slots_total"],
    }


def report(r: dict[str, Any]) -> str:
    rows = []
    for x in r["sizes"]:
        t = x["time_to"]
        rows.append([f"{x['hosts']:,} hosts", f"{x['simulation_s']:.1f} s", f"{x['command_wall_s']:.1f} s",
                     f"{x['command_cpu_s']:.1f} s", f"{x['peak_rss_mib']:.0f} MiB", f"{x['daemon_passes']:,}",
                     f"{x['passes_per_s']:,}/s", f"{t['50%']} / {t['90%']} / {t['100%']}",
                     f"{x['peak_concurrent_reboots']}/{x['slots_total']}"])
    for name, x in (("2,000 hosts, shortcuts", r["small"]["fast"]), ("2,000 hosts, --exact", r["small"]["exact"])):
        t = x["time_to"]
        rows.append([name, f"{x['simulation_s']:.1f} s", f"{x['command_wall_s']:.1f} s",
                     f"{x['command_cpu_s']:.1f} s", f"{x['peak_rss_mib']:.0f} MiB", f"{x['daemon_passes']:,}",
                     f"{x['passes_per_s']:,}/s", f"{t['50%']} / {t['90%']} / {t['100%']}",
                     f"{x['peak_concurrent_reboots']}/{x['slots_total']}"])
    big = r["sizes"][-1]
    verdict = "ok" if big["command_wall_s"] < TARGET_S else "MISSED"
    s = r["small"]
    return "\n".join([
        "kiln fleet simulate, default waves, one group of 1 slot per 1,000 hosts, checks every 1h, reboots 40-90 s",
        B.table(rows, ["", "simulation", "command", "CPU", "peak RSS", "daemon passes", "passes/s",
                       "50 / 90 / 100 % updated", "peak reboots/slots"]),
        f"{big['hosts']:,} hosts, whole command: {big['command_wall_s']:.1f} s (target < {TARGET_S:.0f} s): {verdict}; "
        f"scaling {r['scaling']['from']:,} -> {r['scaling']['to']:,} hosts: x{r['scaling']['wall']:.2f} simulation "
        f"time, x{r['scaling']['rss']:.2f} peak RSS",
        f"2,000 hosts: --exact ran {s['passes_ratio']:.1f}x the daemon passes in {s['wall_ratio']:.1f}x the time; "
        f"its 50/90/100 % differ from the shortcuts' by {s['time_to_diff_percent']} %",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", default="10000,100000", help="fleet sizes, comma separated (default 10000,100000)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    B.other_work(warn=True)
    result: dict[str, Any] = {"machine": B.machine(), "source": B.git_source(), "common_args": COMMON,
                              "waves": "default", "start": format_time(START)}
    sizes = sorted(int(n) for n in args.hosts.split(","))
    with tempfile.TemporaryDirectory(prefix="kiln-bench-simulate-") as tmp:
        release = manifest(Path(tmp) / "manifest.json")
        result["sizes"] = [run(release, Path(tmp) / str(n), n) for n in sizes]
        fast = run(release, Path(tmp) / "small-fast", 2000, "--groups", "2")
        exact = run(release, Path(tmp) / "small-exact", 2000, "--groups", "2", "--exact")
    a, b = result["sizes"][0], result["sizes"][-1]
    result["scaling"] = {"from": a["hosts"], "to": b["hosts"], "wall": round(b["simulation_s"] / a["simulation_s"], 2),
                         "rss": round(b["peak_rss_mib"] / a["peak_rss_mib"], 2)}
    result["small"] = {
        "fast": fast, "exact": exact,
        "passes_ratio": round(exact["daemon_passes"] / fast["daemon_passes"], 1),
        "wall_ratio": round(exact["simulation_s"] / fast["simulation_s"], 1),
        "time_to_diff_percent": [round(100 * (fast["time_to_s"][k] - exact["time_to_s"][k]) / exact["time_to_s"][k], 2)
                                 for k in ("50%", "90%", "100%")],
    }
    result["target_s"] = TARGET_S
    result["ok"] = b["command_wall_s"] < TARGET_S
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    B.emit("fleet_simulate", result, report(result), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
