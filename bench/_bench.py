"""Helpers shared by Kiln's benchmarks: machine facts, timing, tables, serial timestamps,
safe clean-up, a newc cpio writer, QEMU process handling and timed boots of Kiln images.

Benchmarks print ratios measured side by side in one run; every number they print is also
written to a JSON file under bench/results/ together with the machine it was measured on.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import stat
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.vm.qemu import Ending, Vm, VmConfig, end_process_group

if TYPE_CHECKING:
    from kiln.variant import Variant

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
CACHE = BENCH / ".cache"
MiB = 1024 * 1024


# ------------------------------------------------------------------ output
def log(message: str) -> None:
    """Progress goes to stderr so `--json` output on stdout stays parseable."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def fmt_s(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_mib(value: int | float | None) -> str:
    return "-" if value is None else f"{value / MiB:.1f} MiB"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# ------------------------------------------------------------------ results: every run kept
# bench/results/<name>.json is a JSON list of runs, oldest first. One run:
#   {"benchmark": name, "date": ISO UTC, "commit": full hash (git rev-parse HEAD when the
#    benchmark started), "uncommitted": `git status --porcelain` of src/ variants/ bench/,
#    "uncommitted_diff_sha256": sha256 of `git diff HEAD` there (null when clean),
#    "machine": machine(), "load": {"start": [1, 5, 15 min], "end": [...]},
#    "argv": the benchmark's command line, "note": null or how the run came to be here,
#    "result": what the benchmark measured}
# bench/report.py renders docs/benchmarks.md from these lists.
RUN_KEYS = ("benchmark", "date", "commit", "uncommitted", "uncommitted_diff_sha256", "machine", "load",
            "argv", "note", "result")


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    return out.stdout.strip() if out.returncode == 0 else ""


def source_state() -> dict[str, Any]:
    """The commit checked out and what differs from it where the measured code lives."""
    paths = ("src", "variants", "bench")
    diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--", *paths], capture_output=True,
                          check=False).stdout
    status = _git("status", "--porcelain", "--untracked-files=all", "--", *paths).splitlines()
    status = [line for line in status if not line[3:].startswith("bench/results/")]
    return {"commit": _git("rev-parse", "HEAD") or None, "uncommitted": status,
            "uncommitted_diff_sha256": hashlib.sha256(diff).hexdigest() if diff or status else None}


_source_at_start: dict[str, Any] | None = None


def source_at_start() -> dict[str, Any]:
    """source_state() when the benchmark started (its first machine() call): the code it measures."""
    global _source_at_start
    if _source_at_start is None:
        _source_at_start = source_state()
    return _source_at_start


def load_runs(name: str) -> list[dict[str, Any]]:
    """Every recorded run of benchmark `name` (oldest first); [] when there is none yet."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path.relative_to(REPO)} is not a list of runs (convert it with bench/report.py --convert)")
    return data


def legacy_run(name: str, data: dict[str, Any], note: str) -> dict[str, Any]:
    """A run record for a result file written before every run was kept (one run, one dict).

    Its commit is the one the benchmark recorded (`source.commit`, expanded by git), or null
    when it recorded none; `note` says where the file came from."""
    info = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    recorded = source.get("commit")
    commit = (_git("rev-parse", "--verify", "--quiet", f"{recorded}^{{commit}}") or recorded) if recorded else None
    uncommitted = source.get("uncommitted")
    return {
        "benchmark": name,
        "date": info.get("date"),
        "commit": commit,
        "uncommitted": uncommitted,
        "uncommitted_diff_sha256": None,
        "machine": info or None,
        "load": {"start": info.get("loadavg_at_start"), "end": info.get("loadavg_at_end")},
        "argv": None,
        "note": note,
        "result": {k: v for k, v in data.items() if k != "machine"},
    }


def new_run(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """A run record for `result`, measured now by this process."""
    info = result.get("machine") if isinstance(result.get("machine"), dict) else None
    info = dict(info) if info else machine()
    info.setdefault("loadavg_at_end", [round(x, 2) for x in os.getloadavg()])
    body = {k: v for k, v in result.items() if k != "machine"}
    return {
        "benchmark": name,
        "date": info.get("date") or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **source_at_start(),
        "machine": info,
        "load": {"start": info.get("loadavg_at_start"), "end": info.get("loadavg_at_end")},
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "note": None,
        "result": body,
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Append this run to bench/results/<name>.json (a list of every run; written whole to a
    temporary file, then renamed; a lock file keeps two benchmarks from losing a run)."""
    import fcntl

    RESULTS.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    with open(CACHE / f"results-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = load_runs(name)
        runs.append(new_run(name, data))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(runs, indent=1, sort_keys=False, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return path


def emit(name: str, result: dict[str, Any], report: str, as_json: bool) -> Path:
    """Write bench/results/<name>.json, then print it (`--json`) or the report and the machine."""
    path = write_result(name, result)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        info = result["machine"]
        print(report)
        print(f"\nmachine: {info['cpus']} x {info['cpu']}, load {info['loadavg_at_start']} -> "
              f"{info.get('loadavg_at_end')}; wrote {path.relative_to(REPO)}")
    return path


# ------------------------------------------------------------------ machine
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _tool_version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def machine() -> dict[str, Any]:
    """What the numbers were measured on (goes into every result file)."""
    import kiln

    source_at_start()
    virt = _tool_version(["systemd-detect-virt"])
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_mib": _mem_total() // MiB,
        "kernel": platform.release(),
        "virtualization": virt,
        "python": platform.python_version(),
        "qemu": _tool_version(["qemu-system-x86_64", "--version"]),
        "kiln": getattr(kiln, "__version__", None),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------ files
def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (from /proc/self/mountinfo), deepest first."""
    root = os.path.realpath(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4].encode().decode("unicode_escape")
        if mnt == root or mnt.startswith(root.rstrip("/") + "/"):
            found.append(mnt)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a mount (a debootstrap left /proc or /dev mounted)."""
    if not path.exists() and not path.is_symlink():
        return
    for mnt in mounts_under(path):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    left = mounts_under(path)
    if left:
        raise RuntimeError(f"refusing to delete {path}: still mounted: {left}")
    shutil.rmtree(path)


def tree_bytes(root: Path) -> int:
    """Sum of regular file sizes (hard links counted once), without following symlinks."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def run(
    argv: Sequence[str | Path],
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    quiet: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command; raise with its output tail if it fails."""
    args = [str(a) for a in argv]
    full_env = {**os.environ, "LC_ALL": "C.UTF-8", **(env or {})}
    proc = subprocess.run(
        args, capture_output=quiet, text=True, timeout=timeout, env=full_env, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-20:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(args)}\n{tail}")
    return proc


# ------------------------------------------------------------------ builds
def kiln_build(variant: Variant, cache: Path, out: Path, keys: Path | None = None) -> dict[str, Any]:
    """One `kiln build` (the library call the CLI makes) of `variant`
    into `out` with KILN_CACHE=cache; with `keys`, `kiln build --keys` (signed for Secure Boot)."""
    from kiln.build.pipeline import BuildOptions, build
    from kiln.core.progress import Progress

    saved = os.environ.get("KILN_CACHE")
    os.environ["KILN_CACHE"] = str(cache)
    try:
        t0 = time.monotonic()
        result = build(
            BuildOptions(variant, out, cache=cache, debug_console=False, keys=keys), Progress(quiet=True)
        )
        seconds = time.monotonic() - t0
    finally:
        if saved is None:
            os.environ.pop("KILN_CACHE", None)
        else:
            os.environ["KILN_CACHE"] = saved
    return {
        "seconds": round(seconds, 2),
        "sizes": result.sizes,
        "steps": {k: round(v, 2) for k, v in result.timings.items()},
        "cache_bytes": tree_bytes(cache),
    }


# ------------------------------------------------------------------ initramfs
@dataclass(frozen=True)
class CpioEntry:
    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def write_initramfs(out: Path, files: dict[str, tuple[int, bytes]], console: bool = True) -> int:
    """A gzip'd newc cpio holding `files` (path -> (permission bits, content)), their parent
    directories, /dev/console, /proc, /sys and /root. Returns the compressed size."""
    entries: dict[str, CpioEntry] = {}
    for d in ("dev", "proc", "sys", "root", "run", "tmp"):
        entries[d] = CpioEntry(d, stat.S_IFDIR | 0o755)
    if console:
        entries["dev/console"] = CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    for path, (perm, data) in files.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            entries.setdefault(d, CpioEntry(d, stat.S_IFDIR | 0o755))
        entries[path] = CpioEntry(path, stat.S_IFREG | perm, data)
    buf = io.BytesIO()
    for ino, e in enumerate(
        [*(entries[k] for k in sorted(entries)), CpioEntry("TRAILER!!!", 0)], start=1
    ):
        name = e.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (
            ino,
            e.mode,
            0,
            0,
            nlink,
            0,
            len(e.data),
            0,
            0,
            e.rdev[0],
            e.rdev[1],
            len(name),
            0,
        )
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + name
        buf.write(head + b"\0" * (-len(head) % 4))
        buf.write(e.data + b"\0" * (-len(e.data) % 4))
    with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(buf.getvalue())
    return out.stat().st_size


# ------------------------------------------------------------------ serial timestamps
ANSI_RE = re.compile(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1b[cM78]")


def clean(line: str) -> str:
    return ANSI_RE.sub("", line).replace("\x00", "").strip()


class SerialClock(io.StringIO):
    """A text sink that remembers when each piece of serial output arrived.

    Used as `Vm(echo=...)` for Kiln (the VM's reader thread calls write() as output
    arrives) and fed directly by `DirectVm` for the direct-kernel-boot systems. A match is
    timed by the arrival of its last character, so a marker that shares a line with
    earlier output (no newline in between) is still timed right. Times are reported
    relative to `t0`, the moment QEMU was started.
    """

    def __init__(self) -> None:
        super().__init__()
        self.t0 = 0.0
        self._text = ""
        self._ends: list[int] = []  # end offset of each chunk in _text
        self._times: list[float] = []  # and when it arrived (time.monotonic)
        self._lock = threading.Lock()

    def start(self, t0: float) -> None:
        self.t0 = t0

    def write(self, s: str) -> int:
        now = time.monotonic()
        with self._lock:
            self._text += s.replace("\r", "")
            self._ends.append(len(self._text))
            self._times.append(now)
        return len(s)

    def flush(self) -> None:
        pass

    def _at(self, offset: int) -> float:
        """Seconds since t0 at which the character at `offset` arrived."""
        i = bisect.bisect_right(self._ends, offset)
        return self._times[min(i, len(self._times) - 1)] - self.t0

    def first(self, pattern: str | re.Pattern[str], after: float | None = None) -> float | None:
        """Seconds from QEMU start until the first match of `pattern` had fully arrived;
        with `after`, the first match that arrived at or after that time (in seconds)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        with self._lock:
            for m in rx.finditer(self._text):
                t = self._at(max(m.end() - 1, 0))
                if after is None or t >= after:
                    return t
            return None

    def stamped(self) -> list[tuple[float, str]]:
        """Lines, each with the time its last character arrived, terminal escapes removed."""
        with self._lock:
            return [
                (self._at(m.end() - 1), clean(m.group(0)))
                for m in re.finditer(r"[^\n]*\n|[^\n]+$", self._text)
            ]

    def text(self) -> str:
        return "".join(f"{t:8.3f} {line}\n" for t, line in self.stamped())


@dataclass
class DirectVm:
    """QEMU started from an argv of our own (direct kernel boot), serial on stdout.

    QEMU gets its own process group, which `kill()` always ends."""

    argv: list[str]
    clock: SerialClock = field(default_factory=SerialClock)
    proc: subprocess.Popen[bytes] | None = None
    _reader: threading.Thread | None = None

    def start(self) -> DirectVm:
        t0 = time.monotonic()
        self.clock.start(t0)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 4096):
            self.clock.write(chunk.decode(errors="replace"))

    def wait_for(self, pattern: str, timeout: float) -> float:
        """Seconds from start to the first line matching `pattern`; raises on timeout/exit."""
        deadline = time.monotonic() + timeout
        while True:
            t = self.clock.first(pattern)
            if t is not None:
                return t
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} on the serial console within {timeout:.0f} s")
            if (
                self.proc is not None
                and self.proc.poll() is not None
                and not (self._reader and self._reader.is_alive())
            ):
                raise RuntimeError(f"QEMU exited ({self.proc.returncode}) before {pattern!r}")
            time.sleep(0.02)

    def kill(self) -> None:
        end_process_group(self.proc, self._reader)


@contextlib.contextmanager
def direct_vm(argv: list[str]) -> Iterator[DirectVm]:
    vm = DirectVm(argv).start()
    try:
        yield vm
    finally:
        vm.kill()


def git_source() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=False).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "src", "variants").splitlines()}


def other_work(warn: bool = False) -> list[str]:
    """QEMU or pytest processes running besides this benchmark (they share the 2 CPUs);
    `warn` says so on the log (at a benchmark's start)."""
    out = subprocess.run(["pgrep", "-af", "qemu-system-x86_64|pytest"], capture_output=True, text=True, check=False)
    busy = [line[:160] for line in out.stdout.splitlines() if str(os.getpid()) not in line.split()[:1]]
    if warn and busy:
        log(f"warning: other QEMU/pytest work is running; numbers will be slower: {busy}")
    return busy


# ------------------------------------------------------------------ timed boots of Kiln images
# Kiln's serial milestones (the quiet image prints only a few lines).
GRUB_RE = r"Welcome to GRUB"
SLOT_RE = r"kiln-grub: booting slot"
HANDOFF_RE = r"Booting in blind mode|\] Linux version"  # GRUB's last line, else the kernel's first
INIT_RE = r"kiln-init:"
KILN_BOOT_TIMEOUT = 420.0


def clean_workdir(path: Path) -> Path:
    remove_tree(path)
    path.mkdir(parents=True)
    return path


@dataclass
class Boot:
    """One timed boot: seconds from QEMU start to the marker, and the milestones on the way."""

    system: str
    cpus: int
    run: int
    marker_s: float | None = None
    milestones: dict[str, float | None] | None = None
    error: str | None = None
    loadavg: float = 0.0
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        ms = {k: None if v is None else round(v, 3) for k, v in (self.milestones or {}).items()}
        return {
            "system": self.system,
            "cpus": self.cpus,
            "run": self.run,
            "marker_s": None if self.marker_s is None else round(self.marker_s, 3),
            "milestones": ms,
            "error": self.error,
            "loadavg_1min": round(self.loadavg, 2),
            "note": self.note,
        }


def kiln_milestones(clock: SerialClock, ready: float | None) -> dict[str, float | None]:
    """Kiln's boot split at its serial milestones: OVMF until `Welcome to GRUB`, GRUB until its
    last line before the kernel runs (`Booting in blind mode`), then kernel to ready."""
    grub = clock.first(GRUB_RE)
    handoff = clock.first(HANDOFF_RE)
    return {
        "grub": grub,
        "grub_slot": clock.first(SLOT_RE),
        "kernel_handoff": handoff,
        "kernel_first_line": clock.first(r"\] Linux version"),
        "kiln_init": clock.first(INIT_RE),
        "ready": ready,
        "firmware_s": grub,
        "grub_s": None if grub is None or handoff is None else handoff - grub,
        "kernel_to_marker_s": None if handoff is None or ready is None else ready - handoff,
    }


def boot_vm(
    system: str,
    cfg: VmConfig,
    pattern: str | re.Pattern[str],
    cpus: int,
    run: int,
    log_path: Path,
    after: Callable[[Vm], str | None] | None = None,
    timeout: float = KILN_BOOT_TIMEOUT,
) -> tuple[Boot, SerialClock]:
    """Boot with kiln.vm.qemu.Vm, wait for `pattern`; `after` runs while the VM is up. The VM
    is always killed (its own process group) before this returns; the timed log is written."""
    b = Boot(system, cpus, run, loadavg=os.getloadavg()[0])
    clock = SerialClock()
    vm = Vm(cfg, echo=clock)
    try:
        vm.start()
        clock.start(vm.started_at)
        try:
            vm.wait_for(pattern, timeout)
            b.marker_s = clock.first(pattern)
            if b.marker_s is None:  # the reader saw it before the line was complete
                time.sleep(0.2)
                b.marker_s = clock.first(pattern) or time.monotonic() - vm.started_at
            if after is not None:
                b.note = after(vm)
        except Exception as e:  # a failed boot is a data point, not the end of the benchmark
            b.error = str(e).splitlines()[0]
    finally:
        vm.kill()
    log_path.write_text(clock.text())
    return b, clock


def power_off(vm: Vm) -> str:
    """Press the power button once the host has reported its status; say how it ended."""
    with contextlib.suppress(Exception):
        vm.wait_for(r"kiln: status ", 30)
    ending = vm.shutdown(timeout=180)
    return "clean power-off" if ending in (Ending.POWERED_OFF, Ending.REBOOTED) else "power-off timed out; killed"


def json_line(out: str) -> Any:
    """The last line of `out` that is a JSON object."""
    for line in reversed(out.splitlines()):
        if line.strip().startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError(f"no JSON line in the guest's output: {out[-500:]!r}")
