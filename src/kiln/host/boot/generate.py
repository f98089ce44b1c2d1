"""Built-in setting generators (commands named in the defaults' metadata).

    seed      a random wave seed in 0..2047 (which update wave this host is in)
    hostname  `kiln-` + the first 8 hex digits of the machine id (stable across reboots)

Each prints one JSON value, as sundog expects.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path


def seed() -> int:
    return secrets.randbelow(2048)


def hostname(machine_id: Path = Path("/etc/machine-id")) -> str | None:
    try:
        mid = machine_id.read_text().strip()
    except FileNotFoundError:
        return None
    return f"kiln-{mid[:8]}" if len(mid) >= 8 else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    what = args[0] if args else ""
    if what == "seed":
        print(json.dumps(seed()))
    elif what == "hostname":
        name = hostname()
        if name is None:
            return 2  # no machine id: leave the hostname to DHCP / the default
        print(json.dumps(name))
    else:
        print("usage: generate seed|hostname", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
