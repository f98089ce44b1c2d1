"""A minimal SNTP server (RFC 4330) on 127.0.0.1 for VM tests.

QEMU user networking delivers the guest's packets to 10.0.2.2 to the host's loopback, so
a guest told to use time server 10.0.2.2 reaches this server: proof that the rendered
timesyncd configuration is the one the running service uses.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

NTP_EPOCH = 2208988800  # 1900-01-01 → 1970-01-01


def _ts(t: float) -> bytes:
    secs = int(t) + NTP_EPOCH
    return struct.pack("!II", secs, int((t % 1) * 2**32))


@contextmanager
def sntp_server(port: int = 123) -> Iterator[list[tuple[str, int]]]:
    """Answer SNTP requests on 127.0.0.1:`port`; yields the list of clients that asked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.settimeout(0.2)
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) < 48:
                continue
            now = time.time()
            reply = (
                bytes([0x24, 1, data[2], 0xEC])  # LI 0, version 4, mode 4 (server); stratum 1
                + struct.pack("!II", 0, 0x10)  # root delay, root dispersion
                + b"KILN"  # reference id
                + _ts(now)  # reference timestamp
                + data[40:48]  # originate = the client's transmit timestamp
                + _ts(now)  # receive
                + _ts(time.time())  # transmit
            )
            sock.sendto(reply, addr)
            seen.append(addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(2)
        sock.close()
