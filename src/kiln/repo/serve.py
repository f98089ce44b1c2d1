"""Serve a repository over HTTP for tests and labs: `DIR/metadata` at `/metadata/` and
`DIR/targets` at `/targets/`, nothing else.

Only GET and HEAD of a single plain file name under one of the two prefixes are answered;
keys, `repo.json`, staged files (dot names), directories and anything with `..`, `/` or
`%2F` in the name get 404. Production repositories belong on a real web server or bucket;
both directories are plain static files.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TextIO
from urllib.parse import unquote, urlsplit

from kiln.repo.metadata import NAME, Layout


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    roots: dict[str, Path]
    log: TextIO | None


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "kiln-repo"
    sys_version = ""

    def _file(self) -> Path | None:
        parts = urlsplit(self.path).path.split("/")
        if len(parts) != 3 or parts[0] != "" or parts[1] not in self.server.roots:
            return None
        name = unquote(parts[2])
        if not NAME.fullmatch(name):
            return None
        base = self.server.roots[parts[1]]
        path = base / name
        if path.is_symlink() or not path.is_file() or path.resolve().parent != base.resolve():
            return None
        return path

    def _respond(self, body: bool) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        try:
            f = path.open("rb")
        except OSError:
            self.send_error(404)
            return
        with f:
            size = path.stat().st_size
            self.send_response(200)
            kind = "application/json" if path.suffix == ".json" else "application/octet-stream"
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(size))
            self.send_header("Cache-Control", "no-cache" if path.parent.name == "metadata" else "max-age=3600")
            self.end_headers()
            if body:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    shutil.copyfileobj(f, self.wfile, 1 << 20)

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def log_error(self, format: str, *args: object) -> None:
        pass  # the request line, logged next, carries the status

    def log_message(self, format: str, *args: object) -> None:
        if self.server.log is not None:
            print(f"{self.address_string()} {format % args}", file=self.server.log, flush=True)


class RepoUrls:
    """The two TUF base URLs below a server's base URL (`kiln repo serve`'s layout)."""

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def metadata_url(self) -> str:
        return f"{self.url}/metadata/"

    @property
    def targets_url(self) -> str:
        return f"{self.url}/targets/"


class RepoServer(RepoUrls):
    """`with RepoServer(DIR) as srv:` serves DIR in a background thread; `srv.url` is the
    base URL (`srv.metadata_url`, `srv.targets_url` the two TUF base URLs)."""

    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 0, log: TextIO | None = None) -> None:
        layout = Layout(Path(directory))
        layout.require()
        self._server = (_Server6 if ":" in host else _Server)((host.strip("[]"), port), _Handler)
        self._server.roots = {"metadata": layout.metadata, "targets": layout.targets}
        self._server.log = log
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        host = str(host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> RepoServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="kiln-repo-serve", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> None:
        """Block until stopped (Ctrl-C in the CLI)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> RepoServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
