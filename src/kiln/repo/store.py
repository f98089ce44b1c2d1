"""Target files on disk: staged next to their final place, moved in only when the metadata
that lists them is ready.

`Staging` copies each file into `DIR/targets/.stage-…` while hashing it, so the bytes that
get published are the bytes that were checked (a file changing under us is caught).
`commit()` renames every staged file to `<sha256>.<name>`; leaving the `with` block without
committing deletes them. Staged names start with a dot, which the server never serves.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from kiln.core.errors import KilnError
from kiln.core.fs import fsync_dir
from kiln.repo.metadata import NAME

if TYPE_CHECKING:
    from tuf.api.metadata import TargetFile

CHUNK = 1 << 20


@dataclass(frozen=True)
class Staged:
    name: str
    tmp: Path
    length: int
    sha256: str


class Staging:
    def __init__(self, targets_dir: Path) -> None:
        self.dir = targets_dir
        self.staged: list[Staged] = []

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.discard()

    def _tmp(self, name: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f".stage-{os.getpid()}-{os.urandom(4).hex()}-{name}"

    def add_file(self, name: str, src: Path, *, size: int | None = None, sha256: str | None = None) -> Staged:
        """Copy `src` in as target `name`; with `size`/`sha256`, refuse a file that differs."""
        if not NAME.fullmatch(name):
            raise KilnError(f"target name '{name}' is not a plain file name (letters, digits, . _ + -)")
        tmp = self._tmp(name)
        digest = hashlib.sha256()
        length = 0
        try:
            with src.open("rb") as f, open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as out:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    length += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise KilnError(f"{src}: cannot read: {e.strerror}") from None
        item = Staged(name, tmp, length, digest.hexdigest())
        self.staged.append(item)
        if size is not None and length != size:
            raise KilnError(f"{src}: {length} bytes, but its manifest says {size}")
        if sha256 is not None and item.sha256 != sha256:
            raise KilnError(f"{src}: sha256 {item.sha256}, but its manifest says {sha256}")
        return item

    def add_bytes(self, name: str, data: bytes) -> Staged:
        tmp = self._tmp(name)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        item = Staged(name, tmp, len(data), hashlib.sha256(data).hexdigest())
        self.staged.append(item)
        return item

    def commit(self) -> None:
        for item in self.staged:
            os.chmod(item.tmp, 0o644)
            os.replace(item.tmp, self.dir / f"{item.sha256}.{item.name}")
        if self.staged:
            fsync_dir(self.dir)
        self.staged = []

    def discard(self) -> None:
        for item in self.staged:
            with contextlib.suppress(FileNotFoundError):
                item.tmp.unlink()
        self.staged = []


def target_file(item: Staged) -> TargetFile:
    from tuf.api.metadata import TargetFile

    return TargetFile(item.length, {"sha256": item.sha256}, item.name)
