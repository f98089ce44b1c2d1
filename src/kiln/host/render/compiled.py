"""A jinja2 loader for the template bodies precompiled at build time.

jinja2's own ModuleLoader registers a weak proxy in ``sys.modules``; anything that
walks ``sys.modules`` while the garbage collector drops the loader then meets a dead
proxy (hypothesis does, in the test suite). This loader runs each compiled module in
a private namespace instead and leaves ``sys.modules`` alone.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import jinja2


class CompiledLoader(jinja2.BaseLoader):
    """Loads ``tmpl_<sha1(name)>.py`` files written by ``Environment.compile_templates``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(
        self,
        environment: jinja2.Environment,
        name: str,
        globals: MutableMapping[str, Any] | None = None,  # jinja2 names it so
    ) -> jinja2.Template:
        path = self.directory / jinja2.ModuleLoader.get_module_filename(name)
        try:
            source = path.read_bytes()
        except FileNotFoundError:
            raise jinja2.TemplateNotFound(name) from None
        namespace: dict[str, Any] = {"__name__": f"kiln_template_{path.stem}", "__file__": str(path)}
        exec(compile(source, str(path), "exec"), namespace)  # our own build output, from the verified image
        return environment.template_class.from_module_dict(environment, namespace, globals or {})
