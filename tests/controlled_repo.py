"""An HTTP server for a repository under a test's control: serves `metadata/` and
`targets/` of a `kiln repo` directory like `kiln repo serve`, but each response can be
replaced, slowed down, made endless, sent as raw bytes, or held at a chosen byte, to play
a slow link or a malicious mirror, or to stop a client at an exact point of a download."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote

from kiln.repo import admin, publish
from kiln.repo.serve import RepoUrls

# A hook gets (path, the file's bytes or None) and returns bytes to send, or None for 404.
Hook = Callable[[str, bytes | None], bytes | None]


@dataclass
class Hold:
    """Pause the `nth` response to a path once `at` body bytes are sent, until `release`
    is set; `reached` is set when it pauses. A test waits for `reached`, then kills the
    client: the kill lands at that byte of that download, however busy the machine."""

    at: int
    nth: int = 1
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class ControlledRepo(RepoUrls):
    def __init__(self, directory: Path, *, rate: int | None = None) -> None:
        self.directory = directory
        self.rate = rate  # bytes per second for every response (None: as fast as possible)
        self.rates: dict[str, int] = {}  # per request path, overriding `rate`
        self.hooks: dict[str, Hook] = {}  # by request path, e.g. "/metadata/timestamp.json"
        self.endless: set[str] = set()  # paths whose body (the file, or the hook's bytes) never ends
        self.raw: dict[str, bytes] = {}  # paths answered with exactly these bytes (status line included)
        self.requests: list[str] = []
        self.sent: dict[str, int] = {}  # body bytes written, by path
        self.holds: dict[str, Hold] = {}  # by request path
        self.responses: dict[str, int] = {}  # responses begun, by path (what Hold.nth counts)
        self.finished: dict[str, list[threading.Event]] = {}  # one per response to a path, set as it ends
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(self.path)
                with outer._lock:
                    nth = outer.responses[self.path] = outer.responses.get(self.path, 0) + 1
                    done = threading.Event()
                    outer.finished.setdefault(self.path, []).append(done)
                try:
                    self._get(nth)
                finally:
                    done.set()

            def _get(self, nth: int) -> None:
                if self.path in outer.raw:
                    with contextlib.suppress(OSError):
                        self.wfile.write(outer.raw[self.path])
                    self.close_connection = True
                    return
                data = outer.read(self.path)
                if self.path in outer.hooks:
                    data = outer.hooks[self.path](self.path, data)
                endless = self.path in outer.endless
                if data is None and not endless:
                    self.send_error(404)
                    return
                self.send_response(200)
                if not endless:
                    self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                rate = outer.rates.get(self.path, outer.rate)
                # A slow rate is sent in small pieces, 20 a second: a trickle, not bursts.
                step = max(1, min(64 * 1024, rate // 20)) if rate else 64 * 1024
                hold = outer.holds.get(self.path)
                if hold is not None and hold.nth != nth:
                    hold = None
                pos = 0
                try:
                    for piece in _pieces(data or b"", step, endless):
                        if hold is not None and pos + len(piece) > hold.at:
                            self._send(piece[: hold.at - pos])
                            hold.reached.set()
                            hold.release.wait()
                            piece, pos, hold = piece[hold.at - pos :], hold.at, None
                        self._send(piece)
                        pos += len(piece)
                        if rate:
                            time.sleep(len(piece) / rate)
                except OSError:
                    pass

            def _send(self, piece: bytes) -> None:
                self.wfile.write(piece)
                outer.sent[self.path] = outer.sent.get(self.path, 0) + len(piece)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def read(self, path: str) -> bytes | None:
        """The file a request path names: `metadata/NAME`, or `targets/` and a relative path
        (targets may sit in subdirectories), each segment percent-decoded."""
        parts = [unquote(p) for p in path.split("?")[0].strip("/").split("/")]
        depth_ok = len(parts) == 2 if parts[0] == "metadata" else len(parts) >= 2
        if parts[0] not in ("metadata", "targets") or not depth_ok:
            return None
        if any(p in ("", ".", "..") or "/" in p for p in parts[1:]):
            return None
        f = self.directory.joinpath(*parts)
        return f.read_bytes() if f.is_file() else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ControlledRepo:
        self.thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        for hold in self.holds.values():
            hold.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def published(directory: Path, *releases: Path) -> Iterator[ControlledRepo]:
    """A new repository at `directory` with `releases` (artifacts directories) published
    without waves, served."""
    admin.init(directory)
    for release in releases:
        publish.add(directory, release, waves="none")
    with ControlledRepo(directory) as srv:
        yield srv


def _pieces(data: bytes, step: int, endless: bool) -> Iterator[bytes]:
    """`data` in pieces of `step` bytes; then, if endless, zeros (bounded: 4 GiB at most,
    the client stops far earlier)."""
    for pos in range(0, len(data), step):
        yield data[pos : pos + step]
    if endless:
        zeros = bytes(step)
        for _ in range((4 << 30) // step):
            yield zeros
