"""Vendor the in-image code's Python dependencies as wheels (no pip inside the image).

Debian bookworm's Python packages are too old for what Kiln needs (see DESIGN.md), so the
builder downloads pinned binary wheels for the image's interpreter (CPython 3.11,
manylinux x86_64) into the Kiln cache and installs them into the root's dist-packages.
The image's compileall step then byte-compiles them with everything else.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from kiln.core.errors import KilnError
from kiln.core.run import CommandError, run

REQUIREMENTS = Path(__file__).resolve().parents[1] / "host" / "requirements.txt"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)$")
TARGET = [
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
    "--only-binary=:all:",
]


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    """Pinned requirements, one per line; anything unpinned is an error naming the line."""
    reqs = []
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not _PIN.match(line):
            raise KilnError(f"{path}:{n}: '{line}' must be pinned as name==version (builds are reproducible)")
        reqs.append(line)
    return reqs


def vendor(requirements: list[str], site: Path, cache: Path) -> list[Path]:
    """Download (cached) and install `requirements` into `site`; returns the wheels used."""
    if not requirements:
        return []
    cache.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    try:
        run([*pip, "download", "--no-deps", *TARGET, "-d", cache, *requirements])
    except CommandError as e:
        raise KilnError(
            f"cannot download the in-image Python wheels {requirements}:\n{e.stderr.strip()[-800:]}"
        ) from None
    run(
        [
            *pip,
            "install",
            "--no-deps",
            "--no-index",
            "--find-links",
            cache,
            "--no-compile",
            "--target",
            site,
            "--upgrade",
            *TARGET,
            *requirements,
        ]
    )
    names = {r.split("==")[0].lower().replace("-", "_") for r in requirements}
    return sorted(w for w in cache.glob("*.whl") if w.name.split("-")[0].lower() in names)
