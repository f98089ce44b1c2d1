"""What this host is: /etc/os-release as a dict with lower-case keys (`version_id`, `variant_id`).

Stdlib only and cheap to import: the boot steps and the ready line need it.
"""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path

OS_RELEASE = Path("/etc/os-release")


def os_release(path: Path = OS_RELEASE) -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            k, sep, v = line.partition("=")
            if sep and k.strip() and not k.startswith("#"):
                words = shlex.split(v)
                out[k.strip().lower()] = words[0] if words else ""
    return out
