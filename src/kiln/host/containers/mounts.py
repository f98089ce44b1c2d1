"""Workload bind mounts: each source found under /local without following a symlink, then pinned.

A workload can write into a directory it shares through another mount and plant a symlink
there; a source path that crossed it would bind whatever the link points at (the host's `/`
or `/etc`), and creating a missing source through it would make directories anywhere. So a
source is opened one component at a time below the /local directory with O_NOFOLLOW (a
missing directory is made the same way, with mkdirat), and any symlink on the way is refused.

The object found is then bind-mounted, through its file descriptor (/proc/self/fd/N, which
names that exact object, not a path), onto a staging path under /run that only root can
reach; ctr and runc are given the staging path. A symlink planted after the check changes
nothing. The manager releases the staging mounts when the container's run ends.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import ctypes.util
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from kiln.core.errors import KilnError

LOCAL = Path("/local")
STAGING = Path("/run/kiln/mounts")

MOUNT_SYNTAX = ',"='  # characters ctr's --mount syntax gives meaning to (the model refuses them too)
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MNT_DETACH = 2


class UnsafeMount(KilnError):
    """A mount source that leaves /local or crosses a symlink."""


def open_beneath(root: Path, path: str, *, create: bool = True) -> int:
    """An O_PATH descriptor of `path` (absolute, under `root`), reached without any symlink.

    Missing components are created as directories (0755) when `create` is set. Raises
    UnsafeMount naming the component that is a symlink (or not a directory on the way).
    """
    rel = Path(path).relative_to(root) if Path(path) != root else Path()
    parts = [p for p in rel.parts if p not in ("", "/")]
    if any(p in (".", "..") for p in parts):
        raise UnsafeMount(f"{path}: '.' and '..' are not allowed in a mount source")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    walked = root
    try:
        for i, name in enumerate(parts):
            walked = walked / name
            last = i == len(parts) - 1
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
            try:
                nfd = os.open(name, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise UnsafeMount(f"{path}: {walked} does not exist") from None
                with contextlib.suppress(FileExistsError):  # made meanwhile: opened below all the same
                    os.mkdir(name, 0o755, dir_fd=fd)
                try:
                    nfd = os.open(name, flags | os.O_DIRECTORY, dir_fd=fd)
                except (NotADirectoryError, OSError) as e:
                    raise UnsafeMount(f"{path}: {walked} changed while it was being made: {e.strerror}") from None
            except (NotADirectoryError, OSError) as e:
                raise UnsafeMount(f"{path}: {walked} is a symlink or not a directory ({e.strerror}); "
                                  "mount sources are reached without following links") from None
            os.close(fd)
            fd = nfd
            if last and stat.S_ISLNK(os.fstat(fd).st_mode):
                raise UnsafeMount(f"{path}: {walked} is a symlink; mount sources are reached without following links")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount_fd(fd: int, target: Path) -> None:
    libc = _libc()
    src = f"/proc/self/fd/{fd}".encode()
    if libc.mount(src, str(target).encode(), None, _MS_BIND | _MS_REC, None) != 0:
        err = ctypes.get_errno()
        raise KilnError(f"cannot pin the mount source at {target}: {os.strerror(err)}")


def _unmount(target: Path) -> None:
    if _libc().umount2(str(target).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: already gone
            raise KilnError(f"cannot release the staged mount {target}: {os.strerror(err)}")


def release(cid: str, staging: Path = STAGING) -> None:
    """Unmount and remove the staged sources of container `cid` (left by an earlier run too)."""
    d = staging / cid
    if not d.is_dir():
        return
    for entry in sorted(d.iterdir()):
        _unmount(entry)
        if entry.is_dir() and not entry.is_symlink():
            entry.rmdir()
        else:
            entry.unlink(missing_ok=True)
    shutil.rmtree(d, ignore_errors=True)


def stage(cid: str, sources: Sequence[str], root: Path = LOCAL, staging: Path = STAGING) -> list[Path]:
    """Each source resolved under `root` and pinned at a private path; returns those paths."""
    release(cid, staging)
    d = staging / cid
    d.mkdir(parents=True, mode=0o700)
    os.chmod(staging, 0o700)
    out: list[Path] = []
    try:
        for i, source in enumerate(sources):
            fd = open_beneath(root, source)
            try:
                target = d / str(i)
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    target.mkdir(mode=0o700)
                else:
                    target.touch(mode=0o600)
                _mount_fd(fd, target)
            finally:
                os.close(fd)
            out.append(target)
    except BaseException:
        release(cid, staging)
        raise
    return out


def mount_arg(source: Path, destination: str, read_only: bool) -> str:
    """The `--mount` value for one bind, checked by parsing it back the way ctr does (CSV of
    key=value): exactly the source and destination given, whatever characters they hold."""
    mode = "ro" if read_only else "rw"
    arg = f"type=bind,src={source},dst={destination},options=rbind:{mode}"
    fields = next(csv.reader([arg]))
    pairs = [f.split("=", 1) for f in fields]
    if any(c in f"{source}{destination}" for c in MOUNT_SYNTAX) \
            or [p[0] for p in pairs] != ["type", "src", "dst", "options"] or any(len(p) != 2 for p in pairs) \
            or pairs[1][1] != str(source) or pairs[2][1] != destination:
        raise UnsafeMount(f"mount {source} -> {destination}: the paths would change the mount's fields")
    return arg
