"""The one gateway through which Kiln starts other programs.

Centralising it gives one place for logging, for turning a missing tool into a clear error
with the Debian package that provides it, and for surfacing a failed command's stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tty
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from kiln.core.errors import KilnError

log = logging.getLogger("kiln.run")

# Which Debian package provides each external tool the toolkit uses (for hints).
TOOL_PACKAGES: dict[str, str] = {
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "mkfs.erofs": "erofs-utils",
    "fsck.erofs": "erofs-utils",
    "veritysetup": "cryptsetup-bin",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mdel": "mtools",
    "gpgv": "gpgv",
    "mkfs.ext4": "e2fsprogs",
    "grub-mkimage": "grub-common",
    "grub-editenv": "grub-common",
    "grub-emu": "grub-emu",
    "unshare": "util-linux",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "zstd": "zstd",
    "depmod": "kmod",
    "readelf": "binutils",
    "sgdisk": "gdisk",
    "chroot": "coreutils",
    "cp": "coreutils",
    "setsid": "util-linux",
    "partx": "util-linux",
    "resize2fs": "e2fsprogs",
    "mke2fs": "e2fsprogs",
    "systemctl": "systemd",
    "journalctl": "systemd",
    "genisoimage": "genisoimage",
    "busybox": "busybox-static",
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "etcd": "etcd-server",
    "etcdctl": "etcd-client",
    "python3": "python3-minimal",
    "sbsign": "sbsigntool",
    "sbverify": "sbsigntool",
    "faketime": "faketime",
}

# When set (by the test suite), every program resolved or started here is appended to
# this file: tests/toolcheck.py checks that `make setup` installs each one.
TOOL_LOG_ENV = "KILN_TOOL_LOG"


def _note(tool: str, found: str) -> None:
    log_path = os.environ.get(TOOL_LOG_ENV)
    if not log_path:
        return
    with contextlib.suppress(OSError):
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{tool}\t{found}\n".encode())  # one small O_APPEND write: whole lines
        finally:
            os.close(fd)


class CommandError(KilnError):
    """A command Kiln ran exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        super().__init__(
            f"command failed (exit {returncode}): {shlex.join(argv)}" + (f"\n{tail}" if tail else "")
        )
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


def which(tool: str) -> str:
    found = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    _note(tool, found or "")
    if found is None:
        pkg = TOOL_PACKAGES.get(tool)
        raise KilnError(
            f"required tool '{tool}' is not installed",
            hint=f"apt-get install {pkg}" if pkg else "run 'make setup'",
        )
    return found


def _prepare(argv: Sequence[str | Path], env: Mapping[str, str] | None, how: str) -> tuple[list[str], dict[str, str]]:
    """The argv with its program found on PATH (or a clear error naming its package), and the
    environment: ours, C.UTF-8 unless set, plus `env`."""
    args = [str(a) for a in argv]
    if "/" in args[0]:
        _note(args[0], args[0])
    else:
        args[0] = which(args[0])
    full_env = dict(os.environ)
    full_env.setdefault("LC_ALL", "C.UTF-8")
    if env:
        full_env.update(env)
    log.debug("%s: %s", how, shlex.join(args))
    return args, full_env


def run(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    capture: bool = True,
    check: bool = True,
    timeout: float | None = None,
    tty_input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command; raise CommandError (with its stderr) when it fails and `check` is set.

    A command still running after `timeout` seconds is killed, with everything it started
    (it runs in its own session), and reported as failed. `tty_input` is typed into a
    pseudo-terminal given as stdin: for programs that read a secret only from a terminal
    (so it never appears on their command line).
    """
    args, full_env = _prepare(argv, env, "run")
    master = slave = -1
    if tty_input is not None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no 4095-byte canonical line limit, no echo back to us
        os.write(master, tty_input)  # waits in the terminal's input queue until read
    try:
        with subprocess.Popen(
            args,
            cwd=cwd,
            env=full_env,
            stdin=slave if slave >= 0 else subprocess.PIPE if input is not None else None,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            start_new_session=timeout is not None,
        ) as popen:
            try:
                out, err = popen.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                try:  # bounded too: a process that left the session may hold the pipes open
                    out, err = popen.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    out, err = b"", b"(its output pipes stayed open after it was killed)"
                raise CommandError(
                    args, -9, f"timed out after {timeout:g} s\n" + (err or b"").decode(errors="replace")
                ) from None
        proc = subprocess.CompletedProcess(args, popen.returncode, out, err)
    except (FileNotFoundError, PermissionError) as e:
        raise CommandError(args, 127, str(e)) from None
    finally:
        for fd in (slave, master):
            if fd >= 0:
                os.close(fd)
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, (proc.stderr or b"").decode(errors="replace"))
    return proc


class Child:
    """A long-lived child started by `spawn`: the leader of its own process group, so a stop
    reaches everything it started (a shell's children, a tool's helpers) and nothing else."""

    def __init__(self, popen: subprocess.Popen[bytes], grace: float) -> None:
        self.popen = popen
        self.grace = grace

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None when it still runs after `timeout` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, sig: int) -> None:
        """`sig` to the whole group (the child may be gone already: not an error)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, grace: float | None = None) -> int:
        """SIGTERM to the group, SIGKILL to it after the grace period; returns the exit status.

        The group is killed even when the leader exited by itself: a helper it left behind
        would otherwise hold the child's pipes (and a port, a lock) open.
        """
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            if self.wait(self.grace if grace is None else grace) is None:
                log.debug("spawn: %d outlived its grace period: SIGKILL", self.popen.pid)
        self.signal(signal.SIGKILL)
        return self.popen.wait()


@contextlib.contextmanager
def spawn(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    stderr: int | None = None,
    grace: float = 10.0,
) -> Iterator[Child]:
    """Start a long-lived child in its own process group; stop it (SIGTERM, then SIGKILL after
    `grace` seconds, to the whole group) when the block ends, whichever way it ends.

    A missing tool is the same clear `KilnError` as in `run`. stdin, stdout and stderr are
    file descriptors (or None: inherited; stdin defaults to /dev/null, so a child never
    competes with us for a terminal).
    """
    args, full_env = _prepare(argv, env, "spawn")
    try:
        popen = subprocess.Popen(args, cwd=cwd, env=full_env, stdin=stdin, stdout=stdout, stderr=stderr,
                                 start_new_session=True)
    except (FileNotFoundError, PermissionError) as e:
        raise CommandError(args, 127, str(e)) from None
    child = Child(popen, grace)
    try:
        yield child
    finally:
        child.stop()
