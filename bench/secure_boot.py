#!/usr/bin/env python3
"""Secure Boot: boot time with and without it (same run), and the build time signing adds.

Measured side by side in one run, QEMU TCG, -m 1024, 1 vCPU (--cpus), medians reported:

Boot (--runs, default 3), three systems, interleaved (the order rotates every round):
- sb-on:    the signed image (`kiln build --keys`) on OVMF_CODE_4M.secboot.fd + SMM with the
            image's secureboot-vars.fd (Secure Boot on: the firmware checks GRUB against db;
            GRUB checks grub.cfg, kiln.cfg, kernel and initramfs against its OpenPGP key).
- sb-off:   the same signed image on plain OVMF (no firmware check; GRUB still enforces its
            OpenPGP signatures: the check lives in GRUB's embedded configuration).
- unsigned: the unsigned image of the same variant on plain OVMF (today's default path).
Every measured boot is a steady-state boot: each disk is booted once first (that first boot
formats DATA and PRIVATE, then powers off cleanly), and each measured boot runs on a fresh
qcow2 overlay of that booted-once disk. Timed from QEMU start to `kiln: ready`, split at
`Welcome to GRUB`, `kiln-grub: booting slot` and GRUB's last line (`Booting in blind mode`).

Build (--build-runs, default 3): whole `kiln build` unsigned and `kiln build --keys` of the
same variant with the same (warm) package cache, interleaved (the order alternates), and the
signing steps alone, timed in-process (--step-runs, default 5): grub-mkimage with the boot
key and enforcing configuration against the plain grub-mkimage, sbsign, the OpenPGP
signatures of grub.cfg, kiln.cfg, the kernel and the initramfs, and the OVMF variables
(make_vars). Writes bench/results/secure_boot.json. Run as root (it builds images).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _bench as B

from kiln.build import bootloader
from kiln.build.pipeline import default_cache, source_date_epoch
from kiln.build.signing import BootSigner
from kiln.secureboot import keys as sb_keys
from kiln.secureboot.varstore import VARS_NAME, make_vars
from kiln.variant import Variant, load_variant
from kiln.vm.qemu import READY_RE, VmConfig

SYSTEMS = ("sb-on", "sb-off", "unsigned")
FIRST = {"signed": "sb-on", "unsigned": "unsigned"}  # how each disk's first boot runs
LOGS = B.CACHE / "logs"


# ------------------------------------------------------------------ numbers
def spread(values: list[float | None]) -> dict[str, Any]:
    got = [v for v in values if v is not None]
    return {"median": B.median(got), "min": min(got) if got else None, "max": max(got) if got else None,
            "n": len(got), "values": [None if v is None else round(v, 3) for v in values]}


def span(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


# ------------------------------------------------------------------ builds
def builds(variant: Variant, keys: Path, work: Path, runs: int) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """`runs` unsigned + signed build pairs, interleaved; the first pair's outputs are kept."""
    cache = default_cache()
    out: list[dict[str, Any]] = []
    kept: dict[str, Path] = {}
    for i in range(runs):
        order = ("unsigned", "signed") if i % 2 == 0 else ("signed", "unsigned")
        for kind in order:
            dest = work / f"build-{kind}-{i}"
            load = os.getloadavg()[0]
            B.log(f"build {i + 1}/{runs}: kiln build{' --keys' if kind == 'signed' else ''} (load {load:.2f})")
            r = B.kiln_build(variant, cache, dest, keys=keys if kind == "signed" else None)
            B.log(f"  {kind}: {r['seconds']:.1f} s")
            out.append({"kind": kind, "run": i, "order": order.index(kind), "loadavg_1min": round(load, 2),
                        "other_work": len(B.other_work()), **{k: v for k, v in r.items() if k != "cache_bytes"}})
            if i == 0:
                kept[kind] = dest
            else:
                B.remove_tree(dest)
    return out, kept


# ------------------------------------------------------------------ the signing steps alone
def boot_files(build_dir: Path, dest: Path) -> dict[str, Path]:
    """vmlinuz, initrd.img and kiln.cfg from a build's BOOT image (its update artifact)."""
    manifest = json.loads((build_dir / "artifacts" / "manifest.json").read_text())
    boot_img = dest / "boot.img"
    B.run(["zstd", "-d", "-q", "-f", "-o", boot_img, build_dir / "artifacts" / manifest["images"]["boot"]["file"]])
    files = {}
    for name in ("vmlinuz", "initrd.img", "kiln.cfg"):
        B.run(["mcopy", "-i", boot_img, f"::{name}", dest / name], env={"MTOOLS_SKIP_CHECK": "1"})
        files[name] = dest / name
    boot_img.unlink()
    files["grub.cfg"] = dest / "grub.cfg"
    files["grub.cfg"].write_text(bootloader.grub_cfg())
    return files


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


MKIMAGE_PLAIN = "grub-mkimage, unsigned GRUB"
MKIMAGE_SIGNED = "grub-mkimage with boot key + enforcing config"
ADDED = ("load boot key (RSA-3072 PEM)", "sbsign (GRUB for db)", "OpenPGP signature: grub.cfg",
         "OpenPGP signature: kiln.cfg", "OpenPGP signature: vmlinuz", "OpenPGP signature: initrd.img",
         "make_vars (virt-fw-vars: PK, KEK, db enrolled)")
TOTAL_ADDED = "total added: the signed GRUB's extra grub-mkimage time + the steps above but the hash"


def signing_steps(keys: Path, files: dict[str, Path], work: Path) -> dict[str, float]:
    """One round of the steps `kiln build --keys` adds, each timed alone (seconds)."""
    sde = source_date_epoch()
    keyset = sb_keys.load(keys)
    signer = BootSigner(keyset, sde)
    t: dict[str, float] = {}
    t["load boot key (RSA-3072 PEM)"] = timed(lambda: signer.boot_key)
    plain, signed = work / "plain", work / "signed"
    for d in (plain, signed):
        B.remove_tree(d)
        d.mkdir(parents=True)
    t[MKIMAGE_PLAIN] = timed(
        lambda: bootloader.grub_efi(plain / "BOOTX64.EFI", mtime=sde, work=plain))
    whole = timed(lambda: bootloader.grub_efi(signed / "BOOTX64.EFI", mtime=sde, work=signed, signer=signer))
    t["sbsign (GRUB for db)"] = timed(
        lambda: signer.sign_efi(signed / "grubx64.unsigned.efi", signed / "again.efi"))
    t[MKIMAGE_SIGNED] = whole - t["sbsign (GRUB for db)"]
    for name in ("grub.cfg", "kiln.cfg", "vmlinuz", "initrd.img"):
        copy = signed / name
        copy.write_bytes(files[name].read_bytes())
        t0 = time.perf_counter()
        signer.sign_for_grub(copy)
        t[f"OpenPGP signature: {name}"] = time.perf_counter() - t0

    def sha256_only() -> None:
        for name in ("vmlinuz", "initrd.img"):
            with open(files[name], "rb") as f:
                hashlib.file_digest(f, "sha256")

    t["of which SHA-256 of kernel + initramfs (hashlib)"] = timed(sha256_only)
    t["make_vars (virt-fw-vars: PK, KEK, db enrolled)"] = timed(lambda: make_vars(keyset, signed / VARS_NAME))
    sizes = {"grub_efi_unsigned": (plain / "BOOTX64.EFI").stat().st_size,
             "grub_efi_signed": (signed / "BOOTX64.EFI").stat().st_size}
    t.update({f"size:{k}": float(v) for k, v in sizes.items()})
    return t


def steps_summary(rounds: list[dict[str, float]]) -> dict[str, Any]:
    names = list(rounds[0]) if rounds else []
    out: dict[str, Any] = {k: spread([r.get(k) for r in rounds]) for k in names}
    # What signing adds to a build: the signed GRUB image's time over the plain one, plus every
    # step an unsigned build does not make at all.
    out[TOTAL_ADDED] = spread([r[MKIMAGE_SIGNED] - r[MKIMAGE_PLAIN] + sum(r[k] for k in ADDED) for r in rounds])
    return out


# ------------------------------------------------------------------ boots
def first_boot(kind: str, disk: Path, vars_fd: Path | None, cpus: int, work: Path) -> tuple[B.Boot, Path]:
    """Boot `disk` once (formats DATA and PRIVATE), power off; returns the booted-once raw disk."""
    wd = B.clean_workdir(work / f"vm-first-{kind}")
    cfg = VmConfig(disk, wd, cpus=cpus, accel="tcg", overlay=True, secure_boot_vars=vars_fd)
    b, clock = B.boot_vm(f"{FIRST[kind]}-first", cfg, READY_RE, cpus, 0, LOGS / f"secure_boot-{kind}-first.log",
                         after=B.power_off)
    b.milestones = milestones(clock, b.marker_s)
    if b.error is not None:
        raise SystemExit(f"first boot of the {kind} image failed: {b.error} (log: {LOGS}/secure_boot-{kind}-first.log)")
    booted = work / f"{kind}-booted-once.img"
    B.run(["qemu-img", "convert", "-O", "raw", wd / "overlay.qcow2", booted], timeout=600)
    B.remove_tree(wd)
    B.log(f"  first boot, {kind}: {b.marker_s:.2f} s ({b.note})")
    return b, booted


def milestones(clock: B.SerialClock, ready: float | None) -> dict[str, float | None]:
    """_bench.kiln_milestones plus GRUB split at `booting slot`: before it GRUB reads (and, when
    signed, verifies) grub.cfg and the grubenv; after it kiln.cfg, the kernel and the initramfs."""
    m = B.kiln_milestones(clock, ready)
    m["grub_cfg_s"] = span(m["grub"], m["grub_slot"])
    m["grub_load_s"] = span(m["grub_slot"], m["kernel_handoff"])
    return m


def steady_boot(system: str, disks: dict[str, Path], vars_fd: Path, cpus: int, rnd: int, work: Path) -> B.Boot:
    disk = disks["unsigned" if system == "unsigned" else "signed"]
    wd = B.clean_workdir(work / "vm")
    cfg = VmConfig(disk, wd, cpus=cpus, accel="tcg", overlay=True,
                   secure_boot_vars=vars_fd if system == "sb-on" else None)
    b, clock = B.boot_vm(system, cfg, READY_RE, cpus, rnd, LOGS / f"secure_boot-{system}-run{rnd}.log")
    b.milestones = milestones(clock, b.marker_s)
    b.note = f"other QEMU/pytest processes: {len(B.other_work())}"
    denied = clock.first(r"Access Denied|Security Violation|kiln-grub: .*(did not load|failed to load|no slot)")
    if denied is not None and b.error is None:
        b.error = f"the boot chain refused a file at {denied:.1f} s (see the serial log)"
    what = f"{b.marker_s:.2f} s" if b.marker_s is not None and b.error is None else f"FAILED: {b.error}"
    grub = (b.milestones or {}).get("grub_s")
    B.log(f"  {system:<9} round {rnd + 1}: {what}" + (f" (GRUB {grub:.2f} s)" if grub is not None else ""))
    B.remove_tree(wd)
    return b


FIELDS = ("marker_s", "firmware_s", "grub_s", "grub_cfg_s", "grub_load_s", "kernel_to_marker_s")


def boot_summary(boots: list[B.Boot], sizes: dict[str, int]) -> dict[str, Any]:
    def values(system: str, field: str) -> list[float | None]:
        return [b.marker_s if field == "marker_s" else (b.milestones or {}).get(field)
                for b in boots if b.system == system and b.error is None]

    per = {s: {f: spread(values(s, f)) for f in FIELDS} for s in SYSTEMS}

    def m(system: str, field: str) -> float | None:
        v = per[system][field]["median"]
        return None if v is None else float(v)

    out: dict[str, Any] = {"systems": per, "failures": sum(1 for b in boots if b.error is not None)}
    for s in ("sb-on", "sb-off"):
        out[f"{s}/unsigned"] = {f: B.ratio(m(s, f), m("unsigned", f)) for f in FIELDS}
        out[f"{s}-unsigned_s"] = {f: span(m("unsigned", f), m(s, f)) for f in FIELDS}
    out["sb-on-sb-off_s"] = {f: span(m("sb-off", f), m("sb-on", f)) for f in FIELDS}
    # GRUB's OpenPGP check of the kernel and initramfs, as a rate: the extra seconds between
    # `booting slot` and the hand-over, over the bytes it hashes (kiln.cfg is negligible).
    extra = span(m("unsigned", "grub_load_s"), m("sb-off", "grub_load_s"))
    hashed = sizes.get("vmlinuz", 0) + sizes.get("initrd.img", 0)
    out["grub_verify"] = {"extra_load_s": extra, "bytes": hashed,
                          "mib_per_s": None if not extra or extra <= 0 else hashed / B.MiB / extra}
    return out


def build_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def vals(kind: str, step: str | None = None) -> list[float | None]:
        return [r["seconds"] if step is None else r["steps"].get(step) for r in rows if r["kind"] == kind]

    steps = list(next((r["steps"] for r in rows), {}))
    out: dict[str, Any] = {k: spread(vals(k)) for k in ("unsigned", "signed")}
    u, s = out["unsigned"]["median"], out["signed"]["median"]
    out["added_s"] = span(u, s)
    out["ratio"] = B.ratio(s, u)
    out["steps"] = {st: {k: B.median(vals(k, st)) for k in ("unsigned", "signed")} for st in steps}
    pairs: dict[int, dict[str, float]] = {}
    for r in rows:
        pairs.setdefault(r["run"], {})[r["kind"]] = r["seconds"]
    out["added_per_pair_s"] = [round(p["signed"] - p["unsigned"], 2) for p in pairs.values() if len(p) == 2]
    return out


# ------------------------------------------------------------------ report
def report(r: dict[str, Any]) -> str:
    bs = r["boot"]["summary"]
    rows = []
    labels = {"marker_s": "QEMU -> ready", "firmware_s": "  OVMF (-> GRUB)", "grub_s": "  GRUB (-> kernel)",
              "grub_cfg_s": "    grub.cfg + grubenv", "grub_load_s": "    kiln.cfg + kernel + initramfs",
              "kernel_to_marker_s": "  kernel -> ready"}
    for f in FIELDS:
        cells = []
        for s in SYSTEMS:
            x = bs["systems"][s][f]
            cells.append(f"{B.fmt_s(x['median'], 2)} ({B.fmt_s(x['min'], 2)}-{B.fmt_s(x['max'], 2)})"
                         if x["median"] is not None else "-")
        rows.append([labels[f], *cells, B.fmt_ratio(bs["sb-on/unsigned"][f]),
                     B.fmt_s(bs["sb-on-unsigned_s"][f], 2)])
    gv = bs["grub_verify"]
    rate = "-" if gv["mib_per_s"] is None else f"{gv['mib_per_s']:.1f}"
    build = r["build"]["summary"]
    srows = [[k, B.fmt_s(v["median"], 3), B.fmt_s(v["min"], 3), B.fmt_s(v["max"], 3)]
             for k, v in r["signing_steps"]["summary"].items()]
    out = [
        f"Secure Boot, boot (TCG, {r['cpus']} vCPU, -m 1024, steady-state boots), median (min-max) of "
        f"{r['boot']['runs']} round(s)",
        "",
        B.table(rows, ["", *SYSTEMS, "sb-on/unsigned", "sb-on - unsigned"]),
        "",
        f"GRUB's OpenPGP check of kernel + initramfs ({B.fmt_mib(gv['bytes'])}): +{B.fmt_s(gv['extra_load_s'], 2)}"
        f" (sb-off - unsigned, kiln.cfg + kernel + initramfs), "
        f"{rate} MiB/s",
        "",
        f"build, warm cache, {r['build']['runs']} pair(s): unsigned {B.fmt_s(build['unsigned']['median'])}, "
        f"--keys {B.fmt_s(build['signed']['median'])}: +{B.fmt_s(build['added_s'])} "
        f"(ratio {B.fmt_ratio(build['ratio'])}; per pair {build['added_per_pair_s']})",
        "",
        B.table(srows, ["signing step, alone", "median", "min", "max"]),
    ]
    if bs["failures"]:
        out.append(f"\n{bs['failures']} boot(s) failed: see per_boot in the JSON and {LOGS}")
    return "\n".join(out)


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3, help="boot rounds, each boots all three systems (default 3)")
    ap.add_argument("--build-runs", type=int, default=3, help="unsigned + signed build pairs (default 3)")
    ap.add_argument("--step-runs", type=int, default=5, help="rounds of the signing steps alone (default 5)")
    ap.add_argument("--cpus", type=int, default=1, help="vCPUs of the guests (default 1)")
    ap.add_argument("--variant", help="variant to build (default: the default variant)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("secure_boot.py must run as root (it builds images)", file=sys.stderr)
        return 2
    if min(args.runs, args.build_runs, args.step_runs, args.cpus) < 1:
        ap.error("--runs, --build-runs, --step-runs and --cpus must be positive")
    info = B.machine()
    t0 = time.monotonic()
    busy_at_start = B.other_work(warn=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    variant = load_variant(args.variant)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-secure-boot-", dir="/tmp"))
    boots: list[B.Boot] = []
    try:
        keys = work / "keys"
        keys_s = timed(lambda: sb_keys.init(keys, name="Kiln bench"))
        B.log(f"key set made in {keys_s:.2f} s: {keys}")
        build_rows, kept = builds(variant, keys, work, args.build_runs)

        B.log(f"signing steps alone, {args.step_runs} round(s)")
        files = boot_files(kept["unsigned"], work)
        sizes = {k: p.stat().st_size for k, p in files.items()}
        rounds = [signing_steps(keys, files, work / "steps") for _ in range(args.step_runs)]
        step_sizes = {k.removeprefix("size:"): int(v) for k, v in rounds[-1].items() if k.startswith("size:")}
        rounds = [{k: v for k, v in x.items() if not k.startswith("size:")} for x in rounds]

        disks = {k: kept[k] / "disk.img" for k in ("unsigned", "signed")}
        vars_fd = kept["signed"] / VARS_NAME
        B.log(f"first boots (DATA and PRIVATE formatted), {args.cpus} vCPU")
        firsts = []
        for kind in ("signed", "unsigned"):
            b, disks[kind] = first_boot(kind, disks[kind], vars_fd if kind == "signed" else None, args.cpus, work)
            firsts.append(b)
            B.remove_tree(kept[kind] / "artifacts")  # the booted-once copy is all the boots need
        for rnd in range(args.runs):
            order = SYSTEMS[rnd % 3:] + SYSTEMS[:rnd % 3]
            B.log(f"round {rnd + 1}/{args.runs}: {', '.join(order)}")
            for system in order:
                boots.append(steady_boot(system, disks, vars_fd, args.cpus, rnd, work))
    finally:
        B.remove_tree(work)
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result: dict[str, Any] = {
        "benchmark": "secure_boot",
        "variant": variant.name,
        "cpus": args.cpus,
        "accel": "tcg",
        "memory_mib": 1024,
        "machine": info,
        "other_work_at_start": busy_at_start,
        "wall_seconds": round(time.monotonic() - t0, 1),
        "keys_init_s": round(keys_s, 3),
        "sizes": {**sizes, **step_sizes},
        "boot": {
            "runs": args.runs,
            "steady_state": "each disk booted once first (formats DATA and PRIVATE, clean power-off); every "
                            "measured boot is on a fresh overlay of that booted-once disk",
            "summary": boot_summary(boots, sizes),
            "first_boots": [b.to_json() for b in firsts],
            "per_boot": [b.to_json() for b in boots],
        },
        "build": {"runs": args.build_runs, "summary": build_summary(build_rows), "per_build": build_rows},
        "signing_steps": {"runs": args.step_runs, "summary": steps_summary(rounds),
                          "per_round": [{k: round(v, 4) for k, v in x.items()} for x in rounds]},
    }
    try:
        text = report(result)
    except Exception as e:  # the measurements are recorded whatever happens to the table
        text = f"(the report failed: {e!r}; the run is recorded)"
    B.emit("secure_boot", result, text, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
