"""Datastore migrations (Bottlerocket's migrator): settings follow the OS version.

The datastore lives in `/var/lib/kiln/datastore/v<version>/` with `current` pointing at
the one in use. When the booted OS version differs from the datastore's, the migrations
the signed manifest lists between the two run in order (forward on an upgrade; on a
rollback the *newer* release's migrations run backward, which is why they are cached
before the upgrade). Each migration is an executable target run as

    MIGRATION --forward|--backward --source-datastore SRC --target-datastore DST

reading the version directory SRC (live/ and pending/) and writing a complete DST. Every
step writes a fresh copy; only when all succeed does `current` move (one rename), so a
failure or a power cut leaves the old datastore in use. A failed migration fails the
boot: the new version is never marked successful and GRUB falls back.

Before anything runs, the cached manifest and migrations are verified offline against
the cached TUF metadata, from the root baked into *this* image, as of the time they
were downloaded; the bytes executed are the bytes verified (a sealed memfd). A manifest
that lists nothing to run between the two versions is not verified (see
`_lists_migrations`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.core.fs import atomic_write, fsync_dir, sync_tree
from kiln.host.update.errors import UntrustedUpdate, UpdateError
from kiln.host.update.manifest import Manifest, ManifestError, Version

if TYPE_CHECKING:
    from kiln.host.update.trust import TrustedRepo

MIGRATION_MAX = 16 << 20
MANIFEST = "manifest.json"
TIMEOUT = 300


class MigrationFailed(UpdateError):
    """A migration exited non-zero or timed out; the datastore was left as it was."""


def cache(repo: TrustedRepo, manifest: Manifest, current: Version, target: Version, dest: Path) -> list[str]:
    """Download (verified) the migrations between `current` and `target`, the manifest
    and the metadata vouching for them into `dest`; returns the migration names."""
    try:
        names = manifest.migration_path(current, target)
    except ManifestError as e:
        raise UntrustedUpdate(f"signed manifest: {e}") from None
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        repo.save(name, dest / name, MIGRATION_MAX)
    repo.save(MANIFEST, dest / MANIFEST, 4 << 20)
    fresh = dest / ".metadata.new"
    repo.snapshot_metadata(fresh)
    sync_tree(fresh)
    if (dest / "metadata").exists():
        shutil.rmtree(dest / "metadata")
    fresh.rename(dest / "metadata")
    atomic_write(dest / "cache.json", json.dumps({"cached_at": time.time()}).encode() + b"\n")
    return names


@dataclass(frozen=True)
class Plan:
    source: Version
    target: Version
    migrations: dict[str, bytes]  # name -> verified executable, in order

    @property
    def direction(self) -> str:
        return "--forward" if self.target > self.source else "--backward"


def datastore_version(store_root: Path) -> Version | None:
    try:
        link = os.readlink(store_root / "current")
    except (FileNotFoundError, OSError):
        return None
    return Version.parse(link.removeprefix("v"), f"{store_root}/current -> {link}")


def plan(store_root: Path, os_version: Version, cache_dir: Path, root: bytes) -> Plan | None:
    """What it takes to bring the datastore to `os_version`; None when nothing to do."""
    source = datastore_version(store_root)
    if source is None or source == os_version:
        return None
    record = cache_dir / "cache.json"
    if not record.exists():
        # Installed without the agent (a fresh disk, a test writing slots directly): no
        # manifest says anything is needed, so the settings carry over as they are.
        return Plan(source, os_version, {})
    data = (cache_dir / MANIFEST).read_bytes()
    if not _lists_migrations(data, source, os_version):
        return Plan(source, os_version, {})
    from kiln.host.update.trust import check_bytes, offline_targets

    at = float(json.loads(record.read_bytes())["cached_at"])
    targets = offline_targets(root, cache_dir / "metadata", at)
    check_bytes(targets, MANIFEST, data)
    try:
        names = Manifest.from_bytes(data).migration_path(source, os_version)
    except ManifestError as e:
        raise UntrustedUpdate(f"cached manifest: {e}") from None
    migrations = {}
    for name in names:
        try:
            blob = (cache_dir / name).read_bytes()
        except FileNotFoundError:
            raise UpdateError(f"migration {name} ({source} -> {os_version}) was never cached") from None
        check_bytes(targets, name, blob)
        migrations[name] = blob
    return Plan(source, os_version, migrations)


def _lists_migrations(data: bytes, source: Version, target: Version) -> bool:
    """Whether the cached manifest, read without verifying it, names migrations between
    the two versions (True when it cannot be read: the verified path then says why).

    The manifest's word is verified only where it makes this host run something. A cache
    tampered with can drop migrations, as whoever can write it can edit the datastore
    itself; it cannot add any. Skipping the check when there is nothing to run spares the
    first boot of every release without migrations the TUF client's import (2 s under
    emulation, on the way to ready)."""
    try:
        return bool(Manifest.from_bytes(data).migration_path(source, target))
    except (ManifestError, ValueError, KeyError, TypeError):
        return True


def _execute(name: str, blob: bytes, args: list[str]) -> None:
    """Run verified bytes from a sealed memfd: what runs is what was checked."""
    import fcntl
    import subprocess

    fd = os.memfd_create(f"kiln-migration-{name}", os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, blob)
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        os.fchmod(fd, 0o500)
        argv = [f"/proc/self/fd/{fd}", *args]
        if blob.startswith(b"#!") and b"python" in blob.split(b"\n", 1)[0]:
            argv = ["/usr/bin/python3", "-I", *argv]  # the interpreter reads the memfd itself
        try:
            proc = subprocess.run(argv, pass_fds=(fd,), capture_output=True, timeout=TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise MigrationFailed(f"migration {name} did not finish within {TIMEOUT} s") from None
        except OSError as e:
            raise MigrationFailed(f"migration {name} cannot run: {e.strerror}") from None
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()[-2000:]
            raise MigrationFailed(f"migration {name} {args[0]} failed (exit {proc.returncode}): {err}")
    finally:
        os.close(fd)


def apply(store_root: Path, p: Plan) -> list[str]:
    """Run `p` and move `current` to the result; returns the migrations run."""
    work = store_root / f".migrate-{p.target}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        step = work / "0"
        shutil.copytree(store_root / f"v{p.source}", step, symlinks=True)
        for i, (name, blob) in enumerate(p.migrations.items(), start=1):
            out = work / str(i)
            out.mkdir()
            _execute(name, blob, [p.direction, "--source-datastore", str(step), "--target-datastore", str(out)])
            if not (out / "live" / "settings.json").is_file():
                raise MigrationFailed(f"migration {name} wrote no live/settings.json")
            step = out
        sync_tree(step)  # the contents reach the disk before any rename publishes them
        final = store_root / f"v{p.target}"
        staged = store_root / f".v{p.target}.new"
        if staged.exists():
            shutil.rmtree(staged)
        step.rename(staged)
        fsync_dir(store_root)
        if final.exists():  # left from an earlier stay on that version: replaced, not merged
            old = store_root / f".v{p.target}.old"
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        staged.rename(final)
        link = store_root / ".current.new"
        link.unlink(missing_ok=True)
        link.symlink_to(f"v{p.target}")
        os.replace(link, store_root / "current")
        fsync_dir(store_root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(store_root / f".v{p.target}.old", ignore_errors=True)
    return list(p.migrations)
