"""Run a Kiln disk image in QEMU with OVMF, on a copy-on-write overlay.

The original image is never written: QEMU boots a qcow2 overlay backed by it (or, for tests
that need to inspect the disk afterwards, a sparse raw copy). TCG is the default since
KVM is often absent or unusable; KVM is used only when it really works. QEMU runs in its
own process group so callers can always end it and everything it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO

from kiln.core.errors import KilnError
from kiln.core.run import run, which

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Secure Boot: the same 4 MiB layout, built with SMM so that only firmware code in system
# management mode may write the variables (the guest OS cannot rewrite db or turn it off).
OVMF_CODE_SECBOOT = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
READY_RE = re.compile(r"kiln: ready version=(\S+) variant=(\S+) slot=([AB])")
POWER_DOWN = "reboot: Power down"  # the guest kernel's last line before an ACPI power-off (KERN_EMERG)
HOST_SIGNAL = "qemu-system-x86_64: terminating on signal"  # QEMU's stderr (merged): SIGTERM/SIGINT exit 0


class SerialTimeout(KilnError):
    """`Vm.wait_for` saw no match on the serial console in time (the VM still runs)."""


class Ending(StrEnum):
    """How a VM ended, as a whole (a guest reboot under cold_reboot is not an ending)."""

    POWERED_OFF = "powered off"  # the guest powered off, by itself or at the power button
    REBOOTED = "rebooted"  # the guest reset while being powered off: it had shut down, so no next QEMU
    KILLED = "killed"  # kill(), or a signal sent to QEMU from the host
    FAILED = "failed"  # QEMU exited with an error


def after_exit(*, returncode: int, powered_off: bool, host_signal: bool, cold_reboot: bool,
               killed: bool, powering_off: bool) -> Ending | None:
    """What one QEMU's exit means for the VM: None to start the next QEMU (a guest reset).

    With -no-reboot QEMU exits 0 on a reset and on a power-off alike; the serial console
    tells them apart. Only a reset that nobody asked to stop starts a new QEMU: a failing
    QEMU (status != 0, e.g. a forwarded port in use) must not be relaunched forever.
    """
    if killed:
        return Ending.KILLED
    if returncode != 0:
        return Ending.KILLED if returncode < 0 else Ending.FAILED
    if host_signal:
        return Ending.KILLED
    if powered_off or not cold_reboot:  # without -no-reboot, QEMU exits 0 only at a power-off
        return Ending.POWERED_OFF
    if powering_off:
        return Ending.REBOOTED
    return None


_KVM: bool | None = None


def kvm_usable() -> bool:
    """True only if a KVM guest really starts here (an openable /dev/kvm is not enough:
    on some hosts QEMU aborts setting MSRs). Probed once, by running QEMU for 1.5 s."""
    global _KVM
    if _KVM is None:
        _KVM = False
        if os.access("/dev/kvm", os.R_OK | os.W_OK) and shutil.which("qemu-system-x86_64"):
            argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "64",
                    "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "none"]
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                proc.wait(timeout=1.5)
            except subprocess.TimeoutExpired:
                _KVM = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return _KVM


@dataclass(frozen=True)
class Forward:
    host_port: int
    guest_port: int

    @classmethod
    def parse(cls, spec: str) -> Forward:
        m = re.fullmatch(r"(\d{1,5}):(\d{1,5})", spec)
        if not m:
            raise KilnError(f"--forward '{spec}': expected HOSTPORT:GUESTPORT")
        return cls(int(m[1]), int(m[2]))


CONFIG_DRIVE = "user-data.img"


def make_config_drive(user_data: Path, image: Path) -> Path:
    """A 1 MiB vfat volume labelled CIDATA holding `user_data` as /user-data.toml.

    This is how a cloud hands a VM its user data without a metadata service (cloud-init's
    "NoCloud" drive); the host reads it in place at first boot, without mounting it.
    """
    if not user_data.is_file():
        raise KilnError(f"user data file {user_data} does not exist")
    if user_data.stat().st_size > 512 * 1024:
        raise KilnError(f"user data file {user_data} is larger than 512 KiB")
    image.unlink(missing_ok=True)
    run(["mkfs.vfat", "-C", "-n", "CIDATA", image, "1024"])
    run(["mcopy", "-i", image, user_data, "::/user-data.toml"], env={"MTOOLS_SKIP_CHECK": "1"})
    return image


@dataclass(frozen=True)
class VmConfig:
    image: Path
    workdir: Path  # overlay and firmware variables live here
    memory_mib: int = 1024
    cpus: int = 1
    forwards: tuple[Forward, ...] = ()
    accel: str = "auto"  # auto, tcg or kvm
    overlay: bool = True  # False: boot `image` itself (callers pass a copy they own)
    disk_size: int | None = None  # bytes; the overlay is made this big (a larger "cloud volume")
    extra_args: tuple[str, ...] = ()
    user_data: Path | None = None  # TOML; attached as a CIDATA config drive
    # A guest reboot ends this QEMU and starts a new one on the same disk and firmware
    # variables (-no-reboot): QEMU 7.2 under TCG sometimes hangs for good in a warm reset
    # (seen in the VM tests), and a cold start reaches GRUB faster anyway.
    cold_reboot: bool = False
    # An OVMF variables file with keys enrolled (kiln.secureboot.varstore): boot the Secure
    # Boot firmware with SMM on a copy of it. None: plain OVMF on a copy of the empty store.
    secure_boot_vars: Path | None = None

    def argv(self, disk: Path, vars_fd: Path, interactive: bool = False) -> list[str]:
        accel = self.accel
        if accel == "auto":
            accel = "kvm" if kvm_usable() else "tcg"
        fmt = "qcow2" if self.overlay else "raw"
        net = "user,model=virtio-net-pci" + "".join(
            f",hostfwd=tcp:127.0.0.1:{f.host_port}-:{f.guest_port}" for f in self.forwards
        )
        sb = self.secure_boot_vars is not None
        return [
            which("qemu-system-x86_64"),
            "-machine", "q35,smm=on" if sb else "q35", "-accel", accel, "-cpu", "max" if accel == "tcg" else "host",
            "-m", str(self.memory_mib), "-smp", str(self.cpus),
            "-nographic", "-no-user-config", "-nodefaults",
            "-serial", "mon:stdio" if interactive else "stdio", "-monitor", "none",
            "-qmp", f"unix:{self.workdir / 'qmp.sock'},server=on,wait=off",
            # The variable flash becomes writable only from SMM: without it the guest OS could rewrite db.
            *(["-global", "driver=cfi.pflash01,property=secure,value=on"] if sb else []),
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE_SECBOOT if sb else OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
            "-drive", f"if=virtio,format={fmt},file={disk},cache=unsafe" if self.overlay
            else f"if=virtio,format={fmt},file={disk}",
            "-nic", net,
            "-device", "virtio-rng-pci",
            *(["-drive", f"if=virtio,format=raw,readonly=on,file={self.workdir / CONFIG_DRIVE}"]
              if self.user_data else []),
            *(["-no-reboot"] if self.cold_reboot else []),
            *self.extra_args,
        ]


class Vm:
    """A guest under QEMU: one QEMU, or with cold_reboot the chain of QEMUs its reboots make.

    Serial output is collected by a thread and searchable with wait_for. The VM as a whole
    ends only when the guest powers off, kill() or shutdown() is called, or QEMU fails;
    `ending` then says which.
    """

    def __init__(
        self, cfg: VmConfig, serial_log: Path | None = None, echo: IO[str] | None = None, interactive: bool = False
    ) -> None:
        self.cfg = cfg
        self.interactive = interactive
        self.serial_log = serial_log
        self.echo = echo
        self.proc: subprocess.Popen[bytes] | None = None  # the QEMU running now (replaced at each relaunch)
        self._buf = ""
        self._pos = 0  # wait_for searches from here
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.started_at = 0.0
        self.boots: list[float] = []
        self._argv: list[str] = []
        self._stopping = False  # set by kill(): no relaunch after a reset from then on
        self._powering_off = False  # set by shutdown(): a reset ends the VM instead of relaunching
        self._launched_at = 0  # buffer offset where the current QEMU's output starts
        self.launches: list[tuple[int, float]] = []  # (buffer offset, monotonic time) of each QEMU start
        self.relaunches = 0
        self.ending: Ending | None = None  # set once the last QEMU has exited and its output is read
        self.stamps: list[tuple[int, float]] = []  # (buffer offset, monotonic time) of each chunk read

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Vm:
        code = OVMF_CODE if self.cfg.secure_boot_vars is None else OVMF_CODE_SECBOOT
        if not code.is_file():
            raise KilnError(f"UEFI firmware {code} is missing", hint="apt-get install ovmf")
        if self.cfg.secure_boot_vars is not None and not self.cfg.secure_boot_vars.is_file():
            raise KilnError(f"Secure Boot variables {self.cfg.secure_boot_vars} do not exist",
                            hint="build the image with 'kiln build --keys DIR'")
        if not self.cfg.image.is_file():
            raise KilnError(f"disk image {self.cfg.image} does not exist")
        if self.interactive and self.cfg.cold_reboot:  # the relaunch needs the console's end-of-file
            raise KilnError("cold_reboot needs a VM whose console Kiln reads (not an interactive one)")
        self.cfg.workdir.mkdir(parents=True, exist_ok=True)
        vars_fd = self.cfg.workdir / "OVMF_VARS.fd"  # the firmware writes here; never the original
        shutil.copy(self.cfg.secure_boot_vars or OVMF_VARS, vars_fd)
        disk = self.cfg.image
        if self.cfg.overlay:
            disk = self.cfg.workdir / "overlay.qcow2"
            disk.unlink(missing_ok=True)
            size = [str(self.cfg.disk_size)] if self.cfg.disk_size else []
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", self.cfg.image.resolve(), disk, *size])
        if self.cfg.user_data is not None:
            make_config_drive(self.cfg.user_data, self.cfg.workdir / CONFIG_DRIVE)
        argv = self.cfg.argv(disk, vars_fd, self.interactive)
        if self.interactive:  # the terminal is QEMU's: Ctrl-A X quits, Ctrl-A C is the monitor
            self._argv = argv
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(self._argv, start_new_session=False)
            return self
        return self.start_argv(argv)

    def start_argv(self, argv: Sequence[str]) -> Vm:
        """Run `argv` as this VM's QEMU (again after each guest reset); start() builds it
        from the config. The tests pass a stand-in to check the relaunch logic without a guest."""
        self._argv = list(argv)
        self.started_at = time.monotonic()
        self._launch()
        self._reader = threading.Thread(target=self._read, name="qemu-serial", daemon=True)
        self._reader.start()
        return self

    def _launch(self) -> None:
        """Start one QEMU (before the reader runs, or with self._cond held)."""
        self._launched_at = len(self._buf)
        self.launches.append((self._launched_at, time.monotonic()))
        self.proc = subprocess.Popen(
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _next(self) -> bool:
        """The current QEMU's output has ended: start the next one if the guest reset (see
        after_exit), else record how the VM ended. Returns whether a QEMU runs again."""
        assert self.proc is not None
        returncode = self.proc.wait()  # its stdout is at end-of-file: it is exiting (not under the lock)
        with self._cond:
            out = self._buf[self._launched_at:]
            ending = after_exit(returncode=returncode, powered_off=POWER_DOWN in out, host_signal=HOST_SIGNAL in out,
                                cold_reboot=self.cfg.cold_reboot, killed=self._stopping,
                                powering_off=self._powering_off)
            if ending is not None:
                self.ending = ending
                return False
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            self._launch()
            self.relaunches += 1
            return True

    def _read(self) -> None:
        log = open(self.serial_log, "a", buffering=1, errors="replace") if self.serial_log else None  # noqa: SIM115
        try:
            while True:
                assert self.proc is not None and self.proc.stdout is not None
                fd = self.proc.stdout.fileno()
                while chunk := os.read(fd, 4096):
                    text = chunk.decode(errors="replace").replace("\r", "")
                    if log:
                        log.write(text)
                    if self.echo:
                        self.echo.write(text)
                        self.echo.flush()
                    with self._cond:
                        self.stamps.append((len(self._buf), time.monotonic()))
                        self._buf += text
                        self._cond.notify_all()
                self.proc.stdout.close()
                if not self._next():
                    return
        finally:
            if log:
                log.close()
            with self._cond:
                if self.ending is None:  # the reader itself failed (e.g. the next QEMU could not start)
                    self.ending = Ending.FAILED
                self._cond.notify_all()

    @property
    def running(self) -> bool:
        """The VM is up: a QEMU runs, or the next one starts right after a guest reset."""
        if self._reader is None:
            return self.proc is not None and self.proc.poll() is None
        with self._cond:
            return self.ending is None

    def kill(self) -> None:
        """End the VM now: its QEMU's process group (only what we started), and no relaunch."""
        with self._cond:
            self._stopping = True
            proc = self.proc
        end_process_group(proc, None)
        end_process_group(self.proc, self._reader)  # the one started by a racing relaunch, if any
        if self._reader is None and self.proc is not None and self.proc.returncode is not None:
            self._ended_alone(self.proc.returncode)

    def shutdown(self, timeout: float = 90, press_every: float = 10) -> Ending:
        """Press the ACPI power button and wait for the VM to end; kill it after `timeout`.

        Returns how it ended: POWERED_OFF (or REBOOTED: it was already going down for a
        reboot) is clean. A press is lost while the guest is in firmware, GRUB or early
        boot (just after a reboot, before acpid runs), so it is repeated every
        `press_every` s, each time to the QEMU running then; and a guest reset from now on
        ends the VM rather than starting the next QEMU, so a reboot is never waited out
        and then taken for the power-off.
        """
        with self._cond:
            self._powering_off = True
        deadline = time.monotonic() + timeout
        while self.running:
            with contextlib.suppress(OSError, ValueError):  # none listens between a reset and the next launch
                qmp(self.cfg.workdir / "qmp.sock", "system_powerdown")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(KilnError):
                self.wait_exit(min(press_every, left))
        self.kill()  # after a power-off this only reaps and joins the reader
        return self.ending or Ending.KILLED

    def wait_exit(self, timeout: float | None = None) -> int:
        """Wait for the VM as a whole to end (a guest reboot under cold_reboot does not);
        returns the last QEMU's exit status."""
        assert self.proc is not None
        if self._reader is None:  # interactive: one QEMU, on the terminal
            try:
                returncode = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise KilnError(f"QEMU did not exit within {timeout:.0f} s") from None
            self._ended_alone(returncode)
            return returncode
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.ending is None:
                left = 1.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise KilnError(f"the VM did not end within {timeout:.0f} s")
                self._cond.wait(min(left, 1.0))
            assert self.proc is not None
            status = self.proc.poll()
            return 1 if status is None else status  # None: the reader failed, QEMU still runs

    def _ended_alone(self, returncode: int) -> None:
        """Record how an interactive VM (one QEMU, no reader) ended."""
        if self.ending is None:
            self.ending = after_exit(returncode=returncode, powered_off=False, host_signal=False,
                                     cold_reboot=False, killed=False, powering_off=self._powering_off)

    # ---------------------------------------------------------------- serial console
    @property
    def output(self) -> str:
        with self._cond:
            return self._buf

    def time_at(self, offset: int) -> float:
        """When the serial output at `offset` arrived (monotonic seconds): the console's
        timestamps, taken on this side."""
        import bisect

        with self._cond:
            i = bisect.bisect_right(self.stamps, (offset, float("inf"))) - 1
            return self.stamps[max(i, 0)][1] if self.stamps else 0.0

    def mark(self) -> int:
        """Only output after this point counts for the next wait_for."""
        with self._cond:
            self._pos = len(self._buf)
            return self._pos

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until `pattern` appears in serial output after the last match/mark."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf, self._pos)
                if m:
                    self._pos = m.end()
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or self._over():
                    tail = self._buf[-3000:]
                    what = f"waiting for {rx.pattern!r} on the serial console; last output:\n{tail}"
                    if left <= 0:
                        raise SerialTimeout(f"timed out {what}")
                    raise KilnError(f"the VM ended ({self.ending}) {what}")
                self._cond.wait(min(left, 1.0))

    def _over(self) -> bool:
        """No more output will come: the VM ended and its reader read everything."""
        if self._reader is None:
            return not self.running
        return self.ending is not None

    def watch(self, pattern: str | re.Pattern[str]) -> Iterator[re.Match[str]]:
        """Every later match of `pattern` on the serial console, across guest reboots,
        until the VM ends (then the iteration stops)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        while True:
            with self._cond:
                while not (m := rx.search(self._buf, self._pos)):
                    if self._over():
                        return
                    self._cond.wait(1.0)
                self._pos = m.end()
            yield m

    def launched_at(self, offset: int) -> float:
        """When the QEMU that printed the output at `offset` was started (monotonic seconds)."""
        with self._cond:
            return max((t for start, t in self.launches if start <= offset), default=self.started_at)

    def wait_ready(self, timeout: float = 180) -> re.Match[str]:
        self._shell_ok = False
        return self.wait_for(READY_RE, timeout)

    def send(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    # ---------------------------------------------------------------- debug shell
    _seq = 0
    _shell_ok = False

    def wait_shell(self, timeout: float = 60) -> None:
        """Poke the debug shell until it answers (it starts after the ready line, and a
        starting shell flushes whatever was typed before it)."""
        deadline = time.monotonic() + timeout
        while True:
            Vm._seq += 1
            self.mark()
            self.send(f"\nstty -echo; echo KP$((0+{Vm._seq}))K\n")
            try:
                self.wait_for(rf"KP{Vm._seq}K\n", min(3.0, max(0.1, deadline - time.monotonic())))
                self._shell_ok = True
                return
            except KilnError:
                if time.monotonic() > deadline:
                    raise

    def sh(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run a command in the debug-console root shell; returns (exit status, output).

        Only images built with --debug-console have that shell. The end marker is computed
        by the shell so the echoed command line never matches it.
        """
        if not self._shell_ok:
            self.wait_shell()
        Vm._seq += 1
        n = Vm._seq
        self.mark()
        self.send(f"echo KS$((0+{n}))K; {command}; echo KE$((0+{n}))K $?\n")
        start = self.wait_for(rf"KS{n}K\n", timeout)
        end = self.wait_for(rf"KE{n}K (\d+)", timeout)
        out = self.output[start.end():end.start()]
        return int(end.group(1)), out

    def check(self, command: str, timeout: float = 60) -> str:
        status, out = self.sh(command, timeout)
        if status != 0:
            raise KilnError(f"guest command failed ({status}): {command}\n{out}")
        return out


@contextlib.contextmanager
def booted(cfg: VmConfig, serial_log: Path | None = None, echo: IO[str] | None = None) -> Iterator[Vm]:
    vm = Vm(cfg, serial_log, echo).start()
    try:
        yield vm
    finally:
        vm.kill()


def end_process_group(proc: subprocess.Popen[bytes] | None, reader: threading.Thread | None = None) -> None:
    """SIGKILL the process group a QEMU was started in (start_new_session), reap it and
    let its serial reader drain. Only ever used on processes this program started."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    if reader is not None:
        reader.join(timeout=5)


def qmp(sock_path: Path, command: str, timeout: float = 5) -> dict[str, object]:
    """Send one QMP command to a running QEMU and return its reply."""
    import json
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                reply: dict[str, object] = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
        return reply


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_forwards(specs: Sequence[str]) -> tuple[Forward, ...]:
    return tuple(Forward.parse(s) for s in specs)


__all__ = [
    "READY_RE", "Ending", "Forward", "Vm", "VmConfig", "after_exit", "booted", "end_process_group", "free_port",
    "kvm_usable", "parse_forwards", "qmp",
]
