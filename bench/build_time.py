#!/usr/bin/env python3
"""Build time: `kiln build` of the default variant, cold and warm, against debootstrap.

Measured side by side in one run, each N times (medians reported):

- kiln cold:  a fresh, empty KILN_CACHE, so apt lists and every .deb are downloaded;
- kiln warm:  a second build with the same cache;
- debootstrap --variant=minbase bookworm (+ systemd, python3, containerd, runc) into a
  temporary directory: cold with an empty --cache-dir, warm with the same --cache-dir.

Also reports the root filesystem (erofs) and disk image sizes from BuildResult.sizes,
and checks them against the targets: warm <= 45 s, cold <= 120 s, root <= 100 MiB.
Writes bench/results/build_time.json. Run as root (both tools need it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _bench as B
from _bench import kiln_build

from kiln.variant import Variant, load_variant

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_INCLUDE = "systemd,python3,containerd,runc"
TARGETS = {"cold_s": 120.0, "warm_s": 45.0, "root_mib": 100.0}  # root: issue 14


def installed_packages(root: Path) -> int:
    status = root / "var/lib/dpkg/status"
    if not status.is_file():
        return 0
    return sum(
        1
        for block in status.read_text(errors="replace").split("\n\n")
        if "Status: install ok installed" in block
    )


def debootstrap(cache: Path, target: Path) -> dict[str, Any]:
    """debootstrap minbase into `target` with --cache-dir=cache; the tree is removed after."""
    cache.mkdir(parents=True, exist_ok=True)
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={DEBOOTSTRAP_INCLUDE}",
        f"--cache-dir={cache}",
        SUITE,
        str(target),
        MIRROR,
    ]
    t0 = time.monotonic()
    try:
        B.run(argv, timeout=3600)
        seconds = time.monotonic() - t0
        info = {
            "seconds": round(seconds, 2),
            "tree_bytes": B.tree_bytes(target),
            "packages": installed_packages(target),
            "cache_bytes": B.tree_bytes(cache),
        }
    finally:
        B.remove_tree(target)
    return info


def one_run(i: int, variant: Variant, base: Path, skip_debootstrap: bool) -> dict[str, Any]:
    d = base / f"run{i}"
    d.mkdir()
    kcache, dcache = d / "kiln-cache", d / "debootstrap-cache"
    kcache.mkdir()
    out: dict[str, Any] = {}
    try:
        # Interleaved so that a slow phase of the machine (or the network) hits both tools.
        B.log(f"run {i}: kiln build, cold cache ({kcache})")
        out["kiln_cold"] = kiln_build(variant, kcache, d / "kiln-cold")
        B.remove_tree(d / "kiln-cold")
        B.log(f"run {i}: kiln cold {out['kiln_cold']['seconds']:.1f} s")
        if not skip_debootstrap:
            B.log(f"run {i}: debootstrap, cold cache")
            out["debootstrap_cold"] = debootstrap(dcache, d / "deb-cold")
            B.log(f"run {i}: debootstrap cold {out['debootstrap_cold']['seconds']:.1f} s")
        B.log(f"run {i}: kiln build, warm cache")
        out["kiln_warm"] = kiln_build(variant, kcache, d / "kiln-warm")
        B.remove_tree(d / "kiln-warm")
        B.log(f"run {i}: kiln warm {out['kiln_warm']['seconds']:.1f} s")
        if not skip_debootstrap:
            B.log(f"run {i}: debootstrap, warm cache")
            out["debootstrap_warm"] = debootstrap(dcache, d / "deb-warm")
            B.log(f"run {i}: debootstrap warm {out['debootstrap_warm']['seconds']:.1f} s")
    finally:
        B.remove_tree(d)
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str, field: str) -> float | None:
        return B.median([r[key][field] for r in runs if key in r])

    def med_size(key: str, name: str) -> float | None:
        return B.median([r[key]["sizes"][name] for r in runs if key in r])

    kc, kw = med("kiln_cold", "seconds"), med("kiln_warm", "seconds")
    dc, dw = med("debootstrap_cold", "seconds"), med("debootstrap_warm", "seconds")
    root = med_size("kiln_warm", "root")
    steps = list(runs[0]["kiln_warm"]["steps"])
    return {
        "kiln_cold_s": kc,
        "kiln_warm_s": kw,
        "debootstrap_cold_s": dc,
        "debootstrap_warm_s": dw,
        "ratio_cold_kiln_over_debootstrap": B.ratio(kc, dc),
        "ratio_warm_kiln_over_debootstrap": B.ratio(kw, dw),
        "root_bytes": root,
        "hash_bytes": med_size("kiln_warm", "hash"),
        "initrd_bytes": med_size("kiln_warm", "initrd"),
        "disk_bytes": med_size("kiln_warm", "disk"),
        "disk_allocated_bytes": med_size("kiln_warm", "disk_allocated"),
        "kiln_tree_bytes": med_size("kiln_warm", "rootfs_tree"),
        "debootstrap_tree_bytes": med("debootstrap_warm", "tree_bytes"),
        "debootstrap_packages": med("debootstrap_warm", "packages"),
        "kiln_download_bytes": med("kiln_cold", "cache_bytes"),
        "debootstrap_download_bytes": med("debootstrap_cold", "cache_bytes"),
        "kiln_warm_steps_s": {
            k: B.median([r["kiln_warm"]["steps"].get(k) for r in runs]) for k in steps
        },
        "kiln_cold_steps_s": {
            k: B.median([r["kiln_cold"]["steps"].get(k) for r in runs]) for k in steps
        },
        "targets": {
            "cold_s": {
                "target": TARGETS["cold_s"],
                "ok": kc is not None and kc <= TARGETS["cold_s"],
            },
            "warm_s": {
                "target": TARGETS["warm_s"],
                "ok": kw is not None and kw <= TARGETS["warm_s"],
            },
            "root_mib": {
                "target": TARGETS["root_mib"],
                "ok": root is not None and root / B.MiB <= TARGETS["root_mib"],
            },
        },
    }


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(s: dict[str, Any], runs: int, variant: str) -> str:
    t = s["targets"]
    rows = [
        [
            "build, cold cache",
            B.fmt_s(s["kiln_cold_s"]),
            B.fmt_s(s["debootstrap_cold_s"]),
            B.fmt_ratio(s["ratio_cold_kiln_over_debootstrap"]),
            f"<= {t['cold_s']['target']:.0f} s",
            verdict(t["cold_s"]["ok"]),
        ],
        [
            "build, warm cache",
            B.fmt_s(s["kiln_warm_s"]),
            B.fmt_s(s["debootstrap_warm_s"]),
            B.fmt_ratio(s["ratio_warm_kiln_over_debootstrap"]),
            f"<= {t['warm_s']['target']:.0f} s",
            verdict(t["warm_s"]["ok"]),
        ],
        [
            "downloaded (cold)",
            B.fmt_mib(s["kiln_download_bytes"]),
            B.fmt_mib(s["debootstrap_download_bytes"]),
            B.fmt_ratio(B.ratio(s["kiln_download_bytes"], s["debootstrap_download_bytes"])),
            "",
            "",
        ],
        [
            "root tree (files)",
            B.fmt_mib(s["kiln_tree_bytes"]),
            B.fmt_mib(s["debootstrap_tree_bytes"]),
            B.fmt_ratio(B.ratio(s["kiln_tree_bytes"], s["debootstrap_tree_bytes"])),
            "",
            "",
        ],
        [
            "root fs (erofs lz4hc, 64 KiB clusters)",
            B.fmt_mib(s["root_bytes"]),
            "-",
            "",
            f"<= {t['root_mib']['target']:.0f} MiB",
            verdict(t["root_mib"]["ok"]),
        ],
        ["verity hash tree", B.fmt_mib(s["hash_bytes"]), "-", "", "", ""],
        ["initramfs", B.fmt_mib(s["initrd_bytes"]), "-", "", "", ""],
        [
            "disk image (allocated)",
            f"{B.fmt_mib(s['disk_bytes'])} ({B.fmt_mib(s['disk_allocated_bytes'])})",
            "-",
            "",
            "",
            "",
        ],
    ]
    head = (
        f"kiln build ({variant}) vs debootstrap --variant=minbase --include={DEBOOTSTRAP_INCLUDE}, "
        f"median of {runs} run(s)"
    )
    out = [head, "", B.table(rows, ["", "kiln", "debootstrap", "kiln/deb", "target", ""])]
    if s["debootstrap_packages"]:
        out.append(
            f"\ndebootstrap installed {s['debootstrap_packages']:.0f} packages and produces a "
            "directory tree only; kiln produces a verity-protected A/B disk image plus "
            "compressed update artifacts."
        )
    steps = [
        [k, B.fmt_s(s["kiln_cold_steps_s"].get(k)), B.fmt_s(s["kiln_warm_steps_s"].get(k))]
        for k in s["kiln_warm_steps_s"]
    ]
    out += [
        "",
        "kiln build steps (from BuildResult.timings)",
        B.table(steps, ["step", "cold", "warm"]),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=1, help="cold+warm pairs per tool (default 1)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    ap.add_argument("--variant", help="variant name or .toml (default: the default variant)")
    ap.add_argument(
        "--no-debootstrap", action="store_true", help="measure kiln only (no comparison)"
    )
    ap.add_argument("--workdir", type=Path, help="where temporary trees go (default: $TMPDIR)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print(
            "build_time.py must run as root (kiln build and debootstrap need it)", file=sys.stderr
        )
        return 2
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    variant = load_variant(args.variant)
    info = B.machine()
    base = Path(tempfile.mkdtemp(prefix="kiln-bench-build-", dir=args.workdir))
    t0 = time.monotonic()
    runs = []
    try:
        for i in range(args.runs):
            runs.append(one_run(i, variant, base, args.no_debootstrap))
    finally:
        B.remove_tree(base)
    summary = summarize(runs)
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "benchmark": "build_time",
        "variant": variant.name,
        "runs": args.runs,
        "debootstrap": {
            "suite": SUITE,
            "mirror": MIRROR,
            "variant": "minbase",
            "include": DEBOOTSTRAP_INCLUDE,
        },
        "machine": info,
        "wall_seconds": round(time.monotonic() - t0, 1),
        "summary": summary,
        "per_run": runs,
    }
    path = B.write_result("build_time", result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(report(summary, args.runs, variant.name))
        print(
            f"\nmachine: {info['cpus']} x {info['cpu']}, load {info['loadavg_at_start']} -> "
            f"{info['loadavg_at_end']}; wrote {path.relative_to(B.REPO)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
