"""thar-be-settings: changed keys → affected services → their files → render → restart.

`apply(store, keys)` renders only what the changed keys touch; `apply(store, None)` renders
every configuration file (the boot does this once). Files are written atomically; a file
whose template `requires` a setting that is unset is removed rather than left stale.
Restart commands run only for services whose files were (re)rendered (at boot: and came
out different), each with a timeout; a failure is reported and does not stop the others.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.core.fs import atomic_write, exclusive_lock
from kiln.core.run import run
from kiln.host.datastore import Datastore
from kiln.host.osinfo import os_release
from kiln.host.render.cache import RenderCache, digest, file_hash, os_release_bytes
from kiln.host.render.templates import TemplateError, Templates
from kiln.host.settings.keys import has_path

log = logging.getLogger("kiln.render")
RESTART_TIMEOUT = 60.0
Restart = bool | Callable[[str], bool]  # see apply()


@dataclass
class ApplyReport:
    services: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # files that did not render: the host is not healthy
    failed_restarts: list[str] = field(default_factory=list)  # reported, but a bad value must not block boots
    deferred: list[str] = field(default_factory=list)  # services whose restart the caller does itself
    kept: list[str] = field(default_factory=list)  # not restarted: their files came out byte for byte the same

    def to_json(self) -> dict[str, Any]:
        """The API's ApplyReport; `deferred` and `kept` only where something was (the boot's
        record: the API's applies run every restart command)."""
        out = dict(self.__dict__)
        for optional in ("deferred", "kept"):
            if not out[optional]:
                del out[optional]
        return out


def apply(
    store: Datastore,
    keys: list[tuple[str, ...]] | None,
    *,
    templates: Templates | None = None,
    root: Path = Path("/"),
    restart: Restart = True,
    cache: RenderCache | None = None,
    only_changed: bool = False,
) -> ApplyReport:
    """Render and restart for `keys` (None: everything). `root` relocates written files (tests).

    `restart` is True (run every affected service's restart commands), False (none), or a
    predicate on a command: a service with a command it refuses is left to the caller
    (reported as deferred), e.g. the host agent, which reads those files itself later.

    With a `cache`, every file written or removed is mirrored there. Only a complete, clean
    render records what the files match (see kiln.host.render.cache); a partial apply or a
    failed one invalidates it, so the next boot renders everything once.
    `only_changed` (the boot's render): a service whose files all came out the same as
    they were on disk is not restarted (reported as kept). At boot the services started
    with the files the initramfs restored; the first boot of a new version renders
    everything again, and mostly to the same bytes.

    One apply at a time on the host (an flock beside the datastore), whichever process runs it.
    """
    with exclusive_lock(store.root / "apply.lock"):
        return _apply(store, keys, templates or Templates(), root, restart, cache, only_changed)


def _apply(
    store: Datastore,
    keys: list[tuple[str, ...]] | None,
    templates: Templates,
    root: Path,
    restart: Restart,
    cache: RenderCache | None,
    only_changed: bool = False,
) -> ApplyReport:
    definitions = store.definitions()
    services = sorted(definitions.services) if keys is None else definitions.services_for(keys)
    report = ApplyReport(services=services)
    settings = store.live()
    osr = os_release_bytes(root)
    context = {"settings": settings, "os": os_release(root / "etc/os-release")}
    rendered: dict[str, bytes | None] = {}  # configuration file name → content (None: removed)
    same: set[str] = set()  # configuration files whose content did not change
    if cache is not None:
        cache.forget()  # a crash during a render must not leave a cache that looks current
    for name in definitions.files_for(services):
        cf = definitions.configuration_files[name]
        target = root / cf.path.lstrip("/")
        try:
            fm = templates.front_matter(cf.template_path)
            if any(not has_path({"settings": settings}, k) for k in fm.requires):
                if target.exists():
                    target.unlink()
                    report.removed.append(cf.path)
                else:
                    same.add(name)
                if cache is not None:
                    cache.removed(cf.path)
                rendered[name] = None
                continue
            data = templates.render(cf.template_path, context).encode()
            if only_changed and _content(target) == data:  # read only where it decides something
                same.add(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data, mode=fm.mode)
            if cache is not None:
                cache.wrote(cf.path, data, fm.mode)
            report.written.append(cf.path)
            rendered[name] = data
        except (TemplateError, OSError) as e:
            report.errors.append(f"configuration file '{name}' ({cf.path}): {e}")
    # A partial apply re-rendered only what the changed keys touch; whether the other files
    # still match the live settings is not known here (a commit without an apply, another
    # client's commit in between), so only a clean full render vouches for the whole set.
    if cache is not None and keys is None and not report.errors:
        files = {definitions.configuration_files[n].path: file_hash(d) for n, d in rendered.items()}
        cache.record(digest(settings, osr), files)
    if restart:
        for svc in services:
            names = definitions.services[svc].configuration_files
            if any(f not in rendered for f in names):
                report.errors.append(f"service '{svc}': not restarted, a configuration file failed to render")
                continue
            if only_changed and names and all(f in same for f in names):
                report.kept.append(svc)
                continue
            commands = definitions.services[svc].restart_commands
            if callable(restart) and not all(restart(c) for c in commands):
                report.deferred.append(svc)
                continue
            _restart(svc, commands, report)
    for problem in [*report.errors, *report.failed_restarts]:
        log.error("%s", problem)
    return report


def _content(path: Path) -> bytes | None:
    """The file's bytes; None when it is missing or unreadable (never the same as a render)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def _restart(service: str, commands: list[str], report: ApplyReport) -> None:
    for cmd in commands:
        try:
            run(shlex.split(cmd), timeout=RESTART_TIMEOUT, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        except KilnError as e:
            report.failed_restarts.append(f"service '{service}': {e}")
            return
    if commands:
        report.restarted.append(service)
