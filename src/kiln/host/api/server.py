"""The API transport: HTTP/1.1 on the local Unix socket and, optionally, HTTPS with client certs.

The local socket belongs to kiln-agent.socket (/run/kiln/api.sock, mode 0660, group `api`),
so clients connect at once while the agent starts or restarts. The remote listener serves
the same routes over TLS, requiring a client certificate from the fleet CA; the
certificate's role decides what the client may do. Both run in the host agent
(kiln.host.agent); `python3 -m kiln.host.api.server [--remote]` runs one alone.

Both are threaded stdlib servers: requests are short, the datastore serialises writers, and
a slow or broken client costs one thread until its timeout, never the server.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import socketserver
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.host.api import grammar, limits
from kiln.host.api.routes import MAX_BODY, Api, ApiError, Request, role_refusal
from kiln.host.datastore import Datastore

if TYPE_CHECKING:
    from kiln.host.update.control import Launcher, UpdateControl

log = logging.getLogger("kiln.api")
SOCKET = Path("/run/kiln/api.sock")
REMOTE_CONFIG = Path("/etc/kiln/api-remote.json")
DEFAULT_REMOTE_PORT = 50000
CLIENT_TIMEOUT = 30.0
HANDSHAKE_DEADLINE = 5.0


class _Handler(limits.HeadLimited):
    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT
    server: _ServerMixin  # type: ignore[assignment]

    def version_string(self) -> str:
        return "kiln-api"

    def address_string(self) -> str:  # AF_UNIX peers have no address; the stdlib would crash
        return "local" if isinstance(self.client_address, str | bytes) else str(self.client_address[0])

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok and not hasattr(self, "do_" + self.command):
            # Any other method goes to the routes too (405 or 404 in JSON), not the stdlib's 501 page.
            setattr(self, "do_" + self.command, self._serve)
        return ok

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (bad request line, headers too long) in the API's JSON shape."""
        self.close_connection = True
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:  # the client's fault, not the server's
            code = HTTPStatus.BAD_REQUEST
        self._send(code, ApiError(code, explain or message or HTTPStatus(code).phrase).body())

    def _send(self, status: int, body: Any, encoded: bytes | None = None, allow: str | None = None) -> None:
        """Status line, headers and body in one write (one syscall, one packet)."""
        data = encoded if encoded is not None else b"" if body is None else json.dumps(body).encode() + b"\n"
        head = [
            f"{self.protocol_version} {status} {HTTPStatus(status).phrase}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            f"Content-Length: {len(data)}",
        ]
        if allow:
            head.append(f"Allow: {allow}")
        if data:
            head.append("Content-Type: application/json")
        if self.close_connection:
            head.append("Connection: close")
        self.log_request(status)
        payload = data if self.command != "HEAD" else b""
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)

    def _read_body(self) -> bytes:
        """The body per its one Content-Length; anything ambiguous or cut off is refused, never guessed."""
        lengths = set(self.headers.get_all("Content-Length") or ())
        if len(lengths) > 1:  # which body is meant? (RFC 9112 6.3)
            raise ApiError(400, "conflicting Content-Length headers")
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length")
        length = self.headers.get("Content-Length") or "0"
        if not (length.isascii() and length.isdigit()):  # "²".isdigit() is True, int("²") fails
            raise ApiError(400, f"Content-Length '{length}' is not a byte count")
        size = int(length)
        if size > MAX_BODY:
            raise ApiError(413, f"body must be 0..{MAX_BODY} bytes")
        body = self.rfile.read(size) if size else b""
        if len(body) != size:  # the client stopped sending: never act on a cut-off body
            raise ApiError(400, f"body ended after {len(body)} of {size} bytes")
        return body

    def _serve(self) -> None:
        try:
            role = self.server.role_of(self.connection)
            if role is None:
                raise ApiError(403, "client certificate carries no Kiln role")
            refused = role_refusal(role, self.command, self.path)
            if refused is not None:  # before the body: a reader cannot make the server hold one
                raise refused
            body = self._read_body()
            try:
                connection = ", ".join(self.headers.get_all("Connection") or ())
                upgrade = grammar.upgrade_protocol(connection, self.headers.get("Upgrade"))
                req = Request.from_target(self.command, self.path, body, role, upgrade)
            except ValueError as e:  # urlsplit: an absolute-form target with a broken host part
                raise ApiError(400, f"malformed request target: {e}") from None
        except ApiError as e:
            self.close_connection = True
            self._send(e.status, e.body())
            return
        resp = self.server.api.handle(req)
        if resp.status == HTTPStatus.SWITCHING_PROTOCOLS and resp.upgrade is not None:
            self._switch(req.upgrade, resp.upgrade)
            return
        self._send(resp.status, resp.body, resp.encoded, resp.allow)
        self.wfile.flush()
        if resp.after is not None:
            resp.after()

    def _switch(self, protocol: str, session: Callable[[socket.socket], None]) -> None:
        """Answer 101 and hand the connection to `session` (an exec stream) until it ends."""
        self.close_connection = True
        self.log_request(101)
        self.wfile.write(f"{self.protocol_version} 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         f"Upgrade: {protocol}\r\n\r\n".encode("latin-1"))
        self.wfile.flush()
        session(self.connection)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve


class _ServerMixin(socketserver.ThreadingMixIn):
    daemon_threads = False  # server_close() waits for in-flight requests on shutdown
    block_on_close = True
    # socketserver's default backlog is 5: a 6th client connecting at once to a Unix socket
    # gets EAGAIN, not a wait (systemd's socket unit uses SOMAXCONN; match it when we bind).
    request_queue_size = socket.SOMAXCONN
    # At most this many connections are served at once; more are closed on arrival, so idle
    # or stalled peers cannot pile up threads.
    max_connections = limits.SERVED
    api: Api

    def role_of(self, conn: socket.socket) -> str | None:
        return "admin"  # the local socket: its mode and group are the access control

    def admit(self, request: Any, client_address: Any) -> bool:
        """Take what a new connection holds from its arrival (here: a served slot)."""
        return self.take(request, self.budget("served", self.max_connections))

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.admit(request, client_address):
            log.warning("connection from %s over the limits: closed on arrival", client_address or "local")
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.give_all(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.give_all(request)

    # Each connection's holdings, returned to the budget each came from (a budget resized by a
    # test while connections hold it gets its own back).

    def budget(self, name: str, total: int, each: int = 0) -> limits.Budget:
        budgets: dict[str, limits.Budget] = self.__dict__.setdefault("_budgets", {})
        b = budgets.get(name)
        if b is None or (b.total, b.each) != (total, each):
            b = budgets[name] = limits.Budget(total, each)
        return b

    def take(self, request: Any, budget: limits.Budget, key: str = "") -> bool:
        if not budget.take(key):
            return False
        self._holds.setdefault(id(request), []).append((budget, key))
        return True

    def give(self, request: Any, budget: limits.Budget) -> None:
        held = self._holds.get(id(request), [])
        for i, (b, key) in enumerate(held):
            if b is budget:
                del held[i]
                b.give(key)
                return

    def give_all(self, request: Any) -> None:
        for b, key in self._holds.pop(id(request), []):
            b.give(key)

    @property
    def _holds(self) -> dict[int, list[tuple[limits.Budget, str]]]:
        holds: dict[int, list[tuple[limits.Budget, str]]] = self.__dict__.setdefault("_holds_by_request", {})
        return holds


class LocalServer(_ServerMixin, socketserver.UnixStreamServer):
    def __init__(self, api: Api, path: Path | None = SOCKET, fd: int | None = None) -> None:
        self.api = api
        if fd is not None:  # socket activation: systemd already bound and listens
            super().__init__(str(path), _Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = socket.socket(fileno=fd)
        else:
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                path.unlink()
            super().__init__(str(path), _Handler)
            os.chmod(path, 0o660)


class RemoteServer(_ServerMixin, socketserver.TCPServer):
    """HTTPS with mandatory client certificates; the handshake runs in the request's thread."""

    allow_reuse_address = True

    def __init__(self, api: Api, ctx: ssl.SSLContext, host: str, port: int) -> None:
        self.api = api
        self.ctx = ctx
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler, bind_and_activate=False)
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.server_bind()
        self.server_activate()

    def admit(self, request: Any, client_address: Any) -> bool:
        """A new connection holds a handshake slot, never a served one: it has proved nothing yet."""
        handshakes = self.budget("handshakes", limits.HANDSHAKES, limits.HANDSHAKES_PER_SOURCE)
        return self.take(request, handshakes, _source(client_address))

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CLIENT_TIMEOUT)
        # The timeout is per receive; a peer sending a byte now and then would never hit it.
        # The handshake (before any certificate is seen) gets a deadline for the whole of it.
        cutter = _HandshakeDeadline(request.fileno())
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.info("TLS handshake with %s refused: %s", client_address, e)
            return
        finally:
            cutter.done()
            self.give(request, self.budget("handshakes", limits.HANDSHAKES, limits.HANDSHAKES_PER_SOURCE))
        try:
            if self._serve_slot(request, tls, client_address):
                super().finish_request(tls, client_address)
        finally:
            with contextlib.suppress(ssl.SSLError, OSError):
                tls.unwrap()

    def _serve_slot(self, request: Any, tls: ssl.SSLSocket, client_address: Any) -> bool:
        """A served slot, within the identity's share; refused connections are closed unanswered."""
        from kiln.host.api.tls import peer_identity

        ident = peer_identity(tls)
        name = ident[0] if ident else ""  # no role: served once, to be told 403
        if not self.take(request, self.budget("served", self.max_connections)):
            log.warning("%d connections already served: closing %s", self.max_connections, client_address)
            return False
        if not self.take(request, self.budget("identity", self.max_connections, limits.PER_IDENTITY), name):
            log.warning("'%s' already holds %d connections: closing %s", name, limits.PER_IDENTITY, client_address)
            return False
        return True

    def role_of(self, conn: socket.socket) -> str | None:
        from kiln.host.api.tls import peer_identity

        ident = peer_identity(conn) if isinstance(conn, ssl.SSLSocket) else None
        return None if ident is None else ident[1]


def _source(client_address: Any) -> str:
    """The peer's address without the port, an IPv4 peer on a dual-stack socket as plain IPv4."""
    host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
    return host.removeprefix("::ffff:")


class _HandshakeDeadline:
    """Shut a connection down if its handshake is still running after HANDSHAKE_DEADLINE.

    Works on the file descriptor: wrap_socket detaches the original socket object. The lock
    makes sure the descriptor is only touched while the handshake (which owns it) runs.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.finished = False
        self.timer = threading.Timer(HANDSHAKE_DEADLINE, self._cut)
        self.timer.daemon = True
        self.timer.start()

    def _cut(self) -> None:
        with self.lock:
            if self.finished:
                return
            s = socket.socket(fileno=self.fd)
            try:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            finally:
                s.detach()  # the handshake's socket still owns (and closes) the descriptor

    def done(self) -> None:
        with self.lock:
            self.finished = True
        self.timer.cancel()


def activated_fd() -> int | None:
    """The listening socket systemd passed us (LISTEN_FDS), if any."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        return 3
    return None


def serve(server: socketserver.BaseServer) -> None:
    """Serve until SIGTERM/SIGINT, then finish the requests in flight and return."""

    def stop(_sig: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gc.freeze()  # start-up objects never die: keep them out of every collection (tail latency)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        api = getattr(server, "api", None)
        if isinstance(api, Api):
            api.close()
        server.server_close()


def _reboot() -> None:
    from kiln.core.run import run

    run(["systemctl", "reboot"], check=False)


def remote_config(path: Path = REMOTE_CONFIG) -> dict[str, Any] | None:
    """The rendered remote-API settings, or None when the listener is off."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    if not text.strip():
        return None
    cfg: dict[str, Any] = json.loads(text)
    return cfg


def make_api(store: Datastore | None = None, launch: Launcher | None = None) -> Api:
    """The routes over the host's datastore, render cache and update control: one `Api`
    serves the local socket and the mTLS listener alike. `launch` runs update commands
    (the agent: a thread of its own; default: a process per command)."""
    from kiln.host.render.cache import RenderCache

    def updates() -> UpdateControl:
        from kiln.host.update.control import UpdateControl

        return UpdateControl() if launch is None else UpdateControl(launch=launch)

    return Api(store or Datastore(), reboot=_reboot, cache=RenderCache(), updates=updates)


def remote_server(api: Api, config: Path = REMOTE_CONFIG, address: str | None = None) -> RemoteServer | None:
    """The mTLS listener per the rendered `config`, bound; None when it is off."""
    cfg = remote_config(config)
    if cfg is None:
        return None
    from kiln.host.api.tls import CRL_FILE, server_context

    # The CRL is rendered beside the config, and followed without a restart.
    ctx = server_context(cfg["ca"], cfg["certificate"], cfg["key"], crl_file=config.with_name(CRL_FILE.name))
    port = int(cfg.get("port") or DEFAULT_REMOTE_PORT)
    if address:
        server = RemoteServer(api, ctx, address, port)
    else:
        try:
            server = RemoteServer(api, ctx, "::", port)
        except OSError:  # no IPv6 on this host
            server = RemoteServer(api, ctx, "0.0.0.0", port)
    log.info("remote API listening on port %d (mutual TLS)", server.server_address[1])
    return server


def main(argv: Sequence[str] | None = None) -> int:
    """One server on its own (tests, development); on a host both run in kiln.host.agent."""
    p = argparse.ArgumentParser(prog="kiln-apiserver")
    p.add_argument("--socket", type=Path, default=SOCKET)
    p.add_argument("--datastore", type=Path, default=None)
    p.add_argument("--remote", action="store_true", help="serve HTTPS with client certificates instead")
    p.add_argument("--remote-config", type=Path, default=REMOTE_CONFIG)
    p.add_argument("--address", default=None, help="the remote listener's address (default: every one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    api = make_api(Datastore(args.datastore) if args.datastore else None)
    server: socketserver.BaseServer | None
    if args.remote:
        server = remote_server(api, args.remote_config, args.address)
        if server is None:
            log.info("remote API disabled (no node TLS material in settings.api.remote)")
            return 0
    else:
        server = LocalServer(api, args.socket, activated_fd())
    serve(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
