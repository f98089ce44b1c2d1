"""An HTTP server for a repository under a test's control: serves `metadata/` and
`targets/` of a `kiln repo` directory like `kiln repo serve`, but each response can be
replaced, slowed down or made endless, to play a slow link or a malicious mirror."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from kiln.repo.serve import RepoUrls

# A hook gets (path, the file's bytes or None) and returns bytes to send, or None for 404.
Hook = Callable[[str, bytes | None], bytes | None]


class ControlledRepo(RepoUrls):
    def __init__(self, directory: Path, *, rate: int | None = None) -> None:
        self.directory = directory
        self.rate = rate  # bytes per second for every response (None: as fast as possible)
        self.hooks: dict[str, Hook] = {}  # by request path, e.g. "/metadata/timestamp.json"
        self.endless: set[str] = set()  # paths answered with an endless body
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(self.path)
                if self.path in outer.endless:
                    self.send_response(200)
                    self.end_headers()
                    try:
                        for _ in range(1 << 16):  # bounded: 4 GiB at most, the client stops far earlier
                            self.wfile.write(b"\0" * 65536)
                    except OSError:
                        pass
                    return
                data = outer.read(self.path)
                if self.path in outer.hooks:
                    data = outer.hooks[self.path](self.path, data)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                step = 64 * 1024
                try:
                    for pos in range(0, len(data), step):
                        self.wfile.write(data[pos : pos + step])
                        if outer.rate:
                            time.sleep(step / outer.rate)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def read(self, path: str) -> bytes | None:
        parts = path.split("?")[0].strip("/").split("/")
        if len(parts) != 2 or parts[0] not in ("metadata", "targets") or parts[1] in ("", ".", ".."):
            return None
        f = self.directory / parts[0] / parts[1]
        return f.read_bytes() if f.is_file() else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ControlledRepo:
        self.thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
