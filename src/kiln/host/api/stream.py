"""The framing `kiln exec` speaks once its HTTP request has been upgraded.

After `POST /exec` is answered with `101 Switching Protocols` (Upgrade: kiln-exec), both
sides exchange frames on the same connection (the Unix socket or the TLS stream): one type
byte, a 4-byte big-endian length, the payload. Neither side ever blocks on a send: frames
wait in an Outbox, and a side stops reading its source (a process's output, a terminal)
while its Outbox is full. So a peer that stops reading stops the flow at its origin, and
two sides sending at once cannot deadlock each other.

Client → server: STDIN data, STDIN_EOF, RESIZE (rows, cols), SIGNAL (number).
Server → client: STDOUT, STDERR, EXIT (status), ERROR (a message; the session is over).
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from collections.abc import Iterator

PROTOCOL = "kiln-exec"
STDIN, STDIN_EOF, RESIZE, SIGNAL = b"i", b"e", b"r", b"s"
STDOUT, STDERR, EXIT, ERROR = b"1", b"2", b"x", b"!"
MAX_FRAME = 1 << 20
CHUNK = 32768
HIGH_WATER = 1 << 18  # bytes an Outbox holds before its side stops reading more
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
    try:
        a, b = struct.unpack("!HH", payload)
    except struct.error:
        raise ProtocolError(f"expected two 16-bit numbers, got {len(payload)} bytes") from None
    return a, b


def unpack_int(payload: bytes) -> int:
    try:
        (n,) = struct.unpack("!i", payload)
    except struct.error:
        raise ProtocolError(f"expected a 32-bit number, got {len(payload)} bytes") from None
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


_AGAIN = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Outbox:
    """A non-blocking connection: frames queue here and leave as the socket takes them."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buf = bytearray()
        self._retry = 0  # TLS retries a write with the same length

    def put(self, data: bytes) -> None:
        self.buf += data

    @property
    def full(self) -> bool:
        return len(self.buf) >= HIGH_WATER

    def flush(self) -> None:
        while self.buf:
            size = self._retry or min(len(self.buf), 4 * CHUNK)
            try:
                sent = self.sock.send(self.buf[:size])
            except _AGAIN:
                self._retry = size
                return
            self._retry = 0
            del self.buf[:sent]

    def recv(self) -> bytes | None:
        """Bytes from the peer, b"" when it closed, None when nothing is there yet."""
        try:
            return self.sock.recv(CHUNK)
        except _AGAIN:
            return None

    def drain(self, timeout: float) -> bool:
        """Send what is left (the last frames of a session), waiting at most `timeout`."""
        deadline = time.monotonic() + timeout
        while self.buf and (left := deadline - time.monotonic()) > 0:
            select.select([], [self.sock], [], left)
            self.flush()
        return not self.buf


def wait(sock: socket.socket, want_sock: bool, others: list[int], writable: list[int], timeout: float
         ) -> tuple[bool, list[int], list[int]]:
    """select() that knows TLS: bytes already decrypted inside the SSL object count as readable.

    Returns (the socket is readable, readable fds among `others`, writable fds).
    """
    if want_sock and isinstance(sock, ssl.SSLSocket) and sock.pending():
        r, w, _ = select.select(others, writable, [], 0)
        return True, r, w
    rlist = [sock.fileno(), *others] if want_sock else others
    r, w, _ = select.select(rlist, writable, [], timeout)  # `writable` may hold the socket
    return want_sock and sock.fileno() in r, [fd for fd in r if fd != sock.fileno()], w
