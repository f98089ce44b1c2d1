"""thar-be-settings: changed keys → affected services → their files → render → restart.

`apply(store, keys)` renders only what the changed keys touch; `apply(store, None)` renders
every configuration file (the boot does this once). Files are written atomically; a file
whose template `requires` a setting that is unset is removed rather than left stale.
Restart commands run only for services whose files were (re)rendered, each with a timeout;
a failure is reported and does not stop the other services.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.core.fs import atomic_write
from kiln.core.run import run
from kiln.host.datastore import Datastore
from kiln.host.osinfo import os_release
from kiln.host.render.templates import TemplateError, Templates
from kiln.host.settings.keys import get_path

log = logging.getLogger("kiln.render")
RESTART_TIMEOUT = 60.0


@dataclass
class ApplyReport:
    services: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def apply(
    store: Datastore,
    keys: list[tuple[str, ...]] | None,
    *,
    templates: Templates | None = None,
    root: Path = Path("/"),
    restart: bool = True,
) -> ApplyReport:
    """Render and restart for `keys` (None: everything). `root` relocates written files (tests)."""
    templates = templates or Templates()
    definitions = store.definitions()
    services = sorted(definitions.services) if keys is None else definitions.services_for(keys)
    report = ApplyReport(services=services)
    context = {"settings": store.live(), "os": os_release(root / "etc/os-release")}
    rendered: set[str] = set()
    for name in definitions.files_for(services):
        cf = definitions.configuration_files[name]
        target = root / cf.path.lstrip("/")
        try:
            fm = templates.front_matter(cf.template_path)
            if any(not _has(context["settings"], k) for k in fm.requires):
                if target.exists():
                    target.unlink()
                    report.removed.append(cf.path)
                rendered.add(name)
                continue
            text = templates.render(cf.template_path, context)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, text.encode(), mode=fm.mode)
            report.written.append(cf.path)
            rendered.add(name)
        except (TemplateError, OSError) as e:
            report.errors.append(f"configuration file '{name}' ({cf.path}): {e}")
    if restart:
        for svc in services:
            files = definitions.services[svc].configuration_files
            if any(f not in rendered for f in files):
                report.errors.append(f"service '{svc}': not restarted, a configuration file failed to render")
                continue
            _restart(svc, definitions.services[svc].restart_commands, report)
    for problem in report.errors:
        log.error("%s", problem)
    return report


def _has(settings: dict[str, Any], key: tuple[str, ...]) -> bool:
    try:
        get_path({"settings": settings}, key)
    except LookupError:
        return False
    return True


def _restart(service: str, commands: list[str], report: ApplyReport) -> None:
    for cmd in commands:
        try:
            run(shlex.split(cmd), timeout=RESTART_TIMEOUT, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        except KilnError as e:
            report.errors.append(f"service '{service}': {e}")
            return
    if commands:
        report.restarted.append(service)
