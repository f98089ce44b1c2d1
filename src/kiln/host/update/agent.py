"""The update agent (updog + thar-be-updates): refresh, prepare, activate, deactivate.

One command at a time (a flock on /run/kiln/update.lock; the API hands the locked file to
the process it starts, so a second request gets 423 at once). Every command records its
start and end in the status file, so a crash shows up as an interrupted command.

    python3 -m kiln.host.update.agent refresh|prepare|activate|deactivate|status [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kiln.core.errors import KilnError
from kiln.host.slot import Slots
from kiln.host.update import failures
from kiln.host.update.errors import Busy, NothingChosen, UpdateError
from kiln.host.update.manifest import Choice, Host, Manifest, ManifestError, Update, Version, choose, format_time
from kiln.host.update.status import (
    AVAILABLE,
    IDLE,
    READY,
    STAGED,
    Paths,
    Status,
    current,
    write_versions,
)

if TYPE_CHECKING:
    from tuf.ngclient.fetcher import FetcherInterface

    from kiln.host.update.trust import TrustedRepo
    from kiln.host.update.writer import Progress

ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}


def acquire(paths: Paths) -> int:
    """Take the update lock without waiting; Busy if another command holds it."""
    paths.lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy("another update command is running") from None
    return fd


@dataclass
class Agent:
    slots: Slots
    settings: dict[str, Any]  # settings.updates
    variant: str
    version: str
    arch: str = field(default_factory=lambda: ARCHES.get(platform.machine(), platform.machine()))
    paths: Paths = field(default_factory=Paths)
    fetcher: FetcherInterface | None = None
    now: Callable[[], datetime] = field(default_factory=lambda: lambda: datetime.now(UTC))
    progress: Progress | None = None

    # --- state --------------------------------------------------------------------
    def status(self) -> Status:
        return current(self.paths, self.slots.state().to_json(), self.version, self._max_attempts())

    def _max_attempts(self) -> int:
        return int(self.settings.get("max-boot-attempts", failures.DEFAULT_MAX_BOOT_ATTEMPTS))

    def host(self) -> Host:
        return Host(
            variant=self.variant,
            arch=self.arch,
            version=Version.parse(self.version, "os-release VERSION_ID"),
            seed=int(self.settings.get("seed", 0)),
            version_lock=str(self.settings.get("version-lock", "latest")).removeprefix("v"),
            ignore_waves=bool(self.settings.get("ignore-waves", False)),
            **self._failures(),
        )

    def _failures(self) -> dict[str, Any]:
        """Versions not to take again here, and those to retry only later (kiln.host.update.failures)."""
        max_attempts = self._max_attempts()
        failed, retry_at = set(), {}
        for v in failures.verdicts(failures.read(self.paths.failures), max_attempts).values():
            with contextlib.suppress(ManifestError):
                version = Version.parse(v.version)
                if v.final:
                    failed.add(version)
                elif v.retry_at is not None:
                    retry_at[version] = v.retry_at
        return {"failed": frozenset(failed), "retry_at": retry_at, "max_attempts": max_attempts}

    def repo(self) -> TrustedRepo:
        from kiln.host.update.trust import Source, TrustedRepo

        urls = {}
        for key in ("metadata-base-url", "targets-base-url"):
            if not self.settings.get(key):
                raise UpdateError(f"settings.updates.{key} is not set", hint=f"kiln settings set updates.{key}=URL")
            urls[key] = str(self.settings[key])
        try:
            root = self.paths.root.read_bytes()
        except OSError as e:
            raise UpdateError(f"cannot read the trusted root {self.paths.root}: {e.strerror}") from None
        source = Source(urls["metadata-base-url"], urls["targets-base-url"], root)
        return TrustedRepo(source, self.paths.metadata, self.fetcher)

    def run(self, command: str) -> Status:
        """Run one command under the status bookkeeping (the caller holds the lock)."""
        actions: dict[str, Callable[[Status], None]] = {
            "refresh": self._refresh,
            "prepare": self._prepare,
            "activate": self._activate,
            "deactivate": self._deactivate,
        }
        st = self.status()
        st.require(command)
        st.begin(command)
        st.save(self.paths.status)
        error: BaseException | None = None
        try:
            actions[command](st)
        except BaseException as e:
            error = e
            raise
        finally:
            st.finish(error)
            st.save(self.paths.status)
        return self.status()

    # --- commands -----------------------------------------------------------------
    def _choose(self, st: Status, manifest: Manifest) -> Choice:
        choice = choose(manifest, self.host(), self.now())
        st.available_updates = [str(v) for v in choice.available]
        st.reason = choice.reason
        st.ready_at = format_time(choice.ready_at) if choice.ready_at else None
        return choice

    def _refresh(self, st: Status) -> None:
        try:
            manifest = self.repo().refresh()
        except UpdateError as e:
            st.reason = f"cannot check for updates: {e}"
            raise
        choice = self._choose(st, manifest)
        if st.update_state in (IDLE, AVAILABLE):
            st.chosen_update = _describe(choice.update) if choice.update else None
            st.update_state = AVAILABLE if choice.update else IDLE

    def _prepare(self, st: Status) -> None:
        from kiln.host.update import migrate
        from kiln.host.update.writer import write_release

        repo = self.repo()
        manifest = repo.refresh()
        choice = self._choose(st, manifest)
        if choice.update is None:
            st.update_state, st.chosen_update = IDLE, None
            raise NothingChosen(f"nothing to prepare: {choice.reason}")
        update = choice.update
        st.chosen_update = _describe(update)
        # Migrations and the metadata that vouches for them are cached before the slot is
        # touched: the next boot (forward) or a rollback (backward) runs them offline.
        migrate.cache(repo, manifest, Version.parse(self.version), update.version, self.paths.migrations)
        inactive = self.slots.state().inactive
        write_versions(self.paths, {inactive: None})
        st.staged_version = None
        st.update_state = AVAILABLE
        st.save(self.paths.status)
        write_release(self.slots, update, repo.stream, self.progress or self._recorder(st))
        write_versions(self.paths, {inactive: str(update.version)})
        st.staged_version = str(update.version)
        st.update_state = STAGED

    def _recorder(self, st: Status) -> Progress:
        """Progress into the status file (clients long-poll it): as each image begins and
        ends, and at most once a second between."""
        last: list[Any] = [0.0, ""]

        def record(image: str, done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0 or done == total or image != last[1]:
                last[:] = [now, image]
                st.progress = {"image": image, "done": done, "total": total}
                st.save(self.paths.status)

        return record

    def _activate(self, st: Status) -> None:
        self.slots.apply("upgrade-to-inactive")
        st.update_state = READY

    def _deactivate(self, st: Status) -> None:
        self.slots.apply("cancel-upgrade")
        st.update_state = STAGED


def _describe(u: Update) -> dict[str, str]:
    return {"variant": u.variant, "arch": u.arch, "version": str(u.version)}


def from_host(paths: Paths | None = None) -> Agent:
    """The agent for the running host: its slots, os-release and settings.updates."""
    from kiln.host.datastore import Datastore
    from kiln.host.osinfo import os_release

    osr = os_release()
    updates = Datastore().live().get("updates") or {}
    return Agent(
        slots=Slots.open(),
        settings=dict(updates),
        variant=osr.get("variant_id", ""),
        version=osr.get("version_id", "0.0.0"),
        paths=paths or Paths(),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln-update-agent")
    p.add_argument("command", choices=["refresh", "prepare", "activate", "deactivate", "status"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--lock-fd", type=int, help="an inherited, already locked update lock")
    args = p.parse_args(argv)
    try:
        agent = from_host()
        if args.command == "status":
            st = agent.status()
        else:
            fd = args.lock_fd if args.lock_fd is not None else acquire(agent.paths)
            try:
                st = agent.run(args.command)
            finally:
                os.close(fd)
    except KilnError as e:
        print(f"kiln update {args.command}: {e}", file=sys.stderr)
        return 1
    from dataclasses import asdict

    print(json.dumps(asdict(st), indent=1) if args.json else f"{st.update_state}: {st.reason or 'ok'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
