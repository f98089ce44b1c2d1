"""Registries and container runtimes for the OCI tests, all private and on 127.0.0.1.

- `serving_kiln_images(base)`: builds the admin and httpd images, starts a LocalRegistry
  and pushes both; what a session fixture hands out (`OciRegistry`).
- `write_htpasswd`: a bcrypt htpasswd file for docker-registry's Basic auth.
- `tls_files`: a self-signed certificate and key for a registry serving HTTPS.
- `TokenServer`: a token server (the distribution token auth flow) whose ES256 JWTs
  docker-registry trusts through a self-signed certificate.
- `Containerd`: a containerd of our own (root, state, socket under a test directory), and
  `ctr` against it; stopping it ends only the processes it started.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from kiln.core.run import CommandError, run, which
from kiln.oci.build import build_spec
from kiln.oci.push import push
from kiln.oci.registry import LocalRegistry
from kiln.oci.spec import load_spec
from kiln.vm.qemu import end_process_group

CONTAINERS = Path(__file__).resolve().parents[1] / "variants" / "containers"


@dataclass(frozen=True)
class PushedImage:
    name: str  # kiln/admin
    tag: str
    ref: str  # 127.0.0.1:PORT/kiln/admin:1
    digest: str  # the manifest's sha256 digest
    layout: Path  # the OCI layout it was pushed from


@dataclass(frozen=True)
class OciRegistry:
    """A running LocalRegistry holding Kiln's container images, by spec name."""

    address: str  # 127.0.0.1:PORT
    port: int
    images: Mapping[str, PushedImage]  # "admin", "httpd"

    @property
    def refs(self) -> dict[str, str]:
        return {key: image.ref for key, image in self.images.items()}

    @property
    def digests(self) -> dict[str, str]:
        return {key: image.digest for key, image in self.images.items()}


@contextlib.contextmanager
def serving_kiln_images(base: Path, specs: tuple[str, ...] = ("admin", "httpd")) -> Iterator[OciRegistry]:
    """Build variants/containers/<spec>.toml for each spec, serve a registry under `base`
    and push them there; the registry stops when the block ends."""
    built = {s: build_spec(load_spec(CONTAINERS / f"{s}.toml"), base / "layouts" / s) for s in specs}
    with LocalRegistry(base / "registry") as reg:
        images = {}
        for key, result in built.items():
            ref = f"{reg.address}/{result.name}:{result.tag}"
            pushed = push(result.output, ref, plain_http=True)
            images[key] = PushedImage(result.name, result.tag, ref, pushed.digest, result.output)
        yield OciRegistry(reg.address, reg.port, images)


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    import bcrypt

    lines = [f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n" for user, pw in users.items()]
    path.write_text("".join(lines))
    return path


def self_signed(common_name: str, ip: str | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A P-256 key and a self-signed certificate for it, valid for a day (with `ip` as its
    subject alternative name, for a TLS server)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
    )
    if ip is not None:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(san, critical=False)
    return key, builder.sign(key, hashes.SHA256())


def tls_files(directory: Path, ip: str = "127.0.0.1") -> tuple[Path, Path]:
    """(certificate, key) PEM files for a TLS server on `ip`; the certificate is its own CA."""
    key, cert = self_signed(ip, ip)
    cert_path, key_path = directory / "tls-cert.pem", directory / "tls-key.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return cert_path, key_path


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry tokens to the users it knows (Basic auth on GET /token), granting
    whatever repository scope is asked for; `requests` records each query."""

    service = "kiln-test-registry"
    issuer = "kiln-test-token-server"

    def __init__(self, directory: Path, users: Mapping[str, str]) -> None:
        self.users = dict(users)
        self.requests: list[dict[str, list[str]]] = []
        self._key, cert = self_signed(self.issuer)
        self.cert_pem = directory / "token-cert.pem"
        self.cert_pem.write_bytes(cert.public_bytes(Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(Encoding.DER)).decode()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                outer.requests.append(query)
                if not outer._authorized(self.headers.get("Authorization", "")):
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"token": outer.token(query.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def registry_config(self) -> dict[str, Any]:
        """The `auth` section for LocalRegistry(extra=...)."""
        return {"auth": {"token": {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                                   "rootcertbundle": str(self.cert_pem)}}}

    def _authorized(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme != "Basic":
            return False
        user, _, password = base64.b64decode(value).decode().partition(":")
        return self.users.get(user) == password

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {"iss": self.issuer, "sub": "test", "aud": self.service, "iat": now, "nbf": now - 60,
                  "exp": now + 600, "jti": str(uuid.uuid4()), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def __enter__(self) -> TokenServer:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()


CONTAINERD_CONFIG = """\
version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
"""


class Containerd:
    """A private containerd under `directory`; `ctr(...)` talks to it in `namespace`."""

    def __init__(self, directory: Path, namespace: str = "test") -> None:
        self.dir = directory
        self.namespace = namespace
        # A unix socket path has at most 107 bytes: a deep test directory gets a short one.
        self._short = None if len(str(directory)) < 80 else Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
        self.socket = (self._short or directory) / "containerd.sock"
        self.log = directory / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def ctr(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return run(["ctr", "-a", str(self.socket), "-n", self.namespace, *args], timeout=timeout, check=check)

    def start(self) -> Containerd:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "config.toml"
        config.write_text(CONTAINERD_CONFIG.format(dir=self.dir, socket=self.socket))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([which("containerd"), "--config", str(config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.socket.exists() and self.ctr("version", timeout=5, check=False).returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"containerd did not come up; see {self.log}:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Kill and delete every task of ours (their shims live outside containerd's process
        group), then SIGTERM containerd's own group, SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(CommandError):
                for task in self.ctr("tasks", "ls", "-q", timeout=10).stdout.decode().split():
                    self.ctr("tasks", "kill", "-s", "SIGKILL", task, timeout=10, check=False)
                    self.ctr("tasks", "delete", "--force", task, timeout=10, check=False)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        end_process_group(proc)
        if self._short is not None:
            shutil.rmtree(self._short, ignore_errors=True)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class _Refusing(BaseHTTPRequestHandler):
    """Answers every request with 403 and a distribution-style error body."""

    def do_GET(self) -> None:
        body = b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def refusing_registry() -> Iterator[int]:
    """A "registry" on 127.0.0.1 that refuses everyone (403); yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)

