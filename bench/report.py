#!/usr/bin/env python3
"""docs/benchmarks.md from bench/results/*.json: every table and every figure in it.

The prose is hand-written in bench/benchmarks.md.in; every measured figure in it is a
placeholder, `{{section.key}}`, filled here from the recorded runs. A run is one invocation
of a benchmark (bench/_bench.py keeps every one, with its commit, date, machine and load).
Figures are medians over the recorded runs of the same configuration (and over the
repetitions inside each run where a benchmark repeats a measurement); each section says
which commits and how many runs they come from. A target is judged only on the median of
at least MIN_MEASUREMENTS measurements; with fewer it says so and asks for a re-run.

    .venv/bin/python bench/report.py           # write docs/benchmarks.md
    .venv/bin/python bench/report.py --check   # exit 1 if docs/benchmarks.md is not what the results give
    .venv/bin/python bench/report.py --lint    # hand-typed figures in the template (exit 1 if any)
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
TEMPLATE = BENCH / "benchmarks.md.in"
OUTPUT = REPO / "docs" / "benchmarks.md"
MiB = 1024 * 1024
MIN_MEASUREMENTS = 3
BENCHMARKS = ("build_time", "boot_time", "api_latency", "guest_api", "update", "containers", "fleet",
              "fleet_simulate", "fleet_view", "secure_boot")

Run = dict[str, Any]


# ------------------------------------------------------------------ numbers and cells
def med(values: Iterable[float | int | None]) -> float | None:
    got = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return statistics.median(got) if got else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def sec(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f} s"


def msec(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f} ms"


def mib(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v / MiB:.{digits}f} MiB"


def num(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def rate(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}/s"


def pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f} %"


def count(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def listing(values: Sequence[float | None], fmt: Callable[[float | None], str]) -> str:
    return ", ".join(fmt(v) for v in values)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def dig(obj: Any, *path: str | int) -> Any:
    """obj[path[0]][path[1]]…, or None where any step is missing."""
    for key in path:
        in_dict = isinstance(obj, dict) and key in obj
        in_list = isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj)
        if in_dict or in_list:
            obj = obj[key]
        else:
            return None
    return obj


# ------------------------------------------------------------------ runs: where the figures come from
def load(name: str) -> list[Run]:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise SystemExit(f"{path.relative_to(REPO)}: not a list of runs")
    return data


def short(commit: str | None) -> str:
    return commit[:7] if commit else "?"


def commit_cell(run: Run) -> str:
    if run.get("commit"):
        dirty = run.get("uncommitted")
        return f"`{short(run['commit'])}`" + (f" + {len(dirty)} uncommitted" if dirty else "")
    if run.get("committed_in"):
        return f"not recorded (results committed in `{short(run['committed_in'])}`)"
    return "not recorded"


def load_cell(run: Run) -> str:
    start, end = dig(run, "load", "start", 0), dig(run, "load", "end", 0)
    if start is None and end is None:
        return "not recorded"
    return f"{num(start)} → {num(end)}" if end is not None else f"{num(start)} → ?"


def day(run: Run) -> str:
    date = run.get("date") or "?"
    return date[:16].replace("T", " ")


CONVERTED = "written before every run was kept"  # how the note of a converted run starts


def runs_table(runs: Sequence[Run], columns: Sequence[tuple[str, Callable[[Run], str]]] = ()) -> str:
    """One row per recorded run: when, which code, the machine's load, and the key figures."""
    rows = []
    for i, run in enumerate(runs, 1):
        note = run.get("note") or ""
        if note:  # a run converted from an old single-run file, or one whose recording says how it was run
            note = " (converted from a single-run file)" if note.startswith(CONVERTED) else f" ({note})"
        rows.append([str(i), day(run) + note, commit_cell(run), load_cell(run), *(fn(run) for _, fn in columns)])
    return table(["run", "date (UTC)", "commit", "1-min load start → end", *(h for h, _ in columns)], rows)


def provenance(runs: Sequence[Run], what: str = "") -> str:
    """'3 runs (commits a, b; 2026-11-26 – 2026-12-02)' for a table's caption."""
    if not runs:
        return "no run recorded"
    commits: list[str] = []
    for run in runs:
        c = short(run.get("commit")) if run.get("commit") else "not recorded"
        if run.get("commit") and run.get("uncommitted"):
            c += " + uncommitted changes"
        if c not in commits:
            commits.append(c)
    dates = sorted(day(r)[:10] for r in runs)
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} – {dates[-1]}"
    n = len(runs)
    word = "run" if n == 1 else "runs"
    label = "commit" if len(commits) == 1 else "commits"
    extra = f", {what}" if what else ""
    rerun = "; re-run needed" if n < MIN_MEASUREMENTS else ""
    def fmt(c: str) -> str:
        return c if c == "not recorded" else f"`{c[:7]}`{c[7:]}"

    return f"**{n} {word}**{extra} ({label} {', '.join(fmt(c) for c in commits)}; {span}){rerun}"


def verdict(samples: Sequence[float | None], ok: Callable[[float], bool], fmt: Callable[[float | None], str],
            runs: int, unit_of_measure: str = "runs") -> str:
    """'**met** (median of 5 runs: 9.41 ms)' or 'not judged: 1 run, re-run needed (9.74 ms)'."""
    got = [s for s in samples if s is not None]
    m = med(got)
    if len(got) < MIN_MEASUREMENTS:
        what = f"{len(got)} measurement{'s' if len(got) != 1 else ''}"
        if unit_of_measure == "runs":
            what = f"{len(got)} run{'s' if len(got) != 1 else ''}"
        return f"not judged: {what}, re-run needed (so far {fmt(m)})"
    word = "met" if m is not None and ok(m) else "missed"
    of = f"{len(got)} {unit_of_measure}" if unit_of_measure == "runs" else (
        f"{len(got)} {unit_of_measure} from {runs} run{'s' if runs != 1 else ''}")
    return f"**{word}** (median of {of}: {fmt(m)})"


# ------------------------------------------------------------------ the machine
def machines(all_runs: dict[str, list[Run]]) -> str:
    seen: dict[tuple[Any, ...], list[str]] = {}
    for name, runs in all_runs.items():
        for run in runs:
            m = run.get("machine") or {}
            key = (m.get("cpu"), m.get("cpus"), m.get("memory_mib"), m.get("virtualization"), m.get("python"),
                   m.get("qemu"))
            seen.setdefault(key, [])
            if name not in seen[key]:
                seen[key].append(name)
    rows = []
    for (cpu, cpus, memory, virt, python, qemu), names in seen.items():
        if cpu is None:
            rows.append(["not recorded", "", "", "", "", ", ".join(names)])
            continue
        qemu_version = (qemu or "").split("(")[0].replace("QEMU emulator version", "").strip() or "–"
        rows.append([f"{cpus} × {cpu}", f"{memory / 1024:.1f} GiB" if memory else "–", virt or "–", python or "–",
                     qemu_version, ", ".join(names)])
    kernels = sorted({dig(r, "machine", "kernel") for runs in all_runs.values() for r in runs} - {None})
    out = table(["CPUs", "memory", "virtualization", "Python", "QEMU", "benchmarks"], rows)
    return out + f"\n\nHost kernels seen in the runs: {', '.join(f'`{k}`' for k in kernels)}."


# ------------------------------------------------------------------ build_time
def build_section(runs: list[Run]) -> dict[str, str]:
    pairs = [p for r in runs for p in dig(r, "result", "per_run") or []]

    def m(key: str, field: str) -> float | None:
        return med(dig(p, key, field) for p in pairs)

    # Times vary with the machine, so they are medians over every run; sizes follow the code
    # (a run at an older commit measured another image), so they come from the latest run.
    latest = (dig(runs[-1], "result", "per_run") or []) if runs else []

    def size(name: str) -> float | None:
        return med(dig(p, "kiln_warm", "sizes", name) for p in latest)

    kc, kw, dc, dw = m("kiln_cold", "seconds"), m("kiln_warm", "seconds"), m("debootstrap_cold", "seconds"), \
        m("debootstrap_warm", "seconds")
    targets = dig(runs[-1], "result", "summary", "targets") if runs else {}
    t_cold, t_warm, t_root = (dig(targets, k, "target") for k in ("cold_s", "warm_s", "root_mib"))
    n = len(runs)
    unit = "cold+warm pairs"
    v_cold = verdict([dig(p, "kiln_cold", "seconds") for p in pairs], lambda x: x <= t_cold, sec, n, unit)
    v_warm = verdict([dig(p, "kiln_warm", "seconds") for p in pairs], lambda x: x <= t_warm, sec, n, unit)
    root_now = size("root")
    # A build is reproducible (SOURCE_DATE_EPOCH, fixed UUIDs), so one build measures the size.
    v_root = "not measured" if root_now is None else (
        f"**{'met' if root_now / MiB <= t_root else 'missed'}** (the latest run's build: {root_now / MiB:.1f} MiB)")
    dl_k, dl_d = m("kiln_cold", "cache_bytes"), m("debootstrap_cold", "cache_bytes")
    tree_k, tree_d = size("rootfs_tree"), m("debootstrap_warm", "tree_bytes")
    rows = [
        ["cold cache (apt lists and .debs downloaded)", sec(kc, 1), sec(dc, 1), num(ratio(kc, dc)),
         f"≤ {t_cold:.0f} s: {v_cold}"],
        ["warm cache", sec(kw, 1), sec(dw, 1), num(ratio(kw, dw)), f"≤ {t_warm:.0f} s: {v_warm}"],
        ["downloaded", mib(dl_k), mib(dl_d), num(ratio(dl_k, dl_d)), ""],
        ["root tree (files)", mib(tree_k, 0), mib(tree_d, 0), num(ratio(tree_k, tree_d)), ""],
        ["root filesystem (erofs lz4hc, 64 KiB clusters)", mib(size("root")), "—", "", f"≤ {t_root:.0f} MiB: {v_root}"],
        ["verity tree / initramfs", f"{mib(size('hash'))} / {mib(size('initrd'))}", "—", "", ""],
        ["disk image: size / allocated", f"{mib(size('disk'), 0)} / {mib(size('disk_allocated'), 0)}", "—", "", ""],
    ]
    steps = list(dig(pairs[0], "kiln_warm", "steps") or {}) if pairs else []
    step_rows = [[k, sec(med(dig(p, "kiln_cold", "steps", k) for p in pairs)),
                  sec(med(dig(p, "kiln_warm", "steps", k) for p in pairs))] for k in steps]
    packages = med(dig(p, "debootstrap_warm", "packages") for p in pairs)
    return {
        "provenance": provenance(runs, f"{len(pairs)} cold+warm pair{'s' if len(pairs) != 1 else ''}"),
        "table": table(["", "kiln build", "debootstrap minbase + systemd, python3, containerd, runc",
                        "kiln/debootstrap", "target"], rows),
        "steps": table(["kiln build step (`BuildResult.timings`)", "cold", "warm"], step_rows),
        "debootstrap_packages": count(packages),
        "biggest_warm_step": max((k for k in steps if k != "total"),
                                 key=lambda k: med(dig(p, "kiln_warm", "steps", k) for p in pairs) or 0.0,
                                 default="–"),
        "runs": runs_table(runs, [
            ("kiln cold / warm", lambda r: " / ".join(sec(dig(p, "kiln_cold", "seconds"), 1) + " / "
                                                      + sec(dig(p, "kiln_warm", "seconds"), 1)
                                                      for p in dig(r, "result", "per_run") or [])),
            ("debootstrap cold / warm", lambda r: " / ".join(
                sec(dig(p, "debootstrap_cold", "seconds"), 1) + " / " + sec(dig(p, "debootstrap_warm", "seconds"), 1)
                for p in dig(r, "result", "per_run") or [])),
            ("root filesystem", lambda r: mib(dig(r, "result", "summary", "root_bytes"))),
        ]),
        "target_cold": f"≤ {t_cold:.0f} s", "target_warm": f"≤ {t_warm:.0f} s", "target_root": f"≤ {t_root:.0f} MiB",
        "verdict_cold": v_cold, "verdict_warm": v_warm, "verdict_root": v_root,
    }


# ------------------------------------------------------------------ boot_time
SYSTEMS = ("floor", "kiln", "kiln-2nd", "general")
# Like for like (bench/boot_time.py PATHS): Kiln's first and second boot against the general-purpose
# system booted the same way. Runs from before these were measured lack them: their cells are "–".
BOOT_PATHS = (("OVMF + GRUB", "kiln", "kiln-2nd", "general-grub"),
              ("direct kernel boot (SeaBIOS)", "kiln-direct", "kiln-direct-2nd", "general"))
# Issue 14, item 4: Kiln's kernel → ready at most half the general-purpose Debian's kernel → its marker
# (multi-user.target, containerd running), booted the same way, at each vCPU count, first boot and steady
# state; Kiln's QEMU start → ready (OVMF + GRUB, its own boot path) at most 12 s at 1 vCPU.
BOOT_LIKE_MAX = 0.5
BOOT_READY_MAX_S = 12.0
BOOT_READY_CPUS = 1


def boot_section(runs: list[Run]) -> dict[str, str]:
    boots = [b for r in runs for b in dig(r, "result", "per_boot") or [] if not b.get("error")]
    cpus = sorted({b["cpus"] for b in boots})

    def marker(system: str, c: int, field: str = "marker_s") -> float | None:
        if field == "marker_s":
            return med(b.get("marker_s") for b in boots if b["system"] == system and b["cpus"] == c)
        return med(dig(b, "milestones", field) for b in boots if b["system"] == system and b["cpus"] == c)

    def n_boots(system: str, c: int) -> int:
        return sum(1 for b in boots if b["system"] == system and b["cpus"] == c)

    def run_ratio(kiln: str, general: str, c: int, field: str) -> float | None:
        """kiln / general from the medians of each run (both measured side by side), median over runs."""
        per_run = []
        for r in runs:
            got = [b for b in dig(r, "result", "per_boot") or [] if not b.get("error") and b["cpus"] == c]

            def m(system: str, got: list[dict[str, Any]] = got) -> float | None:
                return med(b.get(field) if field == "marker_s" else dig(b, "milestones", field)
                           for b in got if b["system"] == system)

            per_run.append(ratio(m(kiln), m(general)))
        return med(per_run)

    like_header = ["", *(f"{c} vCPU: {what}" for c in cpus for what in ("QEMU start → ready", "kernel → ready"))]
    like_rows = []
    for path, k1, k2, gen in BOOT_PATHS:
        for i, (label, system) in enumerate((("kiln, first boot", k1), ("kiln, second boot", k2),
                                             ("general-purpose Debian (its marker)", gen))):
            like_rows.append([f"**{path}**: {label}" if i == 0 else f"— {label}",
                              *(sec(marker(system, c, f)) for c in cpus
                                for f in ("marker_s", "kernel_to_marker_s"))])
        for label, system in (("first", k1), ("second", k2)):
            like_rows.append([f"— kiln / general, {label} boot (ratio in each run, median)",
                              *(num(run_ratio(system, gen, c, f)) for c in cpus
                                for f in ("marker_s", "kernel_to_marker_s"))])
    like_systems = [s for p in BOOT_PATHS for s in p[1:]]
    like_rows.append(["boots per system (all runs)",
                      *(str(min(n_boots(s, c) for s in like_systems)) for c in cpus for _ in range(2))])

    def like_cell(r: Run, c: int) -> str:
        return " / ".join(num(dig(r, "result", "summary", str(c), "like_for_like", path, "first", "whole"))
                          for path in ("grub", "direct"))

    def general_cell(r: Run, c: int) -> str:
        return num(dig(r, "result", "summary", str(c), "ratios", "kiln/general"))

    header = ["", *(f"{c} vCPU" for c in cpus)]
    rows = [
        ["floor: same kernel, busybox initramfs printing a marker (direct kernel boot)",
         *(sec(marker("floor", c)) for c in cpus)],
        ["**kiln**, first boot (QEMU start → ready)", *(sec(marker("kiln", c)) for c in cpus)],
        ["— firmware (OVMF) / kernel → ready", *(f"{sec(marker('kiln', c, 'firmware_s'))} / "
                                                f"{sec(marker('kiln', c, 'kernel_to_marker_s'))}" for c in cpus)],
        ["**kiln**, second boot of the same disk", *(sec(marker("kiln-2nd", c)) for c in cpus)],
        ["— kernel → ready", *(sec(marker("kiln-2nd", c, "kernel_to_marker_s")) for c in cpus)],
        ["general-purpose Debian (direct kernel boot)", *(sec(marker("general", c)) for c in cpus)],
        ["— kernel → marker", *(sec(marker("general", c, "kernel_to_marker_s")) for c in cpus)],
        ["kiln (OVMF + GRUB) / general (direct), whole boot (the target as first set)",
         *(num(ratio(marker("kiln", c), marker("general", c))) for c in cpus)],
        ["kernel → ready, kiln second boot / general",
         *(num(ratio(marker("kiln-2nd", c, "kernel_to_marker_s"), marker("general", c, "kernel_to_marker_s")))
           for c in cpus)],
        ["boots per system (all runs)", *(str(min(n_boots(s, c) for s in SYSTEMS)) for c in cpus)],
    ]
    # The target as first set (kept for continuity): Kiln's whole boot through OVMF + GRUB against the
    # general system's whole boot by direct kernel boot, each Kiln boot over the median of every general one.
    target_max = dig(runs[-1], "result", "summary", str(cpus[0]), "target", "max") if runs and cpus else None
    verdicts = []
    for c in cpus:
        kiln = [b.get("marker_s") for b in boots if b["system"] == "kiln" and b["cpus"] == c]
        general = marker("general", c)
        samples = [None if k is None or general is None else k / general for k in kiln]
        verdicts.append(f"{c} vCPU: " + verdict(samples, lambda x: x <= (target_max or 0), num, len(runs), "boots"))

    # The target (issue 14): kernel → ready, like for like. Judged only on runs that booted the general
    # system both ways (summary.<cpus>.like_for_like): each Kiln boot's kernel → ready over the median
    # kernel → marker of the general system booted the same way in the same run and at the same vCPU count.
    like_runs = [r for r in runs if any(dig(r, "result", "summary", str(c), "like_for_like") for c in cpus)]

    def like_verdict(kiln_system: str, general_system: str) -> str:
        cells = []
        for c in cpus:
            samples: list[float | None] = []
            used = 0
            for r in like_runs:
                got = [b for b in dig(r, "result", "per_boot") or [] if not b.get("error") and b["cpus"] == c]
                general = med(dig(b, "milestones", "kernel_to_marker_s") for b in got if b["system"] == general_system)
                kiln = [dig(b, "milestones", "kernel_to_marker_s") for b in got if b["system"] == kiln_system]
                samples += [ratio(k, general) for k in kiln]
                used += bool(kiln)
            cells.append(f"{c} vCPU: " + verdict(samples, lambda x: x <= BOOT_LIKE_MAX, num, used, "boots"))
        return "; ".join(cells)

    like_verdicts = {f"verdict_{key}_{boot}": like_verdict(kiln_system, general_system)
                     for key, (_, first, second, general_system) in zip(("grub", "direct"), BOOT_PATHS, strict=True)
                     for boot, kiln_system in (("first", first), ("second", second))}

    def ready_verdict(system: str) -> str:
        samples = [b.get("marker_s") for b in boots if b["system"] == system and b["cpus"] == BOOT_READY_CPUS]
        used = sum(1 for r in runs if any(not b.get("error") and b["system"] == system and b["cpus"] == BOOT_READY_CPUS
                                          for b in dig(r, "result", "per_boot") or []))
        return verdict(samples, lambda x: x <= BOOT_READY_MAX_S, sec, used, "boots")

    like_label = {"grub": "OVMF + GRUB", "direct": "direct kernel boot"}
    like_targets = [[f"kiln / general, kernel → ready, {like_label[key]}, "
                     f"{'first boot' if boot == 'first' else 'steady state (second boot)'}",
                     f"≤ {num(BOOT_LIKE_MAX, 1)}", like_verdicts[f"verdict_{key}_{boot}"]]
                    for key in ("grub", "direct") for boot in ("first", "second")]
    like_targets += [[f"kiln, QEMU start → ready at {BOOT_READY_CPUS} vCPU (OVMF + GRUB), "
                      f"{'first boot' if system == 'kiln' else 'steady state (second boot)'}",
                      f"≤ {sec(BOOT_READY_MAX_S, 0)}", ready_verdict(system)] for system in ("kiln", "kiln-2nd")]
    tl = dig(runs[-1], "result", "timeline") if runs else None
    phase_rows = []
    if tl:
        names = list(dig(tl, "general", "phases") or dig(tl, "kiln", "phases") or {})
        phase_rows = [[k, sec(dig(tl, "kiln", "phases", k)), sec(dig(tl, "general", "phases", k))] for k in names]

    def slowest(system: str) -> str:
        units = (dig(tl, system, "slowest_units") or [])[:8] if tl else []
        return table(["unit", "start", "end", "seconds"],
                     [[u["unit"], sec(u.get("start")), sec(u.get("end")), sec(u.get("seconds"))] for u in units])

    return {
        "provenance": provenance(runs, f"{min((n_boots(s, c) for s in SYSTEMS for c in cpus), default=0)} boots "
                                       f"per system and vCPU count"),
        "table": table(header, rows),
        "like_for_like": table(like_header, like_rows),
        "target_max": f"≤ {num(target_max, 1)}",
        "verdict": "; ".join(verdicts),
        "target_like": f"≤ {num(BOOT_LIKE_MAX, 1)}",
        **like_verdicts,
        "like_runs": f"{len(like_runs)} run{'s' if len(like_runs) != 1 else ''}",
        "target_ready": f"≤ {sec(BOOT_READY_MAX_S, 0)}",
        "verdict_ready_first": ready_verdict("kiln"),
        "verdict_ready_second": ready_verdict("kiln-2nd"),
        "targets": table(["target", "limit", "verdict"], like_targets),
        "timeline_provenance": f"the last run ({day(runs[-1])} UTC), {tl.get('cpus')} vCPU" if tl else "none",
        "timeline": table(["phase (seconds since QEMU start, verbose console)", "kiln", "general"], phase_rows),
        "slowest_kiln": slowest("kiln"),
        "slowest_general": slowest("general"),
        "general_packages": count(dig(runs[-1], "result", "general", "packages")) if runs else "–",
        "general_tree": mib(dig(runs[-1], "result", "general", "tree_bytes"), 0) if runs else "–",
        "runs": runs_table(runs, [
            *((f"kiln / general ({c} vCPU)", partial(general_cell, c=c)) for c in cpus),
            *((f"like for like, first boot: OVMF + GRUB / direct ({c} vCPU)", partial(like_cell, c=c))
              for c in cpus)]),
    }


# ------------------------------------------------------------------ api_latency
def api_section(runs: list[Run]) -> dict[str, str]:
    def rows_of(server: str, workload: str, clients: int) -> list[dict[str, Any]]:
        return [x for r in runs for x in dig(r, "result", "runs") or []
                if x["server"] == server and x["workload"] == workload and x["clients"] == clients]

    def m(server: str, workload: str, clients: int, field: str) -> float | None:
        return med(x.get(field) for x in rows_of(server, workload, clients))

    lines = []
    for server, workload, clients, label in [
        ("floor", "GET /settings", 1, "floor GET"), ("kiln", "GET /settings", 1, "**kiln GET /settings**"),
        ("floor", "GET /settings", 16, "floor GET"), ("kiln", "GET /settings", 16, "**kiln GET /settings**"),
        ("kiln", "PATCH+commit+apply", 1, "kiln PATCH + commit_and_apply (renders motd; restarts off)"),
        ("kiln", "PATCH+commit+apply", 16, "kiln PATCH + commit_and_apply"),
    ]:
        p99s = [x.get("p99_ms") for x in rows_of(server, workload, clients)]
        cpu = m(server, workload, clients, "server_cpu_us_per_op")
        lines.append([label, str(clients), msec(m(server, workload, clients, "p50_ms")),
                      msec(m(server, workload, clients, "p99_ms")), listing(p99s, lambda v: num(v)),
                      rate(m(server, workload, clients, "ops_per_s")), "–" if cpu is None else f"{cpu:,.0f} µs"])
    samples = [next((x.get("p99_ms") for x in dig(r, "result", "runs") or []
                     if x["server"] == "kiln" and x["workload"] == "GET /settings" and x["clients"] == 16), None)
               for r in runs]
    limit = dig(runs[-1], "result", "target", "get_p99_ms_max") if runs else None
    k16, f16 = m("kiln", "GET /settings", 16, "p99_ms"), m("floor", "GET /settings", 16, "p99_ms")
    return {
        "provenance": provenance(runs),
        "table": table(["", "clients", "p50", "p99", "p99 of each run (ms)", "throughput", "server CPU / request"],
                       lines),
        "target_limit": f"< {msec(limit, 0)}",
        "verdict": verdict(samples, lambda x: x < (limit or 0), msec, len(runs)),
        "p99_ratio_16": num(ratio(k16, f16)),
        "rss_kiln": mib((med(dig(r, "result", "rss_kib", "kiln") for r in runs) or 0) * 1024 or None),
        "rss_floor": mib((med(dig(r, "result", "rss_kib", "floor") for r in runs) or 0) * 1024 or None),
        "runs": runs_table(runs, [("kiln GET p99, 16 clients", lambda r: msec(next(
            (x.get("p99_ms") for x in dig(r, "result", "runs") or []
             if x["server"] == "kiln" and x["workload"] == "GET /settings" and x["clients"] == 16), None)))]),
    }


# ------------------------------------------------------------------ guest_api
AGENT_UNIT = "kiln-agent.service"
SUPERVISOR_UNIT = "kiln-containers.service"
GUEST_KILN_TARGET_BYTES = 40 * MiB  # issue 14: Kiln's resident memory at ready (agent + supervisor)
GUEST_FIRST_TARGET_S = 0.2  # issue 14: API first response after boot
GUEST_BOOTS = (("first_boot", "first boot (user data, generators, full render, restarts)"),
               ("second_boot", "second boot (render cache current)"))


def guest_api_section(runs: list[Run]) -> dict[str, str]:
    """Runs of the host agent's design (one kiln-agent.service, issue 14) are judged against
    its targets; the runs before it (kiln-settings, kiln-apiserver, kiln-api-remote and
    kiln-updater as units of their own) are shown apart, as the previous design."""

    def res(r: Run) -> dict[str, Any]:
        return dig(r, "result", "result") or {}

    agent_runs = [r for r in runs if res(r).get("design") == "agent"]
    old_runs = [r for r in runs if res(r).get("design") != "agent"]

    def per_boot(field: str, *path: str) -> list[Any]:
        """The value of every boot of every agent run (a target's measurements)."""
        return [dig(res(r), boot, field, *path) for r in agent_runs for boot, _ in GUEST_BOOTS]

    # --- the agent: boot share
    rows = []
    for boot, label in GUEST_BOOTS:
        def m(field: str, boot: str = boot) -> float | None:
            return med(dig(res(r), boot, field) for r in agent_runs)

        rows.append([label, sec(m("agent_start_s")), sec(m("agent_start_to_ready1_s")), sec(m("pipeline_work_s")),
                     sec(m("agent_startup_s")), sec(m("ready_target_s")), num(m("share_of_ready"))])
    # --- the agent: API
    api = []
    for boot, label in GUEST_BOOTS:
        def a(*path: str, boot: str = boot) -> float | None:
            return med(dig(res(r), boot, *path) for r in agent_runs)

        api += [
            [f"{label}: first response after the ready line (the agent already serving)",
             sec(a("api_first_response_s"), 3)],
            [f"{label}: `systemctl kill -s SIGKILL {AGENT_UNIT}`, then a GET: kill → response",
             sec(a("restart", "kill_to_response_s"), 2)],
            ["… of which kill → the new process's exec (systemd, `RestartSec`)",
             sec(a("restart", "kill_to_exec_s"), 2)],
            ["… exec → response (interpreter, imports, the local API; the pipeline's record is kept)",
             sec(a("restart", "exec_to_response_s"), 2)],
            ["… exec → READY=1 (after the mTLS listener too)", sec(a("restart", "exec_to_ready1_s"), 2)],
            [f"{label}: GET to the running agent (median of 20 per boot)",
             msec(med((dig(res(r), boot, "api_warm_median_s") or 0) * 1000 or None for r in agent_runs), 1)],
        ]
    # --- the agent: memory
    mem_rows = []
    for unit, label in ((AGENT_UNIT, f"`{AGENT_UNIT}` (settings, API + mTLS, gate, update daemon)"),
                        (SUPERVISOR_UNIT, f"`{SUPERVISOR_UNIT}` (the container supervisor)"),
                        ("containerd.service", "containerd, for scale")):
        rss, hwm = per_boot("rss_bytes", unit), per_boot("hwm_bytes", unit)
        n = sum(1 for v in rss if v)
        mem_rows.append([label, mib(med(rss)), mib(med(hwm)), f"{n} of {len(rss)}"])
    after = [(dig(res(r), boot, "agent_after_restart", "VmRSS"), dig(res(r), boot, "agent_after_restart", "VmHWM"))
             for r in agent_runs for boot, _ in GUEST_BOOTS]
    mem_rows.append([f"`{AGENT_UNIT}` after its SIGKILL and restart, 21 requests later", mib(med(x for x, _ in after)),
                     mib(med(y for _, y in after)), f"{sum(1 for x, _ in after if x)} of {len(after)}"])
    every = per_boot("kiln_cgroups_resident_bytes")
    mem_rows.append(["every process in the two units' cgroups (children too)", mib(med(every)), "",
                     f"{sum(1 for v in every if v)} of {len(every)}"])
    for key, label in (("kiln settings get (client)", "`kiln settings get` (the client)"),
                       ("boot pipeline alone (render cache current)",
                        "the boot pipeline on its own, render cache current"),
                       ("boot pipeline alone (full render + restarts)",
                        "the boot pipeline on its own, full render with restarts")):
        hwm = [dig(res(r), "peak_hwm_bytes", key) for r in agent_runs]
        mem_rows.append([f"peak of {label}", "", mib(med(hwm)), f"{sum(1 for v in hwm if v)} of {len(hwm)}"])
    resident = per_boot("kiln_resident_bytes")
    first = per_boot("api_first_response_s")
    target = (dig(res(agent_runs[-1]), "kiln_target_bytes") if agent_runs else None) or GUEST_KILN_TARGET_BYTES
    target_s = (dig(res(agent_runs[-1]), "api_first_response_target_s") if agent_runs else None) or GUEST_FIRST_TARGET_S
    boots_measured = sum(1 for v in resident if v is not None)
    # --- the previous design (every run before the agent)
    old_rows = []
    for boot, label in GUEST_BOOTS:
        def o(field: str, boot: str = boot) -> float | None:
            return med(dig(res(r), boot, field) for r in old_runs)

        old_rows.append([label, sec(o("settings_unit_wall_s")), sec(o("settings_pipeline_work_s")),
                         sec(o("ready_target_s")), num(o("share_of_ready"))])

    def unit_value(r: Run, key: str, unit: str) -> Any:
        values = res(r).get(key) or {}  # the first run named containerd "containerd (for scale)"
        if unit == "containerd":
            return values.get("containerd", values.get("containerd (for scale)"))
        return values.get(unit)

    old_mem = []
    for unit, label in (("kiln-apiserver", "kiln-apiserver (after serving)"),
                        ("kiln-api-remote", "kiln-api-remote (mutual TLS)"),
                        ("kiln-updater", "kiln-updater (the update daemon)"),
                        ("containerd", "containerd, for scale")):
        rss = [unit_value(r, "rss_bytes", unit) for r in old_runs]
        old_mem.append([label, mib(med(rss)), str(sum(1 for v in rss if v))])
    old_full = [r for r in old_runs if res(r).get("agents")]
    old_target = dig(res(old_full[-1]), "agents_target_bytes") if old_full else None
    old_api = [["socket-activated start → first response (server stopped, socket listening)",
                sec(med(dig(res(r), "api", "first_response_s") for r in old_runs))],
               ["request to a running server (median of 20 per run)",
                msec(med((dig(res(r), "api", "warm_request_median_s") or 0) * 1000 or None for r in old_runs), 1)]]

    def design(r: Run) -> str:
        return "agent" if res(r).get("design") == "agent" else "previous (a unit each)"

    def kiln_rss(r: Run) -> str:
        if res(r).get("design") == "agent":
            return " / ".join(mib(dig(res(r), boot, "kiln_resident_bytes")) for boot, _ in GUEST_BOOTS)
        return mib(res(r).get("agents_resident_bytes"))

    def first_response(r: Run) -> str:
        if res(r).get("design") == "agent":
            return " / ".join(sec(dig(res(r), boot, "api_first_response_s"), 3) for boot, _ in GUEST_BOOTS)
        return sec(dig(res(r), "api", "first_response_s"), 3) + " (socket-activated start)"

    procs = []  # every process in the Kiln units' cgroups at ready, each boot of the latest run
    for boot, label in GUEST_BOOTS if agent_runs else ():
        for unit, ps in (dig(res(agent_runs[-1]), boot, "cgroup_processes") or {}).items():
            for p in ps:
                procs.append([label.split(" (")[0], f"`{unit}`", str(p.get("pid")), f"`{p.get('cmdline')}`",
                              mib(p.get("rss_bytes"))])
    return {
        "provenance": provenance(runs),
        "agent_provenance": provenance(agent_runs, "the host agent"),
        "cgroup_table": table(["boot", "unit", "pid", "command line", "VmRSS"], procs) if procs
        else "(not recorded)",
        "boot_table": table(["", f"`{AGENT_UNIT}` start, since the kernel started", "start → READY=1",
                             "the pipeline's own work", "the rest (interpreter, imports, API)",
                             "`kiln-ready.target` since the kernel started", "start → READY=1 / ready"], rows),
        "api_table": table(["API in the guest", "time"], api),
        "memory_table": table(["process (at ready: remote API and update daemon on)", "VmRSS", "VmHWM", "boots"],
                              mem_rows),
        "target": f"≤ {mib(target, 0)}",
        "verdict": verdict([(s or 0) / MiB or None for s in resident], lambda x: x <= target / MiB,
                           lambda v: "–" if v is None else f"{v:.1f} MiB", len(agent_runs), "boots"),
        "first_target": f"≤ {sec(target_s, 1)}",
        "first_verdict": verdict(first, lambda x: x <= target_s, lambda v: sec(v, 3), len(agent_runs),
                                 "boots"),
        "boots_measured": count(boots_measured),
        "old_provenance": provenance(old_runs, "the previous design"),
        "old_boot_table": table(["", "`kiln-settings.service` wall time", "the pipeline's own work",
                                 "`kiln-ready.target` since the kernel started", "wall / ready"], old_rows),
        "old_api_table": table(["API in the guest, previous design", "time"], old_api),
        "old_memory_table": table(["process, previous design", "VmRSS", "runs"], old_mem),
        "old_agents": ", ".join(res(old_full[-1]).get("agents") or []) if old_full else "–",
        "old_target": f"< {mib(old_target, 0)}",
        "old_verdict": verdict([(res(r).get("agents_resident_bytes") or 0) / MiB or None for r in old_full],
                               lambda x: x < (old_target or 0) / MiB, lambda v: "–" if v is None else f"{v:.1f} MiB",
                               len(old_full)),
        "runs": runs_table(runs, [
            ("design", design),
            ("Kiln resident (first / second boot)", kiln_rss),
            ("API first response (first / second boot)", first_response),
            ("first → ready", lambda r: sec(dig(res(r), "first_boot", "ready_target_s"))),
        ]),
    }


# ------------------------------------------------------------------ update
FLOOR_LABELS = {
    "floor": "floor: `zstd -dc | tee >(sha256sum) | dd`",
    "floor_raw": "floor without decompression: `cat IMAGE | tee >(sha256sum) | dd`",
    "floor_http": "floor with the download: `curl URL | zstd -dc | tee >(sha256sum) | dd`, same server",
    "floor_openssl": "floor with OpenSSL's hash: `zstd -dc | tee >(openssl dgst -sha256) | dd`",
}
HONEST_FLOORS = ("floor", "floor_http", "floor_openssl")  # as bench/update.py: those doing the agent's work
# Issue 14: `kiln update apply --reboot` → ready on the new version at most 8 s over a plain reboot of the
# same VM, judged on each guest run's difference (both taken in that run, one after the other).
UPDATE_OVER_REBOOT_MAX_S = 8.0


def update_section(runs: list[Run]) -> dict[str, str]:
    host_runs = [r for r in runs if dig(r, "result", "host_apply", "runs")]
    agent = [a for r in host_runs for a in dig(r, "result", "host_apply", "runs", "agent")]
    floors = {n: [f for r in host_runs for f in dig(r, "result", "host_apply", "runs", n) or []]
              for n in FLOOR_LABELS}
    process = med(a.get("process_wall_s") for a in agent)
    inproc = med(a.get("total_s") for a in agent)
    floor_med = {n: med(f.get("total_s") for f in fl) for n, fl in floors.items()}
    floor_cpu = {n: med(f.get("cpu_s") for f in fl) for n, fl in floors.items()}
    tightest = min((n for n in HONEST_FLOORS if floor_med[n] is not None), key=lambda n: floor_med[n] or 0.0,
                   default="floor_openssl")
    rows = [
        ["**agent process**: interpreter start, imports, refresh + prepare (what `kiln update` pays)",
         sec(process), listing([a.get("process_wall_s") for a in agent], lambda v: num(v)), "", "1.00"],
        ["— in process: refresh + prepare", sec(inproc), listing([a.get("total_s") for a in agent], lambda v: num(v)),
         f"{sec(med(a.get('agent_cpu_s') for a in agent))} agent + {sec(med(a.get('zstd_cpu_s') for a in agent))} "
         f"zstd + {sec(med(a.get('server_cpu_s') for a in agent))} HTTP server", num(ratio(process, inproc))],
        ["— of which refresh / prepare", f"{sec(med(a.get('refresh_s') for a in agent))} / "
                                         f"{sec(med(a.get('prepare_s') for a in agent))}", "", "", ""],
    ]
    for n, label in FLOOR_LABELS.items():
        rows.append([label + (" (**the tightest floor**)" if n == tightest else ""), sec(floor_med[n]),
                     listing([f.get("total_s") for f in floors[n]], lambda v: num(v)), sec(floor_cpu[n]),
                     num(ratio(process, floor_med[n]))])
    limit = dig(host_runs[-1], "result", "host_apply", "target", "ratio_max") if host_runs else None
    n_rep = min(len(agent), len(floors[tightest]))
    target = ratio(process, floor_med[tightest])
    if n_rep < MIN_MEASUREMENTS:
        v = f"not judged: {n_rep} measurements, re-run needed (so far {num(target)})"
    else:
        word = "met" if target is not None and limit is not None and target <= limit else "missed"
        v = (f"**{word}** (medians of {n_rep} measurements from {len(host_runs)} "
             f"run{'s' if len(host_runs) != 1 else ''}: {sec(process)} / {sec(floor_med[tightest])} = {num(target)})")
    phase_names: list[str] = []
    for a in agent:
        for k in a.get("phases") or {}:
            if k not in phase_names:
                phase_names.append(k)
    phase_rows = [[k, sec(med(dig(a, "phases", k, "wall_s") for a in agent)),
                   sec(med(dig(a, "phases", k, "agent_cpu_s") for a in agent)),
                   sec(med(dig(a, "phases", k, "zstd_cpu_s") for a in agent))] for k in phase_names]
    rest = med(a["total_s"] - sum(p["wall_s"] for k, p in (a.get("phases") or {}).items() if "beside" not in k)
               for a in agent)  # a phase run beside another (its own thread) overlaps it
    phase_rows.append(["rest: status file, grubenv reads, choosing", sec(rest), "", ""])
    phase_rows.append(["before these: importing the agent's modules (timed inside the child)",
                       sec(med(a.get("imports_s") for a in agent)), "", ""])
    probes: list[str] = []
    for r in host_runs:
        for k in dig(r, "result", "host_apply", "attribution_s") or {}:
            if k not in probes:
                probes.append(k)
    probe_rows = [[k, sec(med(dig(r, "result", "host_apply", "attribution_s", k) for r in host_runs))]
                  for k in probes]
    sizes = dig(host_runs[-1], "result", "host_apply", "image_bytes") if host_runs else {}
    size_rows = [[k, mib(dig(sizes, k, "uncompressed")), mib(dig(sizes, k, "compressed"))] for k in sizes or {}]
    # publish
    pub_runs = [r for r in runs if dig(r, "result", "publish", "runs_s")]
    pub_keys = list(dig(pub_runs[-1], "result", "publish", "runs_s") or {}) if pub_runs else []
    pub = {k: [v for r in pub_runs for v in dig(r, "result", "publish", "runs_s", k) or []] for k in pub_keys}
    cp = med(pub.get("cp", []))
    pub_rows = [[f"`{k}`" if k in ("cp", "sha256sum") else k, sec(med(v), 3), listing(v, lambda x: num(x, 3)),
                 num(ratio(med(v), cp))] for k, v in pub.items()]
    # guest
    g_runs = [g for r in runs for g in dig(r, "result", "guest", "runs") or [] if "error" not in g]
    g_fail = sum(1 for r in runs for g in dig(r, "result", "guest", "runs") or [] if "error" in g)
    seg_names: list[str] = []
    for g in g_runs:
        for k in list(g.get("update_s") or {}) + list(g.get("reboot_s") or {}):
            if k not in seg_names:
                seg_names.append(k)
    guest_rows = [[k, sec(med(dig(g, "update_s", k) for g in g_runs), 1),
                   sec(med(dig(g, "reboot_s", k) for g in g_runs), 1)] for k in seg_names]
    guest_rows.append(["for scale: first boot of 1.0.0, QEMU start to ready", "",
                       sec(med(g.get("first_boot_ready_s") for g in g_runs), 1)])
    guest_probe_names: list[str] = []
    for g in g_runs:
        for k in g.get("guest_probes_s") or {}:
            if k not in guest_probe_names:
                guest_probe_names.append(k)
    gprobe_rows = [[k, sec(med(dig(g, "guest_probes_s", k) for g in g_runs))] for k in guest_probe_names]
    over = [None if dig(g, "update_s", "total") is None or dig(g, "reboot_s", "total") is None
            else dig(g, "update_s", "total") - dig(g, "reboot_s", "total") for g in g_runs]
    g_total_u = med(dig(g, "update_s", "total") for g in g_runs)
    g_total_r = med(dig(g, "reboot_s", "total") for g in g_runs)
    guest_sources = [r for r in runs if any("error" not in g for g in dig(r, "result", "guest", "runs") or [])]
    return {
        "provenance": provenance(host_runs, f"{len(agent)} agent runs and {len(floors[tightest])} of each floor"),
        "host_table": table(["", "wall (median)", "each measurement (s)", "CPU", "agent process / this"], rows),
        "target_limit": f"≤ {num(limit, 1)}",
        "tightest": FLOOR_LABELS.get(tightest, tightest),
        "verdict": v,
        "ratio_inprocess_openssl": num(ratio(inproc, floor_med["floor_openssl"])),
        "ratio_process_floor": num(ratio(process, floor_med["floor"])),
        "phases": table(["agent phase (timers around its own functions; median)", "wall", "agent CPU", "zstd CPU"],
                        phase_rows),
        "attribution": table(["alone on the same bytes (median of 3 per run)", "time"], probe_rows),
        "sizes": table(["image", "uncompressed", "zstd artifact"], size_rows),
        "rss_agent": mib(max((a.get("peak_rss_bytes") or 0 for a in agent), default=0) or None),
        "rss_imports": mib(max((a.get("rss_after_imports_bytes") or 0 for a in agent), default=0) or None),
        "rss_zstd": mib(med(dig(r, "result", "host_apply", "zstd_peak_rss_bytes") for r in host_runs)),
        "publish_provenance": provenance(pub_runs, f"{len(pub.get('cp', []))} measurements of each"),
        "publish_table": table(["", "wall (median)", "each measurement (s)", "/ cp"], pub_rows),
        "publish_vs_cp_sha": num(ratio(med(pub.get("kiln repo add", [])),
                                       (cp or 0) + (med(pub.get("sha256sum", [])) or 0) or None)),
        "guest_provenance": provenance(guest_sources, f"{len(g_runs)} guest update{'s' if len(g_runs) != 1 else ''}"
                                       + (f", {g_fail} failed" if g_fail else "")),
        "guest_table": table(["", "update", "plain reboot"], guest_rows),
        "guest_ratio": num(ratio(g_total_u, g_total_r)),
        "guest_target": f"≤ +{UPDATE_OVER_REBOOT_MAX_S:.0f} s",
        "guest_verdict": verdict(over, lambda d: d <= UPDATE_OVER_REBOOT_MAX_S,
                                 lambda v: "–" if v is None else f"+{v:.1f} s", len(guest_sources), "guest updates"),
        "guest_probes": table(["in the guest after the update, idle (median of 3 per run)", "time"], gprobe_rows),
        "runs": runs_table(runs, [
            ("agent process / tightest floor", lambda r: num(ratio(
                med(a.get("process_wall_s") for a in dig(r, "result", "host_apply", "runs", "agent") or []),
                min((x for x in (med(f.get("total_s") for f in dig(r, "result", "host_apply", "runs", n) or [])
                                 for n in HONEST_FLOORS) if x is not None), default=None)))),
            ("guest runs", lambda r: str(len([g for g in dig(r, "result", "guest", "runs") or []
                                              if "error" not in g]))),
        ]),
    }


# ------------------------------------------------------------------ containers
# Issue 14: settings change → new container serving at most 1.5× `ctr run -d` typed in the guest, admin
# enable → running at most 1.5× a cold `ctr pull` + `ctr run` by hand (each ratio measured in one run), and
# Kiln's memory per running container at most 3 MiB beyond containerd's shim. Judged on the supervisor's runs.
CONTAINERS_SERVE_MAX = 1.5
CONTAINERS_ADMIN_MAX = 1.5
CONTAINERS_PER_CONTAINER_MAX = 3 * MiB
PER_CONTAINER = "Kiln per running container (logger + supervisor growth)"
SUPERVISOR_MEMORY = (
    ("host containerd process", "host containerd process (`kiln-host-containerd.service`)"),
    ("workload containerd process, same moment", "workload containerd process, same moment, no container"),
    ("host containerd cgroup (with admin's shim and logger)",
     "host containerd's cgroup (with admin's shim and logger)"),
    ("admin's shim", "admin's shim"),
    ("admin's logger (2 cat)", "admin's logger (two `cat`)"),
    ("supervisor (kiln-containers.service), admin running",
     "the supervisor (`kiln-containers.service`), admin running"),
    ("supervisor, with the workloads", "the supervisor, with the workloads running"),
    ("supervisor growth per workload", "— its growth per workload"),
    ("workload logger (2 cat), per container", "one workload's logger (two `cat`)"),
    (PER_CONTAINER, "**Kiln per running container** (logger + the supervisor's growth)"),
    ("workload shim (median)", "one shim (containerd's, for scale)"),
    ("workload container cgroup (median)", "one httpd container's cgroup"),
)
MANAGER_MEMORY = (
    ("host containerd process", "host containerd process (`kiln-host-containerd.service`)"),
    ("workload containerd process, same moment", "workload containerd process, same moment, no container"),
    ("host containerd cgroup (with admin's shim)", "host containerd's cgroup (with admin's shim)"),
    ("admin's shim", "admin's shim"),
    ("admin manager unit", "admin manager unit (Python manager + `ctr run`)"),
    ("workload manager unit (median)", "**one workload's manager unit**"),
    ("workload manager: python (median)", "— the Python manager"),
    ("workload manager: ctr run (median)", "— its `ctr run` child"),
    ("workload shim (median)", "one shim"),
    ("workload container cgroup (median)", "one httpd container's cgroup"),
)


def supervisor_design(run: Run) -> bool:
    """A run of the supervisor's design (issue 14: one supervisor, `ctr run -d` and a logger per
    container): its memory view has Kiln's memory per running container, which the runs of the
    previous design (a Python manager unit per container) do not."""
    return PER_CONTAINER in (dig(run, "result", "derived", "memory") or {})


def _serve_ratio(run: Run) -> float | None:
    return ratio(dig(run, "result", "derived", "kiln_later_median_s"), dig(run, "result", "derived", "floor_median_s"))


def _admin_ratio(run: Run) -> float | None:
    return ratio(dig(run, "result", "derived", "admin", "task_started_s"),
                 dig(run, "result", "derived", "admin", "by_hand_s"))


def _per_container(run: Run, field: str = "rss") -> float | None:
    return dig(run, "result", "derived", "memory", PER_CONTAINER, field)


def _union(runs: Sequence[Run], *path: str) -> list[str]:
    """Every key of the dict at path, over the runs, in the order first seen."""
    names: list[str] = []
    for r in runs:
        for k in dig(r, *path) or {}:
            if k not in names:
                names.append(k)
    return names


def containers_tables(runs: Sequence[Run], memory_keys: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The tables of one design's runs (never the other's)."""
    def d(r: Run, *path: str) -> Any:
        return dig(r, "result", "derived", *path)

    def m(*path: str) -> float | None:
        return med(d(r, *path) for r in runs)

    first, later, floor = m("kiln_first_s"), m("kiln_later_median_s"), m("floor_median_s")
    serve = [
        ["**kiln**, first run (pulls httpd)", sec(first), num(ratio(first, floor))],
        ["**kiln**, later runs (image present), median", sec(later), num(ratio(later, floor))],
        ["— kiln later / floor, in each run", listing([_serve_ratio(r) for r in runs], num), ""],
        ["— when `kiln settings set` returned (median)", sec(m("kiln_cli_median_s")), ""],
        ["floor: `ctr run -d` typed in the guest, median", sec(floor), "1.00"],
    ]
    segs = [[k, sec(m("kiln_first_segments_s", k)), sec(m("kiln_later_segments_median_s", k))]
            for k in _union(runs, "result", "derived", "kiln_later_segments_median_s")]
    segs += [[f"floor: {k}", "", sec(m("floor_segments_median_s", k))]
             for k in _union(runs, "result", "derived", "floor_segments_median_s")]
    admin = [[k, sec(med(dig(r, "result", "admin_enable", "segments_s", k) for r in runs))]
             for k in _union(runs, "result", "admin_enable", "segments_s")]
    admin += [
        ["**admin's init running**", sec(m("admin", "task_started_s"))],
        ["`GET /containers` says `running` (polled every half second)", sec(m("admin", "listed_running_s"))],
        ["`kiln settings set` returned", sec(med(dig(r, "result", "admin_enable", "cli_s") for r in runs))],
        ["by hand: cold `ctr images pull` + `ctr run -d` to process start", sec(m("admin", "by_hand_s"))],
        ["init running / by hand, in each run", listing([_admin_ratio(r) for r in runs], num)],
    ]
    pull = [[k, sec(med(dig(r, "result", "admin_pull", "median_s", k) for r in runs))]
            for k in ("cold", "present", "fetch", "unpack")]
    pull_n = sum(len(dig(r, "result", "admin_pull", "runs") or []) for r in runs)
    mem_rows = [[label, *(mib(m("memory", key, f)) for f in ("memory_current", "anon", "rss", "pss", "uss"))]
                for key, label in memory_keys]
    used = [["guest used memory before admin", mib(m("memory", "guest used before admin"))],
            ["with admin", mib(m("memory", "guest used with admin"))],
            ["with the workloads", mib(m("memory", "guest used with the workloads"))]]
    idle = [[k, pct(m("idle_cpu_percent", "units", k, "total"))]
            for k in _union(runs, "result", "derived", "idle_cpu_percent", "units")]
    probes = [[k, sec(med(dig(r, "result", "probes_s", k) for r in runs))] for k in _union(runs, "result", "probes_s")]
    workloads = sum(len(dig(r, "result", "workloads", "kiln") or []) for r in runs)
    floors = sum(len(dig(r, "result", "workloads", "floor") or []) for r in runs)
    return {
        "provenance": provenance(runs, f"{workloads} Kiln workloads and {floors} floor containers"),
        "serve_table": table(["", "to serving", "/ floor"], serve),
        "segments": table(["where the time goes", "kiln first", "kiln later (median)"], segs),
        "admin": table(["admin: `settings set host-containers.admin.enabled=true`", "time"], admin),
        "pull": table([f"admin image pull on the host containerd ({pull_n} cold pull{'s' if pull_n != 1 else ''})",
                       "time (median)"], pull),
        "memory": table(["", "memory.current", "anon", "RSS", "PSS", "USS"], mem_rows),
        "used": table(["", ""], used),
        "idle_window": sec(m("idle_cpu_percent", "window_s"), 0),
        "idle": table(["unit", "CPU, % of one vCPU"], idle),
        "probes": table(["alone in the idle guest", "time"], probes),
        "ready": sec(med(dig(r, "result", "ready_s") for r in runs), 1),
    }


def containers_section(runs: list[Run]) -> dict[str, str]:
    """The supervisor's runs (issue 14) are the current design and the only ones its targets are
    judged on; the runs before it (a `kiln-container@KIND:NAME.service` each: a Python manager and
    an attached `ctr run`) are shown apart, as the previous design."""
    new = [r for r in runs if supervisor_design(r)]
    old = [r for r in runs if not supervisor_design(r)]
    n = len(new)

    def mib_value(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f} MiB"

    def supervisor_process(r: Run) -> str:
        unit = dig(r, "result", "memory", "with_admin", "units", SUPERVISOR_UNIT)
        argv = [" ".join(p.get("argv") or []) for p in (unit or {}).get("processes") or []]
        return (", ".join(f"`{a}`" for a in argv) + f" in `{SUPERVISOR_UNIT}`") if argv else \
            f"none recorded in `{SUPERVISOR_UNIT}`"

    def per_container(r: Run) -> str:
        return (f"{mib(_per_container(r), 2)} RSS / {mib(_per_container(r, 'pss'), 2)} PSS"
                if supervisor_design(r) else "–")

    return {
        "all_provenance": provenance(runs),
        **containers_tables(new, SUPERVISOR_MEMORY),
        **{f"old_{k}": v for k, v in containers_tables(old, MANAGER_MEMORY).items()},
        "serve_target": f"≤ {num(CONTAINERS_SERVE_MAX, 1)}",
        "serve_verdict": verdict([_serve_ratio(r) for r in new], lambda x: x <= CONTAINERS_SERVE_MAX, num, n),
        "admin_target": f"≤ {num(CONTAINERS_ADMIN_MAX, 1)}",
        "admin_verdict": verdict([_admin_ratio(r) for r in new], lambda x: x <= CONTAINERS_ADMIN_MAX, num, n),
        "memory_target": f"≤ {mib(CONTAINERS_PER_CONTAINER_MAX, 0)}",
        "memory_verdict": verdict([None if (v := _per_container(r)) is None else v / MiB for r in new],
                                  lambda x: x <= CONTAINERS_PER_CONTAINER_MAX / MiB, mib_value, n),
        "old_serve_ratio": num(med(_serve_ratio(r) for r in old)),
        "runs": runs_table(runs, [
            ("design", lambda r: "supervisor" if supervisor_design(r) else "previous (a manager unit each)"),
            ("supervisor's process", lambda r: supervisor_process(r) if supervisor_design(r) else "–"),
            ("kiln later / floor", lambda r: num(_serve_ratio(r))),
            ("admin init running / by hand", lambda r: num(_admin_ratio(r))),
            ("Kiln per running container", per_container),
        ]),
    }


# ------------------------------------------------------------------ fleet
def fleet_section(runs: list[Run]) -> dict[str, str]:
    rows = []
    for key, label in (("kiln_uncontended", "kiln, uncontended (a group each, `pre-reboot` + `steady-state`)"),
                       ("kiln_contended", "kiln, contended (one group, 3 slots; retry after 5 ms)"),
                       ("floor_txn", "floor: etcd txn put-if-absent + delete (etcd3gw, no FleetLock server)"),
                       ("floor_etcdctl", "floor: `etcdctl lock NAME -- true`, sequential")):
        def m(field: str, key: str = key) -> float | None:
            return med(dig(r, "result", key, field) for r in runs)

        rows.append([label, count(m("cycles")), msec(m("p50_ms"), 0), msec(m("p99_ms"), 0), f"{num(m('per_s'), 1)}/s"])
    agents = med(dig(r, "result", "agents") for r in runs)
    seconds = med(dig(r, "result", "seconds") for r in runs)
    g = [r for r in runs if dig(r, "result", "guest")]
    guest_rows: list[list[str]] = []
    header = [""]
    if g:
        cols = []  # (run number, guest number, run's guest record)
        for r in g:
            for i in range(len(dig(r, "result", "guest", "idle") or [])):
                cols.append((runs.index(r) + 1, i, dig(r, "result", "guest")))
        header += [f"run {n}, guest {i}" for n, i, _ in cols]
        guest_rows = [
            ["check interval while idle", *(str(x.get("idle_check_interval") or "not recorded") for _, _, x in cols)],
            # Since issue 14 the daemon is a thread of kiln-agent.service: the runs that say so measured
            # the whole agent; the older ones kiln-updater.service, the daemon alone.
            ["process measured", *(str(dig(x, "idle", i, "process") or "kiln-updater.service (the daemon alone)")
                                   for _, i, x in cols)],
            ["its CPU over the daemon's idle window", *(f"{sec(dig(x, 'idle', i, 'cpu_s'))} "
                                                        f"({pct(dig(x, 'idle', i, 'cpu_percent'), 1)})"
                                                        for _, i, x in cols)],
            ["its VmRSS / VmHWM", *(f"{mib((dig(x, 'idle', i, 'rss_kib') or 0) * 1024)} / "
                                   f"{mib((dig(x, 'idle', i, 'hwm_kib') or 0) * 1024)}" for _, i, x in cols)],
            ["ready on 2.0.0, from publishing", *(sec(dig(x, "timeline_s", i, "ready on 2.0.0"), 1)
                                                  for _, i, x in cols)],
            ["reboot slot given back, from publishing", *(sec(dig(x, "timeline_s", i, "slot given back"), 1)
                                                          for _, i, x in cols)],
        ]
    return {
        "provenance": provenance(runs),
        "agents": count(agents),
        "seconds": sec(seconds, 0),
        "table": table(["FleetLock acquire + release", "cycles", "p50", "p99", "throughput"], rows),
        "p50_vs_txn": num(med(dig(r, "result", "ratios", "p50_vs_txn") for r in runs)),
        "throughput_vs_txn": num(med(dig(r, "result", "ratios", "throughput_vs_txn") for r in runs)),
        "guest_provenance": provenance(g, "with `--guest`"),
        "guest_table": table(header, guest_rows) if guest_rows else "(no guest run recorded)",
        "runs": runs_table(runs, [
            ("kiln uncontended p50 / throughput", lambda r: (
                f"{msec(dig(r, 'result', 'kiln_uncontended', 'p50_ms'), 0)} / "
                f"{num(dig(r, 'result', 'kiln_uncontended', 'per_s'), 1)}/s")),
            ("txn floor p50 / throughput", lambda r: f"{msec(dig(r, 'result', 'floor_txn', 'p50_ms'), 0)} / "
                                                     f"{num(dig(r, 'result', 'floor_txn', 'per_s'), 1)}/s"),
            ("guest", lambda r: "yes" if dig(r, "result", "guest") else "no"),
        ]),
    }


# ------------------------------------------------------------------ fleet_simulate
def simulate_section(runs: list[Run]) -> dict[str, str]:
    def entries(r: Run) -> list[tuple[str, dict[str, Any]]]:
        out = [(f"{x['hosts']:,} hosts", x) for x in dig(r, "result", "sizes") or []]
        out += [("2,000 hosts, shortcuts", dig(r, "result", "small", "fast")),
                ("2,000 hosts, `--exact`", dig(r, "result", "small", "exact"))]
        return [(k, v) for k, v in out if v]

    labels: list[str] = []
    for r in runs:
        for k, _ in entries(r):
            if k not in labels:
                labels.append(k)
    rows = []
    for label in labels:
        xs = [x for r in runs for k, x in entries(r) if k == label]

        def m(field: str, xs: list[dict[str, Any]] = xs) -> float | None:
            return med(x.get(field) for x in xs)

        t = xs[-1]["time_to"]
        rows.append([("**" + label + "**") if label.startswith("100,000") else label, sec(m("simulation_s"), 1),
                     sec(m("command_wall_s"), 1), listing([x.get("command_wall_s") for x in xs], lambda v: num(v, 1)),
                     sec(m("command_cpu_s"), 1), f"{m('peak_rss_mib'):.0f} MiB", count(m("daemon_passes")),
                     f"{t['50%']} / {t['90%']} / {t['100%']}",
                     f"{xs[-1]['peak_concurrent_reboots']} / {xs[-1]['slots_total']}"])
    big = [dig(r, "result", "sizes", -1) for r in runs]
    limit = dig(runs[-1], "result", "target_s") if runs else None
    big_hosts = dig(big[-1], "hosts") if big else None
    return {
        "provenance": provenance(runs),
        "table": table(["", "simulation", "command (median)", "command, each run (s)", "CPU", "peak RSS",
                        "daemon passes", "50 / 90 / 100 % on 2.0.0", "peak reboots / slots"], rows),
        "target_limit": f"< {sec(limit, 0)}",
        "target_hosts": count(big_hosts),
        "verdict": verdict([dig(b, "command_wall_s") for b in big], lambda x: x < (limit or 0),
                           lambda v: sec(v, 1), len(runs)),
        "exact_passes_ratio": num(med(dig(r, "result", "small", "passes_ratio") for r in runs), 1),
        "exact_diff": ", ".join(f"{v} %" for v in dig(runs[-1], "result", "small", "time_to_diff_percent") or []),
        "parked": count(med(dig(b, "parked") for b in big)),
        "checks_not_run": count(med(dig(b, "checks_not_run") for b in big)),
        "timeline_points": count(med(dig(b, "timeline_points") for b in big)),
        "runs": runs_table(runs, [("100,000 hosts: command / CPU", lambda r: (
            f"{sec(dig(r, 'result', 'sizes', -1, 'command_wall_s'), 1)} / "
            f"{sec(dig(r, 'result', 'sizes', -1, 'command_cpu_s'), 1)}"))]),
    }


# ------------------------------------------------------------------ fleet_view
def view_section(runs: list[Run]) -> dict[str, str]:
    sizes = sorted({dig(r, "result", "hosts") for r in runs} - {None})
    blocks = []
    for hosts in sizes:
        rs = [r for r in runs if dig(r, "result", "hosts") == hosts]

        def m(*path: str, rs: list[Run] = rs) -> float | None:
            return med(dig(r, "result", *path) for r in rs)

        kiln, floor = m("ingest", "per_s"), m("floor", "per_s")
        rows = [
            ["reports in through `kiln fleet serve` (`POST /v1/report`)", rate(kiln),
             listing([dig(r, "result", "ingest", "per_s") for r in rs], lambda v: count(v)),
             f"server CPU {msec(m('ingest', 'server_cpu_ms_per_report'))} per report"],
            ["floor: the same number of etcd puts of the same size (etcd3gw)", rate(floor),
             listing([dig(r, "result", "floor", "per_s") for r in rs], lambda v: count(v)), ""],
            ["kiln / floor, ingest time", num(ratio(floor, kiln)), "", ""],
            ["`GET /v1/status`, cold (cache expired)", sec(m("read", "status_cold_s")),
             listing([dig(r, "result", "read", "status_cold_s") for r in rs], lambda v: num(v)),
             f"server CPU {sec(m('read', 'status_cold_cpu_s'))}"],
            ["`GET /v1/status`, cached", sec(m("read", "status_warm_s"), 3), "", ""],
            ["`GET /v1/hosts?q=…` (a filtered page of 200)", sec(m("read", "hosts_filtered_s"), 3), "", ""],
            ["server peak RSS (VmHWM) after all of it", mib((m("read", "server_hwm_mib") or 0) * MiB or None), "", ""],
        ]
        blocks.append(f"**{hosts:,} hosts**: {provenance(rs)}\n\n"
                      + table([f"{hosts:,} hosts", "median", "each run", ""], rows))
    return {
        "provenance": provenance(runs),
        "tables": "\n\n".join(blocks) if blocks else "(no run recorded)",
        "sizes": ", ".join(f"{h:,}" for h in sizes),
        "runs": runs_table(runs, [
            ("hosts", lambda r: count(dig(r, "result", "hosts"))),
            ("reports/s (floor puts/s)", lambda r: f"{rate(dig(r, 'result', 'ingest', 'per_s'))} "
                                                   f"({rate(dig(r, 'result', 'floor', 'per_s'))})"),
        ]),
    }


# ------------------------------------------------------------------ secure_boot
SB_SYSTEMS = (("sb-on", "signed, Secure Boot on"), ("sb-off", "signed, Secure Boot off"),
              ("unsigned", "unsigned (today's default)"))
SB_FIELDS = (("marker_s", "**QEMU start → ready**"), ("firmware_s", "— OVMF (→ `Welcome to GRUB`)"),
             ("grub_s", "— GRUB (→ its last line, `Booting in blind mode`)"),
             ("grub_cfg_s", "— — grub.cfg and grubenv (→ `booting slot`)"),
             ("grub_load_s", "— — kiln.cfg, kernel, initramfs (→ hand-over)"),
             ("kernel_to_marker_s", "— kernel → ready"))


def secure_boot_section(runs: list[Run]) -> dict[str, str]:
    boots = [b for r in runs for b in dig(r, "result", "boot", "per_boot") or [] if not b.get("error")]

    def samples(system: str, field: str) -> list[float | None]:
        return [b.get("marker_s") if field == "marker_s" else dig(b, "milestones", field)
                for b in boots if b["system"] == system]

    def m(system: str, field: str) -> float | None:
        return med(samples(system, field))

    def cell(system: str, field: str) -> str:
        got = [v for v in samples(system, field) if v is not None]
        return f"{sec(med(got))} ({num(min(got))}–{num(max(got))})" if got else "–"

    def delta(a: float | None, b: float | None) -> str:
        return "–" if a is None or b is None else f"{a - b:+.2f} s"

    rows = [[label, *(cell(s, f) for s, _ in SB_SYSTEMS), num(ratio(m("sb-on", f), m("unsigned", f))),
             delta(m("sb-on", f), m("unsigned", f)), delta(m("sb-off", f), m("unsigned", f))]
            for f, label in SB_FIELDS]
    # The three boots of a round ran one after the other: their differences, round by round,
    # cancel most of the load the machine had at the time.
    rounds: dict[tuple[int, int], dict[str, float]] = {}
    for i, r in enumerate(runs):
        for b in dig(r, "result", "boot", "per_boot") or []:
            if not b.get("error") and b.get("marker_s") is not None:
                rounds.setdefault((i, b["run"]), {})[b["system"]] = b["marker_s"]

    def paired(system: str) -> float | None:
        return med(x[system] - x["unsigned"] for x in rounds.values() if system in x and "unsigned" in x)

    rows.append(["QEMU start → ready, paired: median of each round's difference", "", "", "", "",
                 delta(paired("sb-on"), 0.0), delta(paired("sb-off"), 0.0)])
    rows.append(["boots (all runs)", *(str(len(samples(s, "marker_s"))) for s, _ in SB_SYSTEMS), "", "", ""])
    sizes = (dig(runs[-1], "result", "sizes") or {}) if runs else {}
    hashed = (sizes.get("vmlinuz") or 0) + (sizes.get("initrd.img") or 0)
    extra = None if m("sb-off", "grub_load_s") is None or m("unsigned", "grub_load_s") is None else \
        (m("sb-off", "grub_load_s") or 0) - (m("unsigned", "grub_load_s") or 0)
    builds = [b for r in runs for b in dig(r, "result", "build", "per_build") or []]

    def bvals(kind: str, step: str | None = None) -> list[float | None]:
        return [b.get("seconds") if step is None else dig(b, "steps", step) for b in builds if b["kind"] == kind]

    bu, bs = med(bvals("unsigned")), med(bvals("signed"))
    pairs: dict[tuple[int, int], dict[str, float]] = {}
    for i, r in enumerate(runs):
        for b in dig(r, "result", "build", "per_build") or []:
            pairs.setdefault((i, b["run"]), {})[b["kind"]] = b["seconds"]
    added = [p["signed"] - p["unsigned"] for p in pairs.values() if len(p) == 2]
    build_rows = [
        ["whole build (added: median of the pairs' differences)", sec(bu, 1), sec(bs, 1), delta(med(added), 0.0),
         num(ratio(bs, bu)), listing(added, lambda v: "–" if v is None else f"{v:+.1f}")],
    ]
    step_names = list(dig(builds[0], "steps") or {}) if builds else []
    for st in step_names:
        su, ss = med(bvals("unsigned", st)), med(bvals("signed", st))
        build_rows.append([f"— step `{st}`", sec(su), sec(ss), delta(ss, su), num(ratio(ss, su)), ""])
    step_rounds = [x for r in runs for x in dig(r, "result", "signing_steps", "per_round") or []]
    names: list[str] = []
    for x in step_rounds:
        names += [k for k in x if k not in names]
    total_key = next((k for r in runs for k in dig(r, "result", "signing_steps", "summary") or {}
                      if k.startswith("total added")), None)
    totals = [dig(r, "result", "signing_steps", "summary", total_key, "values") or [] for r in runs
              ] if total_key else []
    step_rows = [[k, msec(med((x.get(k) or 0) * 1000 for x in step_rounds if k in x), 1)] for k in names]
    step_rows.append(["**total added** (the signed GRUB's grub-mkimage over the plain one, plus every step a "
                      "plain build does not make; the SHA-256 line is part of the signatures)",
                      msec(med(v * 1000 for t in totals for v in t if v is not None), 1)])
    return {
        "provenance": provenance(runs, f"{min((len(samples(s, 'marker_s')) for s, _ in SB_SYSTEMS), default=0)} "
                                       "steady-state boots per system, "
                                       f"{len(added)} build pair{'s' if len(added) != 1 else ''}"),
        "boot_table": table(["median (min–max, s)", *(label for _, label in SB_SYSTEMS), "on / unsigned",
                             "on − unsigned", "off − unsigned"], rows),
        "ratio_whole": num(ratio(m("sb-on", "marker_s"), m("unsigned", "marker_s"))),
        "delta_whole": delta(m("sb-on", "marker_s"), m("unsigned", "marker_s")),
        "ratio_grub": num(ratio(m("sb-on", "grub_s"), m("unsigned", "grub_s"))),
        "delta_grub": delta(m("sb-on", "grub_s"), m("unsigned", "grub_s")),
        "delta_on_off": delta(m("sb-on", "marker_s"), m("sb-off", "marker_s")),
        "delta_firmware_on_off": delta(m("sb-on", "firmware_s"), m("sb-off", "firmware_s")),
        "delta_kernel_on_unsigned": delta(m("sb-on", "kernel_to_marker_s"), m("unsigned", "kernel_to_marker_s")),
        "verify_extra": sec(extra),
        "verify_bytes": mib(hashed or None),
        "kernel_size": mib(sizes.get("vmlinuz")),
        "initrd_size": mib(sizes.get("initrd.img")),
        "verify_rate": "–" if not extra or extra <= 0 else f"{hashed / MiB / extra:.1f} MiB/s",
        "paired_on": delta(paired("sb-on"), 0.0),
        "paired_off": delta(paired("sb-off"), 0.0),
        "first_boots": "; ".join(
            f"run {i}: " + ", ".join(f"{b['system'].removesuffix('-first')} {sec(b.get('marker_s'))}"
                                     for b in dig(r, "result", "boot", "first_boots") or [] if not b.get("error"))
            for i, r in enumerate(runs, 1)) or "–",
        "cpus": count(dig(runs[-1], "result", "cpus")) if runs else "–",
        "build_table": table(["`kiln build`, warm package cache", "unsigned", "`--keys`", "added", "ratio",
                              "added, each pair (s)"], build_rows),
        "build_added": delta(med(added), 0.0),
        "build_unsigned_range": f"{sec(min(u), 1)} – {sec(max(u), 1)}" if (u := [v for v in bvals("unsigned")
                                                                                   if v is not None]) else "–",
        "build_boot_step": delta(med(bvals("signed", "boot")), med(bvals("unsigned", "boot"))),
        "verify_extra_on": delta(m("sb-on", "grub_load_s"), m("unsigned", "grub_load_s")),
        "build_ratio": num(ratio(bs, bu)),
        "steps_table": table(["signing step, alone (in-process)", "median"], step_rows),
        "steps_total": msec(med(v * 1000 for t in totals for v in t if v is not None), 0),
        "grub_efi_sizes": f"{mib(sizes.get('grub_efi_unsigned'), 2)} → {mib(sizes.get('grub_efi_signed'), 2)}",
        "runs": runs_table(runs, [
            ("boot on / unsigned", lambda r: num(dig(r, "result", "boot", "summary", "sb-on/unsigned", "marker_s"))),
            ("build added (each pair)", lambda r: listing(
                dig(r, "result", "build", "summary", "added_per_pair_s") or [],
                lambda v: "–" if v is None else f"{v:+.1f} s")),
        ]),
    }


# ------------------------------------------------------------------ all of it
SECTIONS: dict[str, tuple[str, Callable[[list[Run]], dict[str, str]]]] = {
    "build": ("build_time", build_section),
    "boot": ("boot_time", boot_section),
    "api": ("api_latency", api_section),
    "guest_api": ("guest_api", guest_api_section),
    "update": ("update", update_section),
    "containers": ("containers", containers_section),
    "fleet": ("fleet", fleet_section),
    "simulate": ("fleet_simulate", simulate_section),
    "view": ("fleet_view", view_section),
    "secure_boot": ("secure_boot", secure_boot_section),
}


def values(all_runs: dict[str, list[Run]]) -> dict[str, str]:
    out: dict[str, str] = {"machine.table": machines(all_runs)}
    for prefix, (name, fn) in SECTIONS.items():
        runs = all_runs.get(name) or []
        if not runs:
            continue
        for key, value in fn(runs).items():
            out[f"{prefix}.{key}"] = value
    targets = [
        ("build: cold build", "build.target_cold", "build.verdict_cold"),
        ("build: warm build", "build.target_warm", "build.verdict_warm"),
        ("build: root filesystem", "build.target_root", "build.verdict_root"),
        ("boot: kiln / general, kernel → ready, same boot path: OVMF + GRUB, first boot", "boot.target_like",
         "boot.verdict_grub_first"),
        ("boot: kiln / general, kernel → ready, same boot path: OVMF + GRUB, steady state", "boot.target_like",
         "boot.verdict_grub_second"),
        ("boot: kiln / general, kernel → ready, same boot path: direct kernel boot, first boot", "boot.target_like",
         "boot.verdict_direct_first"),
        ("boot: kiln / general, kernel → ready, same boot path: direct kernel boot, steady state",
         "boot.target_like", "boot.verdict_direct_second"),
        ("boot: kiln QEMU start → ready at 1 vCPU (OVMF + GRUB), first boot", "boot.target_ready",
         "boot.verdict_ready_first"),
        ("boot: kiln QEMU start → ready at 1 vCPU (OVMF + GRUB), steady state", "boot.target_ready",
         "boot.verdict_ready_second"),
        ("host API: GET /settings p99 at 16 clients", "api.target_limit", "api.verdict"),
        ("guest: Kiln's resident memory at ready (agent + supervisor)", "guest_api.target", "guest_api.verdict"),
        ("guest: API first response after boot", "guest_api.first_target", "guest_api.first_verdict"),
        ("update: agent process / tightest floor", "update.target_limit", "update.verdict"),
        ("update: `kiln update apply --reboot` → ready, over a plain reboot of the same VM (same run)",
         "update.guest_target", "update.guest_verdict"),
        ("containers: settings change → new container serving / `ctr run -d` typed in the guest (same run)",
         "containers.serve_target", "containers.serve_verdict"),
        ("containers: admin enable → its init running / cold `ctr pull` + `ctr run -d` by hand (same run)",
         "containers.admin_target", "containers.admin_verdict"),
        ("containers: Kiln's memory per running container beyond containerd's shim (RSS)",
         "containers.memory_target", "containers.memory_verdict"),
        ("fleet simulate: whole command", "simulate.target_limit", "simulate.verdict"),
    ]
    out["targets.table"] = table(["target", "limit", "verdict"],
                                 [[t, out.get(k, "–"), out.get(v, "no run recorded")] for t, k, v in targets])
    return out


PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+\.[a-z0-9_]+)\s*\}\}")


def render(template: str, vals: dict[str, str]) -> str:
    missing = sorted({m.group(1) for m in PLACEHOLDER.finditer(template)} - set(vals))
    if missing:
        raise SystemExit(f"{TEMPLATE.name}: no value for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: vals[m.group(1)], template)


# A figure typed by hand: a number with a unit of time, size, rate or ratio, outside placeholders
# and code spans. Parameters belong in code spans (`--runs 3`) or placeholders.
UNITS = r"s|ms|µs|us|min|MiB|KiB|GiB|MB|KB|GB|%|/s|×|x|seconds?|minutes?|hours?|milliseconds?"
FIGURE = re.compile(rf"(?<![\w.{{])[~≈]?\d[\d,]*(?:\.\d+)?\s?(?:{UNITS})(?![\w])")
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\d.])")


def lint(template: str) -> list[str]:
    """Hand-typed figures in the template's prose: (line number, text) of each."""
    found = []
    for i, line in enumerate(template.splitlines(), 1):
        bare = re.sub(r"`[^`]*`", "", PLACEHOLDER.sub("", line))
        found += [f"{TEMPLATE.name}:{i}: {m.group(0)!r}" for rx in (FIGURE, DECIMAL) for m in rx.finditer(bare)]
    return found


def build() -> str:
    all_runs = {name: load(name) for name in BENCHMARKS}
    return render(TEMPLATE.read_text(), values(all_runs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md differs from the results")
    ap.add_argument("--lint", action="store_true", help="list hand-typed figures in the template (exit 1 if any)")
    args = ap.parse_args(argv)
    problems = lint(TEMPLATE.read_text())
    if args.lint:
        print("\n".join(problems) or "no hand-typed figures")
        return 1 if problems else 0
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    text = build()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.is_file() else ""
        if current != text:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                       str(OUTPUT.relative_to(REPO)), "regenerated"))
            print("docs/benchmarks.md is not what bench/report.py makes of bench/results: run it", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
