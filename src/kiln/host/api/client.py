"""The API client (Bottlerocket's apiclient library): one small class, two transports.

On the host it talks HTTP over /run/kiln/api.sock; from a workstation it talks HTTPS with
a client certificate to the remote listener. Errors are split the python-tuf way:
`ApiUnreachable` when no answer came (the network failed), `ApiRefused` when the server
answered with an error (it said no, with its reason).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError

SOCKET = Path("/run/kiln/api.sock")
TIMEOUT = 120.0  # an apply restarts services; under emulation that takes a while
_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_REVOKED = 23  # X509_V_ERR_CERT_REVOKED


class ApiUnreachable(KilnError):
    """No response: the socket or endpoint is missing, refused, or timed out."""


class ApiRefused(KilnError):
    """The server answered with an error status."""

    def __init__(self, status: int, body: Any) -> None:
        detail = body.get("detail") if isinstance(body, dict) else None
        path = body.get("path") if isinstance(body, dict) else None
        msg = f"API refused ({status}): {detail or body}" + (f" [at {path}]" if path else "")
        super().__init__(msg)
        self.status = status
        self.body = body


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(str(self.path))
        self.sock = s


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPS that checks the certificate against `server_name` rather than the host dialled:
    a node reached through a port forward or by another address still has to prove its name."""

    def __init__(self, host: str, port: int, server_name: str, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.server_name = server_name
        self.tls_context = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self.tls_context.wrap_socket(self.sock, server_hostname=self.server_name)


@dataclass
class Client:
    """`Client.local()` on the host; `Client.remote(host, port, ssl_context)` from a workstation.

    Remotely, the node's certificate must name `server_name` (default: `host`): a DNS name
    against its DNS SANs, an IP address against its IP SANs.
    """

    socket_path: Path | None = SOCKET
    host: str = ""
    port: int = 0
    context: ssl.SSLContext | None = None
    timeout: float = TIMEOUT
    server_name: str = ""

    @classmethod
    def local(cls, path: Path = SOCKET, timeout: float = TIMEOUT) -> Client:
        return cls(socket_path=path, timeout=timeout)

    @classmethod
    def remote(
        cls, host: str, port: int, context: ssl.SSLContext, timeout: float = TIMEOUT, server_name: str | None = None
    ) -> Client:
        return cls(socket_path=None, host=host, port=port, context=context, timeout=timeout,
                   server_name=server_name or host)

    @property
    def where(self) -> str:
        if self.socket_path:
            return str(self.socket_path)
        named = f" (as {self.server_name})" if self.server_name and self.server_name != self.host else ""
        return f"https://{self.host}:{self.port}{named}"

    def _connection(self) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixConnection(self.socket_path, self.timeout)
        assert self.context is not None
        return _TLSConnection(self.host, self.port, self.server_name or self.host, self.timeout, self.context)

    def _tls_failed(self, e: ssl.SSLError) -> ApiUnreachable:
        """Say which check failed (name, revocation, CA) and what to do about it."""
        if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
            why = e.verify_message
            if e.verify_code in _NAME_MISMATCH:
                hint = (f"the node's certificate does not name {self.server_name}: connect by one of its names, "
                        "or give --node-name NAME (the name it was issued for)")
            elif e.verify_code == _REVOKED:
                hint = "the node's certificate is on the fleet CRL: issue it a new one (kiln pki user-data)"
            else:
                hint = "is the --pki directory the one this host's user data came from?"
            return ApiUnreachable(f"TLS with {self.where} failed: {why}", hint=hint)
        if e.reason == "SSLV3_ALERT_CERTIFICATE_REVOKED":
            return ApiUnreachable(f"TLS with {self.where} failed: the node says this client's certificate is revoked",
                                  hint="use another client certificate (--client), or issue a new one")
        return ApiUnreachable(f"TLS with {self.where} failed: {e.reason or e}",
                              hint="is the --pki directory the one this host's user data came from? "
                                   "(a revoked client certificate is refused too)")

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; the decoded JSON answer (None for 204), or ApiRefused/ApiUnreachable."""
        data = None if body is None else json.dumps(body).encode()
        conn = self._connection()
        try:
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except ssl.SSLError as e:
            raise self._tls_failed(e) from None
        except (OSError, http.client.HTTPException) as e:
            raise ApiUnreachable(f"cannot reach the Kiln API at {self.where}: {e}") from None
        finally:
            conn.close()
        decoded = _decode(raw)
        if resp.status >= 400:
            raise ApiRefused(resp.status, decoded)
        return decoded

    def upgrade(self, path: str, body: Any, protocol: str) -> tuple[socket.socket, bytes]:
        """POST `body` asking to switch to `protocol`; the connected socket once the server
        agreed (101), with any bytes that came after the response head. http.client cannot
        hand over its socket, so this request is written by hand."""
        data = json.dumps(body).encode()
        conn = self._connection()
        try:
            conn.connect()
            sock = conn.sock
            head = (f"POST {path} HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n")
            sock.sendall(head.encode("latin-1") + data)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ApiUnreachable(f"{self.where} closed the connection before answering")
                buf += chunk
                if len(buf) > 65536:
                    raise ApiUnreachable(f"{self.where} sent an oversized response head")
        except ssl.SSLError as e:
            conn.close()
            raise self._tls_failed(e) from None
        except OSError as e:
            conn.close()
            raise ApiUnreachable(f"cannot reach the Kiln API at {self.where}: {e}") from None
        raw_head, _, rest = buf.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status == 101:
            sock.settimeout(None)
            return sock, rest
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0") or 0)
        try:
            while len(rest) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
        finally:
            conn.close()
        raise ApiRefused(status, _decode(rest))


def _decode(raw: bytes) -> Any:
    """A response body: JSON when it is, else text (a proxy's error page)."""
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")

