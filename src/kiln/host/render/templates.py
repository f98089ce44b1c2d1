"""Configuration-file templates: a small TOML front matter, a `+++` line, a Jinja2 body.

    mode = "0644"                                  # file mode (default 0644)
    requires = ["settings.ntp.time-servers"]       # unset → the file is removed, not rendered
    +++
    [Time]
    NTP={{ settings.ntp["time-servers"] | join(" ") }}

Bodies render with StrictUndefined: a template that reads a setting that is not there
fails loudly instead of writing an empty value. The image ships the bodies precompiled
(jinja2's compile_templates) so a render under emulation does not pay for the compiler.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.host.settings.keys import BadKey, parse_key

if TYPE_CHECKING:
    import jinja2

TEMPLATE_DIR = Path("/usr/share/kiln/templates")
COMPILED_DIR = Path("/usr/share/kiln/templates.compiled")
_SEPARATOR = re.compile(r"^\+{3,}[ \t]*$", re.M)


class TemplateError(ValueError):
    """A template that cannot be parsed or rendered; the message names it."""


@dataclass(frozen=True)
class FrontMatter:
    mode: int = 0o644
    requires: tuple[tuple[str, ...], ...] = ()


def split(name: str, text: str) -> tuple[FrontMatter, str]:
    """Front matter and body of a template source."""
    m = _SEPARATOR.search(text)
    if m is None:
        raise TemplateError(f"template '{name}': no '+++' line after the front matter")
    try:
        raw: dict[str, Any] = tomllib.loads(text[: m.start()])
    except tomllib.TOMLDecodeError as e:
        raise TemplateError(f"template '{name}': front matter: {e}") from None
    unknown = set(raw) - {"mode", "requires"}
    if unknown:
        raise TemplateError(f"template '{name}': unknown front matter key(s) {sorted(unknown)}")
    mode = raw.get("mode", "0644")
    if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3}", mode):
        raise TemplateError(f"template '{name}': mode must be an octal string like \"0644\"")
    requires = raw.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(k, str) for k in requires):
        raise TemplateError(f"template '{name}': requires must be a list of setting keys")
    try:
        keys = tuple(parse_key(k) for k in requires)
    except BadKey as e:
        raise TemplateError(f"template '{name}': requires: {e}") from None
    body = text[m.end() :].removeprefix("\n")
    return FrontMatter(int(mode, 8), keys), body


class Templates:
    """Loads templates by name from the source directory, bodies from precompiled modules if present."""

    def __init__(self, source: Path = TEMPLATE_DIR, compiled: Path | None = COMPILED_DIR) -> None:
        self.source = source
        self.compiled = compiled if compiled is not None and compiled.is_dir() else None
        self._env: jinja2.Environment | None = None

    def env(self) -> jinja2.Environment:
        if self._env is None:
            import jinja2  # heavy: only when something is rendered

            loader: jinja2.BaseLoader
            if self.compiled is not None:
                from kiln.host.render.compiled import CompiledLoader

                loader = CompiledLoader(self.compiled)
            else:
                loader = jinja2.FunctionLoader(lambda n: split(n, self._source(n))[1])
            self._env = jinja2.Environment(
                loader=loader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
            )
        return self._env

    def _source(self, name: str) -> str:
        if "/" in name or name.startswith("."):
            raise TemplateError(f"template '{name}': names are plain file names")
        try:
            return (self.source / name).read_text()
        except FileNotFoundError:
            raise TemplateError(f"template '{name}' not found in {self.source}") from None

    def front_matter(self, name: str) -> FrontMatter:
        return split(name, self._source(name))[0]

    def render(self, name: str, context: dict[str, Any]) -> str:
        import jinja2

        try:
            return self.env().get_template(name).render(context)
        except jinja2.TemplateError as e:
            raise TemplateError(f"template '{name}': {e}") from None


def compile_all(source: Path, target: Path) -> list[str]:
    """Precompile every template body in `source` into Python modules in `target` (build time)."""
    import jinja2

    names = sorted(p.name for p in source.iterdir() if p.is_file())
    bodies = {n: split(n, (source / n).read_text())[1] for n in names}
    env = jinja2.Environment(
        loader=jinja2.DictLoader(bodies), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    try:
        env.compile_templates(str(target), zip=None, ignore_errors=False)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template '{e.name}' line {e.lineno}: {e.message}") from None
    return names
