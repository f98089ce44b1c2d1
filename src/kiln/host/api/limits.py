"""What one peer may hold of the API server: connections, handshakes, request-head bytes.

The remote listener faces the network, so every resource a peer can make the server hold is
counted before it is spent:

- A connection still in its TLS handshake has proved nothing. Handshakes get their own small
  budget (`HANDSHAKES` at once, `HANDSHAKES_PER_SOURCE` from one address) with a short
  deadline, apart from the connections being served; a peer without a certificate cannot
  fill the served slots, and one address cannot fill the handshake budget.
- A served connection belongs to an identity (the certificate's name): at most
  `PER_IDENTITY` at once, so one leaked reader certificate cannot take every slot.
- A request's line and headers together are at most `MAX_HEAD` bytes (the stdlib would take
  100 lines of 64 KiB each, 6.4 MiB per connection).
"""

from __future__ import annotations

import http.client
import io
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

MAX_HEAD = 16 << 10
SERVED = 64  # connections being served at once (after the handshake, on the remote listener)
PER_IDENTITY = 16
HANDSHAKES = 32
HANDSHAKES_PER_SOURCE = 4


class Budget:
    """At most `total` holders at once, and at most `each` holders per key (0: no per-key cap)."""

    def __init__(self, total: int, each: int = 0) -> None:
        self.total = total
        self.each = each
        self._lock = threading.Lock()
        self._held = 0
        self._by_key: dict[str, int] = {}

    def take(self, key: str = "") -> bool:
        with self._lock:
            mine = self._by_key.get(key, 0)
            if self._held >= self.total or (self.each and mine >= self.each):
                return False
            self._held += 1
            self._by_key[key] = mine + 1
            return True

    def give(self, key: str = "") -> None:
        with self._lock:
            self._held -= 1
            left = self._by_key[key] - 1
            if left:
                self._by_key[key] = left
            else:
                del self._by_key[key]

    @property
    def held(self) -> int:
        return self._held


class HeadReader:
    """A connection's reader whose `readline` (request line and headers) draws on a budget.

    `reset()` at the start of each request. Past the budget `readline` raises LineTooLong,
    which the stdlib's header parser turns into a 431; the body is read with `read`, which
    the budget does not touch (its Content-Length is checked against MAX_BODY instead).
    """

    def __init__(self, raw: io.BufferedIOBase, budget: int = MAX_HEAD) -> None:
        self.raw = raw
        self.budget = budget
        self.left = budget

    def reset(self) -> None:
        self.left = self.budget

    def readline(self, limit: int = -1) -> bytes:
        if self.left < 0:
            raise http.client.LineTooLong(f"request line and headers over {self.budget} bytes")
        want = self.left + 1 if limit < 0 else min(limit, self.left + 1)
        line = self.raw.readline(want)
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong(f"request line and headers over {self.budget} bytes")
        return line

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def __getattr__(self, name: str) -> Any:  # close, closed, fileno, ...: the real reader's
        return getattr(self.raw, name)


class HeadLimited(BaseHTTPRequestHandler):
    """A request handler whose request line and headers together draw on MAX_HEAD bytes
    (431 past it), for every server facing clients it does not control."""

    def setup(self) -> None:
        super().setup()
        self.rfile = HeadReader(self.rfile)  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        reader: HeadReader = self.rfile  # type: ignore[assignment]
        reader.reset()
        self.command, self.requestline = None, ""  # type: ignore[assignment]
        try:
            super().handle_one_request()
        except http.client.LineTooLong as e:  # the request line alone used up the budget
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, str(e))
