"""`kiln fleet serve`: a FleetLock v1 server whose state lives in etcd.

The protocol is zincati's (docs/development/fleetlock/protocol.md), exactly:

    POST /v1/pre-reboot     RecursiveLock   take (or keep) a reboot slot
    POST /v1/steady-state   UnlockIfHeld    give it back
    header  fleet-lock-protocol: true
    body    {"client_params": {"id": "...", "group": "..."}}   (older clients: "node_uuid")

200 is success; anything else is a JSON `{"kind", "value"}` with a kind from `KINDS`.
Kiln's extensions, which a plain FleetLock client never calls: `POST /v1/report` (what a
host runs and why its update failed), `POST /v1/release` (an operator frees a host's
slot), `GET /v1/status`, `GET /metrics` (Prometheus text). A Kiln host also puts a
`"kiln": {"version": ...}` member in its lock requests; other servers ignore it.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kiln.fleet import semaphore as sem
from kiln.fleet.config import GROUP_RE
from kiln.fleet.dashboard import DASHBOARD_FILES, dashboard_file
from kiln.fleet.etcd import EtcdUnavailable
from kiln.fleet.hosts import FleetHosts, HostReport, TooManyHosts
from kiln.fleet.locks import Contended, FleetLocks
from kiln.fleet.release import ReleaseSource
from kiln.host.api.limits import Budget, HeadLimited

log = logging.getLogger("kiln.fleet")

MAX_BODY = 64 * 1024
SAMPLE_EVERY = timedelta(minutes=1)  # a point of the fleet's versions over time
MAX_ID = 256
KINDS = (  # the bounded set of error kinds (FleetLock asks clients to count them)
    "missing_header", "failed_decoding_request", "invalid_client_identity", "invalid_group",
    "request_too_large", "not_found", "method_not_allowed", "failed_lock_semaphore_full",
    "etcd_unavailable", "contended", "internal_error", "too_many_hosts",
)
POST_PATHS = ("/v1/pre-reboot", "/v1/steady-state", "/v1/report", "/v1/release")
GET_PATHS = ("/v1/status", "/v1/hosts", "/metrics", *DASHBOARD_FILES)


class Refused(Exception):
    def __init__(self, status: HTTPStatus, kind: str, value: str) -> None:
        assert kind in KINDS, kind
        super().__init__(value)
        self.status, self.kind, self.value = status, kind, value


@dataclass(frozen=True)
class Client:
    id: str
    group: str
    version: str | None
    failure: str | None
    kiln: dict[str, Any] = field(default_factory=dict)  # a Kiln host's report (kiln.fleet.hosts)


def parse_request(headers: dict[str, str], body: bytes) -> Client:
    """The client's identity from a FleetLock request, or Refused naming what is wrong."""
    if headers.get("fleet-lock-protocol", "").strip().lower() != "true":
        raise Refused(HTTPStatus.BAD_REQUEST, "missing_header", "header 'fleet-lock-protocol: true' is required")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(HTTPStatus.BAD_REQUEST, "failed_decoding_request", f"body is not JSON: {e}") from None
    params = doc.get("client_params") if isinstance(doc, dict) else None
    if not isinstance(params, dict):
        raise Refused(HTTPStatus.BAD_REQUEST, "failed_decoding_request", "body: 'client_params' object missing")
    host = params.get("id", params.get("node_uuid"))
    if not isinstance(host, str) or not host or len(host) > MAX_ID or not host.isprintable() or host != host.strip():
        raise Refused(HTTPStatus.BAD_REQUEST, "invalid_client_identity",
                      f"client_params.id: expected a non-empty string of at most {MAX_ID} printable characters")
    group = params.get("group")
    if not isinstance(group, str) or not GROUP_RE.fullmatch(group):
        raise Refused(HTTPStatus.BAD_REQUEST, "invalid_group",
                      "client_params.group: expected a non-empty name of letters, digits, '.' and '-'")
    kiln = doc.get("kiln") if isinstance(doc.get("kiln"), dict) else {}
    version, failure = kiln.get("version"), kiln.get("failure")
    return Client(
        host, group,
        version[:64] if isinstance(version, str) else None,
        failure if isinstance(failure, str) and failure else None,
        kiln,
    )


class Metrics:
    """Counters of this server process (each of several servers counts its own requests)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.waiting: dict[tuple[str, str], float] = {}  # first refusal, per (group, id)
        self.wait_sum = 0.0
        self.wait_count = 0

    def count(self, endpoint: str, kind: str) -> None:
        with self.lock:
            self.requests[(endpoint, kind)] += 1

    def refused(self, c: Client) -> None:
        with self.lock:
            self.waiting.setdefault((c.group, c.id), time.monotonic())

    def granted(self, c: Client) -> None:
        with self.lock:
            since = self.waiting.pop((c.group, c.id), None)  # None: granted at the first ask
            self.wait_sum += time.monotonic() - since if since is not None else 0.0
            self.wait_count += 1

    def render(self, status: dict[str, Any]) -> str:
        lines = [
            "# HELP kiln_fleet_requests_total FleetLock requests answered by this server, by endpoint and result.",
            "# TYPE kiln_fleet_requests_total counter",
        ]
        with self.lock:
            for (endpoint, kind), n in sorted(self.requests.items()):
                lines.append(f'kiln_fleet_requests_total{{endpoint="{endpoint}",kind="{kind}"}} {n}')
            lines += [
                "# HELP kiln_fleet_lock_wait_seconds From a host's first refused pre-reboot to its slot (this server).",
                "# TYPE kiln_fleet_lock_wait_seconds summary",
                f"kiln_fleet_lock_wait_seconds_sum {self.wait_sum:.3f}",
                f"kiln_fleet_lock_wait_seconds_count {self.wait_count}",
            ]
        for name, what in (("slots", "slots"), ("holders", "holders"), ("failed", "failed holders")):
            lines += [f"# HELP kiln_fleet_{name} Reboot {what} per group.", f"# TYPE kiln_fleet_{name} gauge"]
            for g in status["groups"]:
                if "error" in g:
                    continue
                value = {"slots": g["slots"], "holders": len(g["holders"]),
                         "failed": sum(1 for h in g["holders"] if h["failure"])}[name]
                lines.append(f'kiln_fleet_{name}{{group="{g["group"]}"}} {value}')
        for by, label in (("versions", "version"), ("states", "state")):
            if "hosts" not in status:
                break
            lines += [f"# HELP kiln_fleet_hosts_by_{label} Hosts per group and {label}, as they last reported.",
                      f"# TYPE kiln_fleet_hosts_by_{label} gauge"]
            for group, counts in status["hosts"]["groups"].items():
                for value, n in sorted(counts[by].items()):
                    lines.append(f'kiln_fleet_hosts_by_{label}{{group="{group}",{label}="{_label(value)}"}} {n}')
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class FleetLockService:
    """The transport-free server: a path, headers and body in; a status and a JSON body out."""

    def __init__(self, locks: FleetLocks, hosts: FleetHosts | None = None,
                 release: ReleaseSource | None = None) -> None:
        self.locks = locks
        self.hosts = hosts
        self.release = release
        self.metrics = Metrics()

    def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        endpoint = path.removeprefix("/v1/")
        try:
            c = parse_request(headers, body)
            status, answer = self._act(endpoint, c)
        except Refused as r:
            status, answer = r.status, {"kind": r.kind, "value": r.value}
        except EtcdUnavailable as e:
            status, answer = HTTPStatus.SERVICE_UNAVAILABLE, {"kind": "etcd_unavailable", "value": str(e)}
        except Contended as e:
            status, answer = HTTPStatus.SERVICE_UNAVAILABLE, {"kind": "contended", "value": str(e)}
        self.metrics.count(endpoint, answer["kind"])
        return status, answer

    def _keep(self, c: Client, *, required: bool) -> None:
        """The host's report into the fleet's view. Riding on a lock request it never changes
        the answer (`required` False: a failure is logged); on /v1/report it is the answer."""
        if self.hosts is None or not c.kiln:
            return
        try:
            self.hosts.put(HostReport.from_request(c.id, c.group, c.kiln, self.locks.now()))
        except TooManyHosts as e:
            if required:
                raise Refused(HTTPStatus.TOO_MANY_REQUESTS, "too_many_hosts", str(e)) from None
            log.warning("fleet: %s", e)
        except EtcdUnavailable as e:
            if required:
                raise
            log.warning("fleet: the report of %s was not kept: %s", c.id, e)

    def _act(self, endpoint: str, c: Client) -> tuple[int, dict[str, Any]]:
        if endpoint == "pre-reboot":
            self._keep(c, required=False)
            outcome, s = self.locks.lock(c.group, c.id, c.version)
            if outcome is sem.Outcome.FULL:
                self.metrics.refused(c)
                holders = ", ".join(h.id for h in s.holders) or "none"
                raise Refused(HTTPStatus.LOCKED, "failed_lock_semaphore_full",
                              f"group {c.group}: all {s.total_slots} slots held (by {holders})")
            if outcome is sem.Outcome.GRANTED:
                self.metrics.granted(c)
            return HTTPStatus.OK, {"kind": outcome.value, "value": f"group {c.group}: slot held by {c.id}"}
        if endpoint in ("steady-state", "release"):
            outcome, _ = self.locks.unlock(c.group, c.id, by="operator" if endpoint == "release" else None)
            return HTTPStatus.OK, {"kind": outcome.value, "value": f"group {c.group}: {c.id} holds no slot"}
        # report: "held" tells a host that keeps its slot after a failure whether it still does
        self._keep(c, required=True)
        s = self.locks.report(c.group, c.id, version=c.version, failure=c.failure)
        held = s.holder(c.id) is not None
        return HTTPStatus.OK, {"kind": "reported", "value": f"group {c.group}: report from {c.id} kept", "held": held}

    def get(self, target: str) -> tuple[int, str, bytes]:
        url = urllib.parse.urlsplit(target)
        if url.path in DASHBOARD_FILES:
            name, ctype = DASHBOARD_FILES[url.path]
            return HTTPStatus.OK, ctype, dashboard_file(name)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            if url.path == "/v1/hosts":
                return self._json(HTTPStatus.OK, self._hosts(query))
            status = self.locks.status()
            if self.hosts is not None:
                status["hosts"] = self.hosts.summary()
                status["history"] = self.hosts.history()
            if self.release is not None:
                status["release"] = self.release.view()
        except EtcdUnavailable as e:
            return self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"kind": "etcd_unavailable", "value": str(e)})
        except Refused as r:
            return self._json(r.status, {"kind": r.kind, "value": r.value})
        if url.path == "/metrics":
            return HTTPStatus.OK, "text/plain; version=0.0.4", self.metrics.render(status).encode()
        return self._json(HTTPStatus.OK, status)

    @staticmethod
    def _json(status: int, doc: dict[str, Any]) -> tuple[int, str, bytes]:
        return status, "application/json", json.dumps(doc, indent=1).encode()

    def _hosts(self, query: dict[str, str]) -> dict[str, Any]:
        if self.hosts is None:
            raise Refused(HTTPStatus.NOT_FOUND, "not_found", "this server keeps no host reports")
        try:
            limit, offset = int(query.get("limit", "200")), int(query.get("offset", "0"))
        except ValueError:
            raise Refused(HTTPStatus.BAD_REQUEST, "failed_decoding_request",
                          "limit and offset are whole numbers") from None
        if not (1 <= limit <= 1000 and offset >= 0):
            raise Refused(HTTPStatus.BAD_REQUEST, "failed_decoding_request", "limit is 1..1000, offset 0 or more")
        return self.hosts.select(group=query.get("group") or None, state=query.get("state") or None,
                                 version=query.get("version") or None, text=query.get("q") or None,
                                 limit=limit, offset=offset)


def make_handler(service: FleetLockService) -> type[BaseHTTPRequestHandler]:
    class Handler(HeadLimited):
        server_version = "kiln-fleet"
        sys_version = ""
        protocol_version = "HTTP/1.1"
        timeout = 30  # a client that stops sending mid-request does not keep a thread forever

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.client_address[0], *args)

        def _send(self, status: int, ctype: str, body: bytes, allow: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if allow:
                self.send_header("Allow", allow)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, doc: dict[str, Any], allow: str | None = None) -> None:
            self._send(status, "application/json", json.dumps(doc).encode() + b"\n", allow)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The stdlib's refusals (a broken request line, a head over its cap) as FleetLock errors."""
            self.close_connection = True
            kind = "request_too_large" if code in (414, 431) else "failed_decoding_request"
            self._json(400 if code == 505 else code, {"kind": kind, "value": explain or message or str(code)})

        def do_POST(self) -> None:
            if self.path not in POST_PATHS:
                return self._not_here("POST")
            raw = self.headers.get("Content-Length", "0")
            if not (raw.isascii() and raw.isdigit()):
                self.close_connection = True
                return self._json(400, {"kind": "failed_decoding_request", "value": "bad Content-Length"})
            if int(raw) > MAX_BODY:
                self.close_connection = True
                return self._json(413, {"kind": "request_too_large", "value": f"body over {MAX_BODY} bytes"})
            body = self.rfile.read(int(raw))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                status, answer = service.post(self.path, headers, body)
            except Exception:
                log.exception("fleet: %s failed", self.path)
                status, answer = 500, {"kind": "internal_error", "value": "the server failed; see its log"}
            self._json(status, answer)

        def do_GET(self) -> None:
            if urllib.parse.urlsplit(self.path).path not in GET_PATHS:
                return self._not_here("GET")
            try:
                status, ctype, body = service.get(self.path)
            except Exception:
                log.exception("fleet: %s failed", self.path)
                return self._json(500, {"kind": "internal_error", "value": "the server failed; see its log"})
            self._send(status, ctype, body)

        def _not_here(self, method: str) -> None:
            if self.path in POST_PATHS or self.path in GET_PATHS:
                allow = "POST" if self.path in POST_PATHS else "GET"
                return self._json(405, {"kind": "method_not_allowed", "value": f"{self.path} takes {allow}"}, allow)
            return self._json(404, {"kind": "not_found", "value": f"no such endpoint: {method} {self.path}"})

        def do_PUT(self) -> None:
            self._not_here("PUT")

        def do_DELETE(self) -> None:
            self._not_here("DELETE")

    return Handler


class FleetServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    # Connections served at once (a thread each); more are closed on arrival. A fleet's hosts
    # ask once per check interval, so even 100,000 of them stay far below this.
    max_connections = 512
    HANDSHAKE_TIMEOUT = 10.0

    def __init__(self, address: tuple[str, int], service: FleetLockService,
                 tls: ssl.SSLContext | None = None) -> None:
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, make_handler(service))
        self._slots = Budget(self.max_connections)
        self.service = service
        self.tls = tls

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.take():
            log.warning("fleet: %d connections already open: closing one from %s", self.max_connections,
                        client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.give()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.give()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """With TLS, the handshake happens here, in the connection's own thread (a slow
        client never holds up accept), with a deadline."""
        if self.tls is not None:
            request.settimeout(self.HANDSHAKE_TIMEOUT)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                log.debug("fleet: TLS handshake with %s failed: %s", client_address, e)
                return
        super().finish_request(request, client_address)


def tls_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """HTTPS for `kiln fleet serve`; with `client_ca`, only clients with a certificate it signed."""
    from kiln.core.errors import KilnError

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=client_ca)
    except (ssl.SSLError, OSError) as e:
        raise KilnError(f"fleet server TLS: {cert}, {key}{', ' + client_ca if client_ca else ''}: {e}") from None
    return ctx


def serve(address: tuple[str, int], locks: FleetLocks, ready: Callable[[FleetServer], None] | None = None,
          tls: ssl.SSLContext | None = None, hosts: FleetHosts | None = None, release: ReleaseSource | None = None,
          sample_every: timedelta = SAMPLE_EVERY) -> None:
    """Serve until interrupted; with `hosts`, a point of versions over time every `sample_every`."""
    server = FleetServer(address, FleetLockService(locks, hosts, release), tls)
    stop = threading.Event()
    if hosts is not None:
        threading.Thread(target=_sample, args=(hosts, sample_every, stop), daemon=True, name="history").start()
    if ready:
        ready(server)
    try:
        server.serve_forever()
    finally:
        stop.set()
        server.server_close()


def _sample(hosts: FleetHosts, every: timedelta, stop: threading.Event) -> None:
    while not stop.wait(every.total_seconds()):
        try:
            hosts.record_history(every)
        except (EtcdUnavailable, Contended) as e:
            log.warning("fleet: no history point this time: %s", e)
