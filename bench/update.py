#!/usr/bin/env python3
"""Updates: host-side apply against its floor, publish time, and apply-to-ready in a guest (TCG).

The default variant is built four times (1.0.0 and 2.0.0, plain and with --debug-console),
every image trusting one bench repository's root (`kiln repo init`) and looking for updates
at http://10.0.2.2:<port>, the port fixed before the builds. Then, side by side in one run:

1. host apply: 2.0.0 published (`kiln.repo.publish.add`) into a copy of the bench
   repository, served with RepoServer on 127.0.0.1; the update agent
   (`Agent.run("refresh")` + `Agent.run("prepare")`, in a child process so its peak RSS can
   be read) writes slot B of a fresh copy of the 1.0.0 disk, with a fresh state directory.
   Each run also times four floors, each image (root, boot, hash) written into slot B of
   another fresh disk copy at the partition's offset, `dd … conv=notrunc,fsync`:
     floor:          zstd -dc ARTIFACT | tee >(sha256sum) | dd   (decompress + hash + write)
     floor, raw:     cat IMAGE | tee >(sha256sum) | dd           (the uncompressed image)
     floor, HTTP:    curl URL | zstd -dc | tee >(sha256sum) | dd (the same server as the agent)
     floor, openssl: zstd -dc ARTIFACT | tee >(openssl dgst -sha256) | dd
                     (coreutils' sha256sum has no SHA-NI code; OpenSSL, like Python's
                     hashlib, does: this is the tighter floor)
   Per-phase wall and CPU time of the agent (TUF refresh, each image's write, the verity
   re-read) come from timers wrapped around the agent's own functions in the child, its
   peak RSS from VmHWM; zstd's peak RSS is measured alone with /usr/bin/time.
   Target: whole processes on both sides: the agent process (interpreter start, imports,
   refresh + prepare, as `kiln update apply` pays it) <= 1.5 x the tightest floor, the fastest
   pipeline that decompresses, hashes, writes and fsyncs (each pays its own process starts).
   The agent's in-process time (refresh + prepare alone) is reported beside it.
2. publish: `kiln repo add` (the CLI) of the 2.0.0 artifacts into a fresh repository, next to
   `cp` of the same files (the floor), `cp` + `sync`, `sha256sum`, and `publish.add` in
   process (the CLI minus interpreter start and imports).
3. guest: the 1.0.0 --debug-console disk (a copy, overlay=False) booted under TCG with 2
   vCPUs; once ready, 2.0.0 is published to the served repository and
   `kiln update apply --reboot` typed into the debug shell; timed to
   `kiln: ready version=2.0.0 … slot=B`, split at the serial console's milestones. For
   comparison the same VM then reboots plainly (`reboot`), and the 1.0.0 first boot (QEMU
   start to ready) is reported too.

Writes bench/results/update.json. Run as root (kiln build). Builds are kept in
bench/.cache/update/; `--reuse-builds` boots those again instead of rebuilding (only valid
while src/ and variants/ are unchanged).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import _bench as B

KEYS = ("root", "boot", "hash")  # the order the agent writes them (writer.ORDER)
VERSIONS = ("1.0.0", "2.0.0")
TARGET_RATIO = 1.5
CACHE = B.CACHE / "update"
KILN = Path(sys.executable).parent / "kiln"
APPLY_TIMEOUT = 1800.0
FLOORS = ("floor", "floor_raw", "floor_http", "floor_openssl")
# The floors that do the agent's work (decompress, hash, write, fsync) as whole processes; the
# target compares the whole agent process with the fastest of them. floor_raw is left out: it
# skips the decompression by reading an image the agent never gets.
HONEST_FLOORS = ("floor", "floor_http", "floor_openssl")
BOOT_TIMEOUT = 600.0


# ------------------------------------------------------------------ builds
@dataclass(frozen=True)
class Release:
    """One build's output directory: disk.img and artifacts/ (manifest.json + images)."""

    version: str
    debug: bool
    out: Path

    @property
    def disk(self) -> Path:
        return self.out / "disk.img"

    @property
    def artifacts(self) -> Path:
        return self.out / "artifacts"

    @cached_property
    def manifest(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.artifacts / "manifest.json").read_text())
        return doc

    def image(self, key: str) -> dict[str, Any]:
        entry: dict[str, Any] = self.manifest["images"][key]
        return entry

    def artifact(self, key: str) -> Path:
        return self.artifacts / str(self.image(key)["file"])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def builds(reuse: bool) -> tuple[Path, int, dict[tuple[str, bool], Release], dict[str, Any]]:
    """The bench repository (its root is in every image), the guest port and the four builds."""
    from kiln.build.pipeline import BuildOptions, build
    from kiln.core.progress import Progress
    from kiln.repo import admin
    from kiln.variant import load_variant
    from kiln.vm.qemu import free_port

    state = CACHE / "builds.json"
    repo = CACHE / "repo"
    releases = {(v, d): Release(v, d, CACHE / f"{v}{'-debug' if d else ''}") for v in VERSIONS for d in (False, True)}
    if reuse and state.is_file():
        info: dict[str, Any] = json.loads(state.read_text())
        if port_free(info["port"]) and all(r.disk.is_file() for r in releases.values()):
            B.log(f"reusing the builds in {CACHE.relative_to(B.REPO)} (port {info['port']})")
            return repo, int(info["port"]), releases, {**info, "reused": True}
        B.log("cached builds unusable (missing, or their port is taken): building")
    B.remove_tree(CACHE)
    admin.init(repo)
    port = free_port()
    variant = load_variant()
    timings: dict[str, Any] = {}
    for (version, debug), rel in releases.items():
        B.log(f"building {variant.name} {version}{' --debug-console' if debug else ''}")
        res = build(
            BuildOptions(variant.with_version(version), rel.out, debug_console=debug, update_root=repo,
                         update_url=f"http://10.0.2.2:{port}"),
            Progress(quiet=True),
        )
        timings[rel.out.name] = {"total_s": round(res.timings["total"], 1), "sizes": res.sizes}
    info = {"port": port, "variant": variant.name, "builds": timings}
    state.write_text(json.dumps(info, indent=2) + "\n")
    return repo, port, releases, {**info, "reused": False}


# ------------------------------------------------------------------ helpers
def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux starts a child's
    ru_maxrss at its parent's peak when it execs (a subprocess of a 300 MiB Python reports
    300 MiB), so ru_maxrss of a child says more about its parent than about itself."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def fresh_disk(rel: Release, dest: Path) -> Path:
    """A sparse copy of the disk, flushed: a timed fsync must not also write out the copy
    (or the builds before it)."""
    dest.unlink(missing_ok=True)
    B.run(["cp", "--sparse=always", rel.disk, dest])
    os.sync()
    return dest


def timed_shell(script: str) -> tuple[float, float]:
    """Run a bash script; (wall seconds, CPU seconds of it and every process it waited for)."""
    cpu0, t0 = cpu_children(), time.perf_counter()
    B.run(["bash", "-c", f"set -euo pipefail; {script}"])
    return time.perf_counter() - t0, cpu_children() - cpu0


# ------------------------------------------------------------------ 1. host apply: the agent (child process)
class Phases:
    """Wall and CPU time spent inside wrapped functions, summed per label."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, float]] = {}

    def wrap(self, owner: Any, name: str, label: str | Callable[[tuple[Any, ...]], str]) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            what = label(args) if callable(label) else label
            w0, s0, c0 = time.perf_counter(), time.process_time(), cpu_children()
            try:
                return original(*args, **kwargs)
            finally:
                t = self.totals.setdefault(what, {"wall_s": 0.0, "agent_cpu_s": 0.0, "zstd_cpu_s": 0.0, "calls": 0})
                t["wall_s"] += time.perf_counter() - w0
                t["agent_cpu_s"] += time.process_time() - s0
                t["zstd_cpu_s"] += cpu_children() - c0
                t["calls"] += 1

        setattr(owner, name, timed)


def agent_child(spec: dict[str, str]) -> None:
    """`update.py --agent SPEC`: refresh + prepare into slot B of spec["disk"]; prints JSON."""
    t_start = time.perf_counter()
    from kiln.host.slot import Slots
    from kiln.host.update import migrate, trust, writer
    from kiln.host.update.agent import Agent
    from kiln.host.update.status import Paths

    imported = time.perf_counter() - t_start
    rss_imported = peak_rss()
    phases = Phases()
    phases.wrap(trust.TrustedRepo, "refresh", "TUF refresh + manifest.json")
    phases.wrap(migrate, "cache", "migrations cached")
    phases.wrap(Slots, "write_image", lambda a: f"write {a[2]}: HTTP + TUF sha256, zstd, "
                f"{'' if a[2] == writer.VERITY_CHECKED else 'sha256, '}pwrite, fsync")
    # on its own thread, beside the boot write: its wall time overlaps that phase's
    phases.wrap(writer, "verify_slot", "verity re-read of root + hash (Python, beside the boot write)")
    phases.wrap(Slots, "apply", "grubenv writes (clear-inactive, mark-valid)")
    agent = Agent(
        slots=Slots.open(image=Path(spec["disk"]), active="A"),
        settings={"metadata-base-url": spec["metadata_url"], "targets-base-url": spec["targets_url"], "seed": 100},
        variant=spec["variant"],
        version="1.0.0",
        arch="amd64",
        paths=Paths(state=Path(spec["state"]) / "state", run=Path(spec["state"]) / "run", root=Path(spec["root"])),
    )
    t0, cpu0 = time.perf_counter(), time.process_time()
    agent.run("refresh")
    t1 = time.perf_counter()
    st = agent.run("prepare")
    t2 = time.perf_counter()
    if (st.update_state, st.staged_version) != ("Staged", "2.0.0"):
        raise SystemExit(f"agent ended in {st.update_state} with {st.staged_version} staged: {st.reason}")
    print(json.dumps({
        "refresh_s": t1 - t0,
        "prepare_s": t2 - t1,
        "total_s": t2 - t0,
        "agent_cpu_s": time.process_time() - cpu0,
        "zstd_cpu_s": cpu_children(),
        "imports_s": imported,
        "phases": phases.totals,
        "peak_rss_bytes": peak_rss(),
        "rss_after_imports_bytes": rss_imported,
    }))


# ------------------------------------------------------------------ 1. host apply: the parent
def run_agent(disk: Path, state: Path, root: Path, srv: Any, variant: str) -> dict[str, Any]:
    spec = {"disk": str(disk), "state": str(state), "root": str(root), "variant": variant,
            "metadata_url": srv.metadata_url, "targets_url": srv.targets_url}
    server_cpu0, t0 = time.process_time(), time.perf_counter()  # this process only serves HTTP meanwhile
    proc = subprocess.run([sys.executable, __file__, "--agent", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"agent failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    out["server_cpu_s"] = time.process_time() - server_cpu0
    return out


def floor(template: str, images: dict[str, Path] | dict[str, str], disk: Path, offsets: dict[str, int], work: Path,
          expect: dict[str, str], hasher: str = "sha256sum") -> dict[str, Any]:
    """Write each image into `disk` at its slot-B offset with `template` (a pipeline whose
    {src} is the source and whose output is hashed by `hasher` and written); checks the hashes."""
    wall = cpu = 0.0
    per_image = {}
    for key in KEYS:
        digest = work / f"{key}.sha256"
        digest.unlink(missing_ok=True)
        source = template.format(src=images[key])
        script = (f"{source} | tee >({hasher} > {digest}) | dd of={disk} bs=1M seek={offsets[key]} "
                  f"oflag=seek_bytes conv=notrunc,fsync status=none; "
                  f"while [ ! -s {digest} ]; do sleep 0.002; done")  # bash does not wait for >(…)
        w, c = timed_shell(script)
        got = digest.read_text().split()[0]
        if got != expect[key]:
            raise RuntimeError(f"floor wrote {key} with sha256 {got}, expected {expect[key]}")
        per_image[key] = w
        wall += w
        cpu += c
    return {"total_s": wall, "cpu_s": cpu, "per_image_s": per_image}


def attribution(raw: dict[str, Path], art: Path, rel: Release) -> dict[str, Any]:
    """What the agent's extra work costs on this CPU, each alone on the same bytes (median of 3)."""
    from kiln.image import verity

    ver = rel.manifest["verity"]

    def py_sha256() -> None:
        h = hashlib.sha256()
        with open(raw["root"], "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)

    def py_verity() -> None:
        with open(raw["root"], "rb") as data, open(raw["hash"], "rb") as tree:
            verity.verify(data, tree, root_hash=ver["root_hash"], salt=ver["salt"], data_blocks=ver["data_blocks"])

    def seconds(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    probes: dict[str, Callable[[], object]] = {
        "sha256 of root, Python hashlib (1 MiB reads)": py_sha256,
        "sha256sum of root": lambda: B.run(["sha256sum", raw["root"]]),
        "openssl dgst -sha256 of root": lambda: B.run(["openssl", "dgst", "-sha256", raw["root"]]),
        "zstd -dc root artifact > /dev/null": lambda: B.run(["bash", "-c", f"zstd -dc {art} > /dev/null"]),
        "verity check of root + hash, Kiln (Python)": py_verity,
        "veritysetup verify of root + hash": lambda: B.run(
            ["veritysetup", "verify", raw["root"], raw["hash"], ver["root_hash"]]),
    }
    out = {}
    for name, fn in probes.items():
        out[name] = B.median([seconds(fn) for _ in range(3)])
    return out


def host_apply(rel1: Release, rel2: Release, bench_repo: Path, work: Path, runs: int, variant: str) -> dict[str, Any]:
    from kiln.host.slot import Slots
    from kiln.repo import publish
    from kiln.repo.serve import RepoServer

    repo = work / "host-repo"
    shutil.copytree(bench_repo, repo)  # same keys, so the same root the images trust
    publish.add(repo, rel2.artifacts, waves="none")
    raw = {}
    for key in KEYS:  # the uncompressed images, for the floor without zstd (not timed)
        raw[key] = work / f"{key}.img"
        B.run(["bash", "-c", f"zstd -dc {rel2.artifact(key)} > {raw[key]}"])
    offsets = {k: r.offset for k, r in Slots.open(image=rel1.disk, active="A").partitions("B").items()}
    expect = {k: rel2.image(k)["uncompressed_sha256"] for k in KEYS}
    artifacts = {k: rel2.artifact(k) for k in KEYS}
    disk = work / "disk.img"
    result: dict[str, list[Any]] = {name: [] for name in ("agent", *FLOORS)}
    with RepoServer(repo) as srv:
        urls = {k: f"{srv.targets_url}{rel2.image(k)['sha256']}.{rel2.image(k)['file']}" for k in KEYS}
        for i in range(runs):
            B.log(f"host apply run {i + 1}/{runs}: agent")
            state = work / f"agent{i}"
            result["agent"].append(run_agent(fresh_disk(rel1, disk), state, repo / "metadata" / "1.root.json",
                                             srv, variant))
            shutil.rmtree(state)
            B.log(f"host apply run {i + 1}/{runs}: floors")
            result["floor"].append(floor("zstd -dc {src}", artifacts, fresh_disk(rel1, disk), offsets, work, expect))
            result["floor_raw"].append(floor("cat {src}", raw, fresh_disk(rel1, disk), offsets, work, expect))
            result["floor_openssl"].append(floor("zstd -dc {src}", artifacts, fresh_disk(rel1, disk), offsets, work,
                                                 expect, hasher="openssl dgst -sha256 -r"))
            result["floor_http"].append(floor("curl -sf {src} | zstd -dc", urls, fresh_disk(rel1, disk), offsets,
                                              work, expect))
    disk.unlink(missing_ok=True)
    B.log("host apply: attribution probes")
    probes = attribution(raw, rel2.artifact("root"), rel2)
    sizes = {k: {"compressed": rel2.image(k)["size"], "uncompressed": rel2.image(k)["uncompressed_size"]}
             for k in KEYS}
    zstd_kib = B.run(["bash", "-c", f"/usr/bin/time -f %M zstd -d -c -q < {rel2.artifact('root')} > /dev/null"]).stderr
    return {"runs": result, "attribution_s": probes, "image_bytes": sizes, "zstd_peak_rss_bytes":
            int(zstd_kib.split()[-1]) * 1024, **summarise_host(result)}


def summarise_host(r: dict[str, list[Any]]) -> dict[str, Any]:
    agent = B.median([a["total_s"] for a in r["agent"]])
    floors = {name: B.median([f["total_s"] for f in r[name]]) for name in FLOORS}
    phases: dict[str, dict[str, float | None]] = {}
    for label in r["agent"][0]["phases"]:
        phases[label] = {field: B.median([a["phases"][label][field] for a in r["agent"]])
                         for field in ("wall_s", "agent_cpu_s", "zstd_cpu_s")}
    process = B.median([a["process_wall_s"] for a in r["agent"]])
    tightest = min((n for n in HONEST_FLOORS if floors[n] is not None), key=lambda n: floors[n] or 0.0)
    ratio = B.ratio(process, floors[tightest])
    return {
        "median_s": {"agent": agent, "agent_refresh": B.median([a["refresh_s"] for a in r["agent"]]),
                     "agent_prepare": B.median([a["prepare_s"] for a in r["agent"]]),
                     "agent_process": B.median([a["process_wall_s"] for a in r["agent"]]), **floors},
        "median_cpu_s": {"agent": B.median([a["agent_cpu_s"] for a in r["agent"]]),
                         "agent_zstd": B.median([a["zstd_cpu_s"] for a in r["agent"]]),
                         "server": B.median([a["server_cpu_s"] for a in r["agent"]]),
                         **{n: B.median([f["cpu_s"] for f in r[n]]) for n in FLOORS}},
        "median_phases": phases,
        # a phase run beside another (on its own thread) overlaps it: not part of the sum
        "median_rest_s": B.median([a["total_s"] - sum(p["wall_s"] for k, p in a["phases"].items() if "beside" not in k)
                                   for a in r["agent"]]),
        "ratios": {**{f"agent/{name}": B.ratio(agent, floors[name]) for name in FLOORS},
                   **{f"agent process/{name}": B.ratio(process, floors[name]) for name in FLOORS}},
        "peak_rss_bytes": {"agent": max(a["peak_rss_bytes"] for a in r["agent"]),
                           "agent_after_imports": max(a["rss_after_imports_bytes"] for a in r["agent"])},
        "target": {"ratio_max": TARGET_RATIO, "measure": "agent process / tightest floor", "floor": tightest,
                   "ratio": ratio, "met": ratio is not None and ratio <= TARGET_RATIO},
    }


# ------------------------------------------------------------------ 2. publish
def publish_time(rel2: Release, work: Path, runs: int) -> dict[str, Any]:
    from kiln.repo import admin, publish

    files = [rel2.artifact(k) for k in KEYS] + [rel2.artifacts / "manifest.json"]
    names = " ".join(str(f) for f in files)
    rows: dict[str, list[float]] = {"kiln repo add": [], "publish.add in process": [], "cp": [], "cp + sync": [],
                                    "sha256sum": []}
    for i in range(runs):
        B.log(f"publish run {i + 1}/{runs}")
        cli, inproc, dest = work / f"pub-cli{i}", work / f"pub-lib{i}", work / f"pub-cp{i}"
        admin.init(cli)
        admin.init(inproc)
        os.sync()
        rows["kiln repo add"].append(timed_shell(f"{KILN} repo add {cli} {rel2.artifacts} > /dev/null")[0])
        t0 = time.perf_counter()
        publish.add(inproc, rel2.artifacts)
        rows["publish.add in process"].append(time.perf_counter() - t0)
        dest.mkdir()
        rows["cp"].append(timed_shell(f"cp {names} {dest}/")[0])
        shutil.rmtree(dest)
        dest.mkdir()
        rows["cp + sync"].append(timed_shell(f"cp {names} {dest}/ && sync {dest}/*")[0])
        rows["sha256sum"].append(timed_shell(f"sha256sum {names} > /dev/null")[0])
        for d in (cli, inproc, dest):
            shutil.rmtree(d)
    med = {k: B.median(v) for k, v in rows.items()}
    floor_both = None if med["cp"] is None or med["sha256sum"] is None else med["cp"] + med["sha256sum"]
    return {
        "bytes": sum(f.stat().st_size for f in files),
        "runs_s": rows,
        "median_s": med,
        "ratios": {"kiln/cp": B.ratio(med["kiln repo add"], med["cp"]),
                   "kiln/(cp + sha256sum)": B.ratio(med["kiln repo add"], floor_both),
                   "kiln/(cp + sync)": B.ratio(med["kiln repo add"], med["cp + sync"])},
    }


# ------------------------------------------------------------------ 3. guest
READY_2 = r"kiln: ready version=2\.0\.0 variant=\S+ slot=B"


def milestones(clock: B.SerialClock, sent: float, ready: str) -> dict[str, float | None]:
    """Console milestones after `sent` (seconds since QEMU start), as seconds after `sent`."""

    def at(pattern: str) -> float | None:
        t = clock.first(pattern, after=sent)
        return None if t is None else t - sent

    return {
        "first_progress_line": at(r"writing root:"),
        "hash_progress": at(r"writing hash:"),  # the agent records each image's start; the CLI long-polls
        "boot_progress": at(r"writing boot:"),
        "state_ready": at(r"state: Ready"),
        "restarting": at(r"reboot: Restarting system"),
        "grub": at(r"Welcome to GRUB"),
        "grub_boots_slot": at(r"kiln-grub: booting slot"),
        "kernel": at(r"Booting in blind mode"),  # GRUB's last line before the kernel runs
        "ready": at(ready),
    }


def segments(m: dict[str, float | None], *, update: bool) -> dict[str, float | None]:
    def span(a: str | None, b: str) -> float | None:
        start = 0.0 if a is None else m[a]
        return None if start is None or m[b] is None else m[b] - start  # type: ignore[operator]

    out: dict[str, float | None] = {}
    if update:
        out["check + prepare until the first progress line"] = span(None, "first_progress_line")
        out["write root"] = span("first_progress_line", "hash_progress")
        out["write hash"] = span("hash_progress", "boot_progress")
        out["write boot beside the verity re-read, activate"] = span("boot_progress", "state_ready")
        out["apply (until 'state: Ready')"] = span(None, "state_ready")
    out["shutdown (until 'reboot: Restarting system')"] = span("state_ready" if update else None, "restarting")
    out["firmware (until 'kiln-grub: booting slot')"] = span("restarting", "grub_boots_slot")
    out["GRUB (grubenv, kernel + initrd load)"] = span("grub_boots_slot", "kernel")
    out["kernel + initramfs + systemd to ready"] = span("kernel", "ready")
    out["total"] = m["ready"]
    return out


GUEST_TIMER = r"""
import subprocess, sys, time
t0 = time.monotonic()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(time.monotonic() - t0)
"""
GUEST_PROBES = {  # what every agent command and the CLI pay before doing anything, under TCG
    "python3 start (python3 -I -c pass)": "python3 -I -c pass",
    "agent start + imports (python3 -m kiln.host.update.agent status)": "python3 -m kiln.host.update.agent status",
    "import the TUF client (kiln.host.update.trust)": "python3 -c 'import kiln.host.update.trust'",
    "kiln update status (CLI start + one API request)": "kiln update status",
}


def guest_probes(vm: Any) -> dict[str, float | None]:
    """Each probe timed in the guest (median of 3), on the idle system after the update."""
    import base64

    vm.check(f"echo {base64.b64encode(GUEST_TIMER.encode()).decode()} | base64 -d > /tmp/timer.py")
    out = {}
    for name, cmd in GUEST_PROBES.items():
        runs = [float(vm.check(f"python3 -I /tmp/timer.py sh -c {json.dumps(cmd)}", timeout=120).split()[-1])
                for _ in range(3)]
        out[name] = B.median(runs)
    return out


def boot_timeline(vm: Any) -> dict[str, Any]:
    """Where this boot's time went, as the guest saw it: the agent's settings pipeline steps
    (/run/kiln/boot-settings.json) and systemd's chain to the ready target, so the first
    boot of a new version can be told apart from a plain reboot step by step."""
    steps = vm.check("tr -d '\\n' < /run/kiln/boot-settings.json; echo", timeout=60)
    chain = vm.check("systemd-analyze critical-chain --no-pager kiln-ready.target 2>&1 | tail -n +3", timeout=120)
    return {"settings_pipeline": B.json_line(steps), "critical_chain": chain.strip().splitlines()[:40]}


def guest_run(i: int, rel1: Release, rel2: Release, bench_repo: Path, port: int, work: Path) -> dict[str, Any]:
    from kiln.repo import publish
    from kiln.repo.serve import RepoServer
    from kiln.vm.qemu import READY_RE, Vm, VmConfig

    repo = work / f"guest-repo{i}"
    shutil.copytree(bench_repo, repo)  # still empty: 2.0.0 is published once 1.0.0 is up
    disk = fresh_disk(rel1, work / f"guest{i}.img")
    clock = B.SerialClock()
    vm = Vm(VmConfig(disk, work / f"vm{i}", cpus=2, overlay=False, accel="tcg"), echo=clock)
    out: dict[str, Any] = {"loadavg_1min_at_start": round(os.getloadavg()[0], 2)}
    try:
        with RepoServer(repo, port=port):
            vm.start()
            clock.start(vm.started_at)
            m = vm.wait_ready(BOOT_TIMEOUT)
            if m.group(1, 3) != ("1.0.0", "A"):
                raise RuntimeError(f"booted {m.group(0)}, expected 1.0.0 on slot A")
            out["first_boot_ready_s"] = clock.first(READY_RE)
            vm.wait_shell()
            publish.add(repo, rel2.artifacts, waves="none")
            B.log(f"guest run {i + 1}: kiln update apply --reboot")
            vm.mark()
            sent = time.monotonic() - clock.t0
            vm.send("kiln update apply --reboot; echo APPLY-EXIT=$?\n")
            m = vm.wait_for(r"state: (\w+)\n|APPLY-EXIT=(\d+)", APPLY_TIMEOUT)  # \n: the whole word
            if m.group(1) != "Ready":
                raise RuntimeError(f"kiln update apply did not reach Ready: {m.group(0)}\n{vm.output[-2000:]}")
            m = vm.wait_ready(BOOT_TIMEOUT)
            if m.group(1, 3) != ("2.0.0", "B"):
                raise RuntimeError(f"after the update booted {m.group(0)}, expected 2.0.0 on slot B")
            time.sleep(0.2)  # the reader thread echoes before wait_for sees it; be sure the clock has it
            out["update_milestones_s"] = mu = milestones(clock, sent, READY_2)
            out["update_s"] = segments(mu, update=True)
            vm.wait_shell()
            out["update_boot_timeline"] = boot_timeline(vm)
            out["guest_probes_s"] = guest_probes(vm)
            B.log(f"guest run {i + 1}: plain reboot of 2.0.0")
            vm.mark()
            sent = time.monotonic() - clock.t0
            vm.send("reboot\n")
            vm.wait_ready(BOOT_TIMEOUT)
            time.sleep(0.2)
            out["reboot_milestones_s"] = mr = milestones(clock, sent, READY_2)
            out["reboot_s"] = segments(mr, update=False)
            vm.wait_shell()
            out["reboot_timeline"] = boot_timeline(vm)
    finally:
        vm.kill()
        log = B.CACHE / "logs" / f"update-guest{i}.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(clock.text())
        disk.unlink(missing_ok=True)
    return out


def guest(rel1: Release, rel2: Release, bench_repo: Path, port: int, work: Path, runs: int) -> dict[str, Any]:
    results = []
    for i in range(runs):
        B.log(f"guest run {i + 1}/{runs}: booting 1.0.0 (TCG, 2 vCPUs)")
        try:
            results.append(guest_run(i, rel1, rel2, bench_repo, port, work))
        except Exception as e:  # a failed run is a data point, not the end of the benchmark
            B.log(f"guest run {i + 1} failed: {str(e).splitlines()[0]}")
            results.append({"error": str(e)[:4000]})
    ok = [r for r in results if "error" not in r]

    def med(part: str, key: str) -> float | None:
        return B.median([r[part][key] for r in ok])

    update = {k: med("update_s", k) for k in ok[0]["update_s"]} if ok else {}
    reboot = {k: med("reboot_s", k) for k in ok[0]["reboot_s"]} if ok else {}
    first = B.median([r["first_boot_ready_s"] for r in ok])
    return {
        "runs": results,
        "median_update_s": update,
        "median_reboot_s": reboot,
        "median_first_boot_s": first,
        "median_probes_s": {k: B.median([r["guest_probes_s"][k] for r in ok]) for k in GUEST_PROBES} if ok else {},
        "ratios": {"update/plain reboot": B.ratio(update.get("total"), reboot.get("total")),
                   "update/first boot": B.ratio(update.get("total"), first)},
    }


# ------------------------------------------------------------------ report
def report(r: dict[str, Any]) -> str:
    h = r["host_apply"]
    med, cpu = h["median_s"], h["median_cpu_s"]
    size = sum(v["uncompressed"] for v in h["image_bytes"].values())
    lines = [f"1. Host apply of 2.0.0 into slot B ({B.fmt_mib(size)} uncompressed: root, boot, hash), "
             f"median of {len(h['runs']['agent'])}", ""]
    ratios = h["ratios"]
    rows = [
        ["agent process: interpreter start, imports, refresh + prepare", B.fmt_s(med["agent_process"], 2), "", "1.00"],
        ["  in process: refresh + prepare", B.fmt_s(med["agent"], 2), B.fmt_s(cpu["agent"], 2) + " + zstd "
         + B.fmt_s(cpu["agent_zstd"], 2) + " + server " + B.fmt_s(cpu["server"], 2), ""],
        ["    of which refresh", B.fmt_s(med["agent_refresh"], 2), "", ""],
        ["    of which prepare", B.fmt_s(med["agent_prepare"], 2), "", ""],
        ["floor: zstd -dc | tee >(sha256sum) | dd", B.fmt_s(med["floor"], 2), B.fmt_s(cpu["floor"], 2),
         B.fmt_ratio(ratios["agent process/floor"])],
        ["floor, raw: cat image | tee >(sha256sum) | dd", B.fmt_s(med["floor_raw"], 2), B.fmt_s(cpu["floor_raw"], 2),
         B.fmt_ratio(ratios["agent process/floor_raw"])],
        ["floor, HTTP: curl | zstd -dc | tee | dd", B.fmt_s(med["floor_http"], 2), B.fmt_s(cpu["floor_http"], 2),
         B.fmt_ratio(ratios["agent process/floor_http"])],
        ["floor, openssl: zstd -dc | tee >(openssl sha256) | dd", B.fmt_s(med["floor_openssl"], 2),
         B.fmt_s(cpu["floor_openssl"], 2), B.fmt_ratio(ratios["agent process/floor_openssl"])],
    ]
    lines.append(B.table(rows, ["", "wall", "CPU", "agent process / this"]))
    t = h["target"]
    lines.append(f"target: the agent process <= {t['ratio_max']}x the tightest floor ({t['floor']}), whole "
                 f"processes on both sides: {B.fmt_ratio(t['ratio'])}x -> {'ok' if t['met'] else 'MISSED'}")
    lines.append("")
    rows = [[label, B.fmt_s(p["wall_s"], 2), B.fmt_s(p["agent_cpu_s"], 2), B.fmt_s(p["zstd_cpu_s"], 2)]
            for label, p in h["median_phases"].items()]
    rows.append(["rest (status file, grubenv reads, choosing)", B.fmt_s(h["median_rest_s"], 2), "", ""])
    lines.append(B.table(rows, ["agent phase (median)", "wall", "agent CPU", "zstd CPU"]))
    lines.append("")
    lines.append(B.table([[k, B.fmt_s(v, 2)] for k, v in h["attribution_s"].items()], ["alone, same bytes", "time"]))
    rss = h["peak_rss_bytes"]
    lines.append(f"peak RSS (VmHWM): agent {B.fmt_mib(rss['agent'])} (after imports "
                 f"{B.fmt_mib(rss['agent_after_imports'])}); its zstd -d child {B.fmt_mib(h['zstd_peak_rss_bytes'])}")
    p = r["publish"]
    lines += ["", f"2. Publish 2.0.0 ({B.fmt_mib(p['bytes'])} of artifacts), median of {len(p['runs_s']['cp'])}", ""]
    cp = p["median_s"]["cp"]
    lines.append(B.table([[k, B.fmt_s(v, 3), B.fmt_ratio(B.ratio(v, cp))] for k, v in p["median_s"].items()],
                         ["", "wall", "/ cp"]))
    lines.append(f"kiln repo add / (cp + sha256sum): {B.fmt_ratio(p['ratios']['kiln/(cp + sha256sum)'])}")
    g = r["guest"]
    n_ok = len([x for x in g["runs"] if "error" not in x])
    lines += ["", f"3. Guest (TCG, 2 vCPUs): kiln update apply --reboot to ready on 2.0.0, "
              f"median of {n_ok} of {len(g['runs'])} runs", ""]
    rows = []
    for k, v in g["median_update_s"].items():
        rows.append([k, B.fmt_s(v), B.fmt_s(g["median_reboot_s"].get(k))])
    rows.append(["first boot of 1.0.0 (QEMU start to ready)", "", B.fmt_s(g["median_first_boot_s"])])
    lines.append(B.table(rows, ["", "update", "plain reboot"]))
    lines.append(f"update / plain reboot: {B.fmt_ratio(g['ratios']['update/plain reboot'])}; "
                 f"update / first boot: {B.fmt_ratio(g['ratios']['update/first boot'])}")
    lines += ["", B.table([[k, B.fmt_s(v, 2)] for k, v in g["median_probes_s"].items()],
                          ["in the guest after the update (idle)", "time"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--agent"]:  # child mode: the agent, timed from inside
        agent_child(json.loads(args_in[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3, help="host apply and publish runs (default 3)")
    ap.add_argument("--guest-runs", type=int, default=2, help="guest update runs (default 2; 0 skips them)")
    ap.add_argument("--reuse-builds", action="store_true", help="boot the images in bench/.cache/update again")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args(args_in)
    if os.geteuid() != 0:
        ap.error("run as root (kiln build)")
    info = B.machine()
    busy = B.other_work(warn=True)
    t0 = time.monotonic()
    bench_repo, port, releases, build_info = builds(args.reuse_builds)
    variant = build_info["variant"]
    with tempfile.TemporaryDirectory(prefix="kiln-bench-update-") as tmp:
        work = Path(tmp)
        host = host_apply(releases["1.0.0", False], releases["2.0.0", False], bench_repo, work, args.runs, variant)
        pub = publish_time(releases["2.0.0", False], work, args.runs)
        vms = guest(releases["1.0.0", True], releases["2.0.0", True], bench_repo, port, work, args.guest_runs)
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "benchmark": "update",
        "machine": info,
        "other_work_at_start": busy,
        "source": B.git_source(),
        "wall_seconds": round(time.monotonic() - t0, 1),
        "builds": build_info,
        "host_apply": host,
        "publish": pub,
        "guest": vms,
    }
    B.emit("update", result, report(result), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
