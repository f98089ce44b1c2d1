"""What a reader may see of the settings: an allow-list, everything else `<redacted>`.

A reader is an auditor's certificate: it must be able to tell what a host runs and how it
is configured, never the secrets in it. A deny-list would leak every secret-bearing setting
added later (container env, user data, commands carrying tokens), so values are shown only
where READER_VISIBLE says so; anything else, present or future, reads as `<redacted>`.

A pattern shows the whole subtree below its key (`*` matches any name in a map). The names
of map entries on the way to a visible key stay visible (a reader sees that container `web`
exists and its image, not its env); a map that leads to nothing visible is redacted whole.
"""

from __future__ import annotations

from typing import Any

REDACTED = "<redacted>"

_WORKLOAD = ("image", "enabled", "restart", "network", "mounts", "memory-limit", "cpus", "stop-timeout")
READER_VISIBLE: tuple[tuple[str, ...], ...] = (
    ("motd",), ("network",), ("ntp",), ("kernel",), ("updates",), ("health",),
    ("api", "remote", "ca"), ("api", "remote", "certificate"), ("api", "remote", "port"),
    ("api", "remote", "crl"),
    *(("containers", "*", f) for f in _WORKLOAD),
    *(("host-containers", "*", f) for f in ("source", "enabled", "superpowered")),
    *(("bootstrap-containers", "*", f) for f in ("source", "mode", "essential")),
    ("container-registry", "mirrors"), ("container-registry", "credentials", "*", "username"),
)


def _matches(pattern: tuple[str, ...], at: tuple[str, ...]) -> bool:
    return all(p in ("*", a) for p, a in zip(pattern, at, strict=False))


def reader_view(tree: Any, at: tuple[str, ...] = ()) -> Any:
    """`tree` (settings below the key `at`) as a reader sees it; `tree` is not modified."""
    if any(len(p) <= len(at) and _matches(p, at) for p in READER_VISIBLE):
        return tree
    if isinstance(tree, dict) and any(len(p) > len(at) and _matches(p, at) for p in READER_VISIBLE):
        return {k: reader_view(v, (*at, k)) for k, v in tree.items()}
    return REDACTED
