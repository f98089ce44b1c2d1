"""The framing `kiln exec` speaks once its HTTP request has been upgraded.

After `POST /exec` is answered with `101 Switching Protocols` (Upgrade: kiln-exec), both
sides exchange frames on the same connection (the Unix socket or the TLS stream): one type
byte, a 4-byte big-endian length, the payload. Plain blocking writes give backpressure for
free: a side that stops reading stops the other side's writes, and so the process's output.

Client → server: STDIN data, STDIN_EOF, RESIZE (rows, cols), SIGNAL (number).
Server → client: STDOUT, STDERR, EXIT (status), ERROR (a message; the session is over).
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
from collections.abc import Iterator

PROTOCOL = "kiln-exec"
STDIN, STDIN_EOF, RESIZE, SIGNAL = b"i", b"e", b"r", b"s"
STDOUT, STDERR, EXIT, ERROR = b"1", b"2", b"x", b"!"
MAX_FRAME = 1 << 20
CHUNK = 32768
_HEAD = struct.Struct("!cI")


class ProtocolError(Exception):
    """The peer sent something that is not a frame."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEAD.pack(kind, len(payload)) + payload


def resize(rows: int, cols: int) -> bytes:
    return frame(RESIZE, struct.pack("!HH", rows, cols))


def exit_status(code: int) -> bytes:
    return frame(EXIT, struct.pack("!i", code))


def unpack_pair(payload: bytes) -> tuple[int, int]:
    a, b = struct.unpack("!HH", payload)
    return a, b


def unpack_int(payload: bytes) -> int:
    (n,) = struct.unpack("!i", payload)
    return int(n)


class Frames:
    """Bytes in, whole frames out (a frame may arrive across many reads)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bytes]]:
        self._buf += data
        while len(self._buf) >= _HEAD.size:
            kind, size = _HEAD.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise ProtocolError(f"frame of {size} bytes (at most {MAX_FRAME})")
            if len(self._buf) < _HEAD.size + size:
                return
            payload = bytes(self._buf[_HEAD.size:_HEAD.size + size])
            del self._buf[:_HEAD.size + size]
            yield kind, payload


def wait(sock: socket.socket, want_sock: bool, others: list[int], writable: list[int], timeout: float
         ) -> tuple[bool, list[int], list[int]]:
    """select() that knows TLS: bytes already decrypted inside the SSL object count as readable.

    Returns (the socket is readable, readable fds among `others`, writable fds).
    """
    if want_sock and isinstance(sock, ssl.SSLSocket) and sock.pending():
        r, w, _ = select.select(others, writable, [], 0)
        return True, r, w
    rlist = [sock.fileno(), *others] if want_sock else others
    r, w, _ = select.select(rlist, writable, [], timeout)
    return want_sock and sock.fileno() in r, [fd for fd in r if fd != sock.fileno()], w
