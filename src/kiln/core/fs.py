"""Durable file operations: write to a temporary path, fsync, rename, fsync the directory.

Used for every file whose half-written state would hurt: build outputs, grubenv copies,
manifests. Pure stdlib so the in-image code can use it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (and `path`): a tree written without
    fsync (a copy, a migration) can otherwise come back from a power cut as empty files
    even though the rename that published it survived (ext4 delayed allocation)."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            if os.path.islink(os.path.join(dirpath, name)):
                continue  # a link is an entry in its directory, synced with it
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing): one holder at a time across
    threads and processes, since each call opens its own file description."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    path = Path(path)
    # Not tempfile.mkstemp: importing tempfile (random, shutil, bz2, lzma) costs ~1 s at boot
    # under emulation, and this runs on the boot path. O_EXCL gives the same guarantee.
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes `final` only if the block succeeds.

    An existing `final` is replaced whole; on error the partial directory is removed and
    whatever was at `final` before is left as it was.
    """
    import shutil
    import tempfile

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    try:
        yield tmp
        for dirpath, _dirs, files in os.walk(tmp):
            for name in files:
                p = Path(dirpath, name)
                if p.is_file() and not p.is_symlink():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
