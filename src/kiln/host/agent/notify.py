"""sd_notify(3) without a library: one datagram to $NOTIFY_SOCKET.

The agent is `Type=notify`: READY=1 once the settings are rendered, so units ordered after
it see the same files they saw after kiln-settings.service; STATUS= shows the boot phase in
`systemctl status kiln-agent`.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=…") to systemd; False when not run by it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto("\n".join(fields).encode(), address)
        except OSError:
            return False
    return True
