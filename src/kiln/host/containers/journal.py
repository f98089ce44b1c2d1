"""Lines for a container's journal, under the container's id.

The supervisor's lifecycle lines ("exited with status 137; restart 1 in 1 s") carry the
same SYSLOG_IDENTIFIER as the container's own output (which the shim's logger writes), so
`kiln logs NAME` shows both in order. journald's native protocol is one datagram of
`FIELD=value` lines: no library, no process.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

SOCKET = Path("/run/systemd/journal/socket")


def send(identifier: str, message: str, priority: int = 6, sock_path: Path = SOCKET) -> None:
    """`message` in the journal as `identifier` (to stderr when there is no journal)."""
    fields = {"MESSAGE": message, "SYSLOG_IDENTIFIER": identifier, "PRIORITY": str(priority)}
    if "\n" not in message and sock_path.exists():
        data = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(data, str(sock_path))
            return
        except OSError:
            pass  # journald restarting: the line still goes somewhere
    print(message, file=sys.stderr, flush=True)
