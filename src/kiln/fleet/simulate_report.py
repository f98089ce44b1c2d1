"""What `kiln fleet simulate` writes: timeline.csv, timeline.json (a "planned" rollout the
fleet dashboard loads), summary.json, and PNG plots.

matplotlib is imported here, inside `plot`, and only when plots are asked for: it costs
about a second, and nothing else in Kiln needs it.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.core.fs import atomic_write
from kiln.fleet.simulate import STATES, Result

if TYPE_CHECKING:
    from matplotlib.axes import Axes

STATE_NAMES = [str(s) for s in STATES[:6]]
COLORS = {"idle": "#b0bec5", "waiting-for-window": "#90caf9", "waiting-for-lock": "#ffb74d",
          "rebooting": "#e53935", "confirming": "#8e24aa", "failed": "#212121"}


def write(result: Result, out: Path, plots: bool = True) -> list[Path]:
    """Every output file in `out` (created if missing); each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "timeline.json", out / "timeline.csv", out / "summary.json"]
    atomic_write(files[0], json.dumps(result.plan(), indent=1).encode() + b"\n")
    atomic_write(files[1], timeline_csv(result).encode())
    atomic_write(files[2], json.dumps(result.summary, indent=1).encode() + b"\n")
    if plots:
        files += plot(result, out)
    return files


def timeline_csv(result: Result) -> str:
    old, new = str(result.params.from_version), str(result.params.release.version)
    per_group = bool(result.points) and "held_by_group" in result.points[0]
    header = ["time", "elapsed_s", f"version {old}", f"version {new}", *STATE_NAMES, "slots_held", "halted_groups"]
    if per_group:
        header += [f"held {g}" for g in result.groups]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for p in result.points:
        row = [p["t"], p["elapsed_s"], p["versions"][old], p["versions"][new],
               *(p["states"][s] for s in STATE_NAMES), p["slots_held"], p["halted_groups"]]
        if per_group:
            row += [p["held_by_group"][g] for g in result.groups]
        w.writerow(row)
    return buf.getvalue()


def plot(result: Result, out: Path) -> list[Path]:
    """adoption.png (share on the new version, the waves), reboots.png (reboots in progress
    against the fleet's slots, hosts waiting for a slot), states.png (hosts per daemon phase)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib.figure import Figure

    pts, p, s = result.points, result.params, result.summary
    span = max((pt["elapsed_s"] for pt in pts), default=0)
    unit, per = ("days", 86400.0) if span > 2 * 86400 else ("hours", 3600.0) if span > 2 * 3600 else ("minutes", 60.0)
    x = [pt["elapsed_s"] / per for pt in pts]
    new = str(p.release.version)
    title = (f"{p.hosts:,} hosts, {p.groups} groups x {p.slots} slots, check every {p.check_interval}, "
             f"reboot {p.reboot_time.text}, failure rate {p.failure_rate:g} ({p.waves_name} waves)")
    files = []

    fig = Figure(figsize=(11, 4.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.step(x, [100 * pt["versions"][new] / p.hosts for pt in pts], where="post", color="#1565c0", lw=2,
            label=f"on {new}")
    _waves(ax, result, per)
    for pct, key in ((50, "50%"), (90, "90%"), (100, "100%")):
        hit = s["time_to"][key]
        if hit:
            ax.plot([hit["after_s"] / per], [pct], "o", color="#1565c0")
            ax.annotate(f"{key}: {hit['after']}", (hit["after_s"] / per, pct), textcoords="offset points",
                        xytext=(-6, 6), ha="right", fontsize=9)
    if s["failed_hosts"]:
        ax.text(0.01, 0.75, f"{s['failed_hosts']} hosts failed the health gate; {s['halted_groups']} groups halted, "
                f"{s['waiting_at_end']} hosts left waiting", transform=ax.transAxes, fontsize=9, color="#b71c1c")
    ax.set(ylim=(0, 105), xlim=(0, max(x, default=1) or 1), ylabel="% of hosts", xlabel=f"{unit} from the start",
           title=f"Adoption of {new}\n{title}")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    files.append(out / "adoption.png")
    fig.savefig(files[-1])

    fig = Figure(figsize=(11, 4.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.step(x, [pt["rebooting"] for pt in pts], where="post", color=COLORS["rebooting"], lw=1.5,
            label="reboots in progress")
    ax.axhline(p.groups * p.slots, color="#424242", ls="--", lw=1, label=f"slots in the fleet ({p.groups * p.slots})")
    ax.set(ylim=(0, max(p.groups * p.slots, s["peak_concurrent_reboots"]) * 1.15 + 1), ylabel="hosts rebooting",
           xlabel=f"{unit} from the start", title=f"Concurrent reboots (peak {s['peak_concurrent_reboots']})\n{title}")
    ax.title.set_fontsize(10)
    twin = ax.twinx()
    twin.step(x, [pt["states"]["waiting-for-lock"] for pt in pts], where="post", color=COLORS["waiting-for-lock"],
              lw=1, label="waiting for a slot (right)")
    twin.set_ylabel("hosts waiting for a slot")
    twin.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=9)
    files.append(out / "reboots.png")
    fig.savefig(files[-1])

    fig = Figure(figsize=(11, 4.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    shown = [st for st in STATE_NAMES if any(pt["states"][st] for pt in pts)]
    ax.stackplot(x, [[pt["states"][st] for pt in pts] for st in shown], labels=shown, step="post",
                 colors=[COLORS[st] for st in shown])
    _waves(ax, result, per)
    ax.set(ylim=(0, p.hosts), xlim=(0, max(x, default=1) or 1), ylabel="hosts", xlabel=f"{unit} from the start",
           title=f"Hosts by update daemon phase\n{title}")
    ax.title.set_fontsize(10)
    ax.legend(loc="upper left", fontsize=9)
    files.append(out / "states.png")
    fig.savefig(files[-1])
    return files


def _waves(ax: Axes, result: Result, per: float) -> None:
    start = result.params.start
    for w in result.waves:
        at = (datetime.fromisoformat(w["opens"].replace("Z", "+00:00")) - start).total_seconds() / per
        if at >= 0:
            ax.axvline(at, color="#2e7d32", ls=":", lw=1)
            ax.annotate(f"{w['name']} ({w['hosts'] * 100:.0f} %)", (at, 0.5), xycoords=("data", "axes fraction"),
                        rotation=90, fontsize=7, color="#2e7d32", xytext=(2, 0), textcoords="offset points",
                        va="center")


def describe(summary: dict[str, Any]) -> list[str]:
    """The summary in a few lines, for the terminal."""
    s = summary
    lines = [f"{s['hosts']:,} hosts from {s['from']} to {s['release']}: {s['groups']} groups x "
             f"{s['slots_per_group']} slots, simulated {s['simulated_s'] / 86400:.1f} days in {s['wall_s']} s "
             f"(peak memory {s['peak_rss_mib']} MiB)"]
    for key, hit in s["time_to"].items():
        lines.append(f"  {key} on {s['release']}: " + (f"after {hit['after']} ({hit['t']})" if hit else "never"))
    lines.append(f"  peak concurrent reboots: {s['peak_concurrent_reboots']} (slots in the fleet: {s['slots_total']})")
    if s["failed_hosts"]:
        lines.append(f"  hosts that took the release and failed its health gate: {s['failed_hosts']}; "
                     f"halted groups: {s['halted_groups']}; hosts left waiting: {s['waiting_at_end']}")
    if s["stopped_at_horizon"]:
        lines.append(f"  stopped at the horizon ({s['end']}) with {s['hosts'] - s['updated']} hosts not updated")
    return lines
