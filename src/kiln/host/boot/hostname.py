"""Set the kernel hostname from the rendered /etc/hostname (the hostname service's restart command).

There is no hostnamed or `hostname` binary on a Kiln host; the syscall is all it takes.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def main(path: Path = Path("/etc/hostname")) -> int:
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        return 0
    if name and name != socket.gethostname():
        try:
            socket.sethostname(name)
        except OSError as e:
            print(f"kiln: cannot set hostname '{name}': {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
