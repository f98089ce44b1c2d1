"""The fleet dashboard: one page, its script and style, served by `kiln fleet serve` at `/`.

Plain HTML, CSS and JavaScript with no framework and no build step: everything the page
needs comes from the fleet server itself (a host network without internet access still
shows it). The page reads `/v1/status` and `/v1/hosts` and refreshes by itself.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

DASHBOARD_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


@cache
def dashboard_file(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()
