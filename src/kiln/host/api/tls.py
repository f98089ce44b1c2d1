"""Mutual TLS for the remote API, inside the image: the server context and who the peer is.

Standard library only: this runs on the host at boot, where every import costs time under
emulation and `cryptography` is not shipped. The node's CA, certificate and key arrive as
PEM strings in the settings (`settings.api.remote.*`, from `kiln pki user-data`).

A client's role travels in its certificate subject as `O=kiln:<role>` (set by
`kiln pki issue-client`); the CA is the only issuer the server trusts, so a verified
subject is an authenticated identity.

Revocation: the fleet CA's CRL (`settings.api.remote.crl`, from `kiln pki crl`) is rendered
on its own into `CRL_FILE`, which no service restart follows. The listener's context checks
the file on every handshake and, when it changed, serves from a context rebuilt with it
(OpenSSL's leaf CRL check): a revoked client is refused on its next connection.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from kiln.core.errors import KilnError

log = logging.getLogger("kiln.api")
ROLES = ("admin", "reader")
ROLE_PREFIX = "kiln:"
# Rendered from settings.api.remote.crl, beside /etc/kiln/api-remote.json (no restart command).
CRL_FILE = Path("/etc/kiln/api-remote-crl.pem")
_CRL_BEGIN = "-----BEGIN X509 CRL-----"
_REVOKED = 23  # X509_V_ERR_CERT_REVOKED


def server_context(ca_pem: str, cert_pem: str, key_pem: str, *, crl_file: Path | None = None) -> ssl.SSLContext:
    """A TLS ≥1.2 server context that requires a client certificate issued by `ca_pem` alone.

    With `crl_file`, clients the CRL in that file revokes are refused too, and the context
    follows the file: a new CRL holds from the next handshake on, without a restart.
    """
    if crl_file is None:
        return _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ca_pem, cert_pem, key_pem, None)
    return CrlFollowingContext(ca_pem, cert_pem, key_pem, crl_file)


def _configure(ctx: ssl.SSLContext, ca_pem: str, cert_pem: str, key_pem: str, crl_pem: str | None) -> ssl.SSLContext:
    if "-----BEGIN CERTIFICATE-----" not in ca_pem:
        raise KilnError("remote API: the CA (settings.api.remote.ca) holds no PEM certificate")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=ca_pem)
    except ssl.SSLError as e:
        raise KilnError(f"remote API: the CA (settings.api.remote.ca) does not load: {e}") from None
    with _staged(cert=cert_pem, key=key_pem) as files:
        try:
            ctx.load_cert_chain(files["cert"], files["key"])
        except ssl.SSLError as e:
            raise KilnError(
                f"remote API: the certificate and key (settings.api.remote.certificate/key) do not load: {e}",
                hint="regenerate them with `kiln pki user-data DIR --name NODE`",
            ) from None
    if crl_pem is not None:
        _load_crl(ctx, crl_pem)
    return ctx


@contextlib.contextmanager
def _staged(**texts: str) -> Iterator[dict[str, Path]]:
    """The ssl loaders only read files: stage PEMs in a private directory that goes away."""
    with tempfile.TemporaryDirectory(prefix="kiln-tls-") as tmp:  # mkdtemp: mode 0700
        yield {name: _write_private(Path(tmp, f"{name}.pem"), text) for name, text in texts.items()}


def _write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _load_crl(ctx: ssl.SSLContext, crl_pem: str) -> None:
    """Add one CRL to `ctx` and check client (leaf) certificates against it.

    Only a lone CRL block is taken: `load_verify_locations(cafile=)` also reads certificates,
    and one pasted along would become a trusted CA. (`cadata=` skips CRLs altogether.)
    """
    text = crl_pem.strip()
    if not text.startswith(_CRL_BEGIN) or text.count("-----BEGIN ") != 1:
        raise KilnError("remote API: the CRL (settings.api.remote.crl) must be one PEM X509 CRL block",
                        hint="print it with `kiln pki crl DIR`")
    before = ctx.cert_store_stats()["crl"]
    with _staged(crl=text + "\n") as files:
        try:
            ctx.load_verify_locations(cafile=files["crl"])
        except ssl.SSLError as e:
            raise KilnError(f"remote API: the CRL (settings.api.remote.crl) does not load: {e}") from None
    if ctx.cert_store_stats()["crl"] != before + 1:
        raise KilnError("remote API: the CRL (settings.api.remote.crl) does not load")
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


@functools.lru_cache(maxsize=16)
def check_crl(crl_pem: str, ca_pem: str | None = None, cert_pem: str | None = None, key_pem: str | None = None) -> None:
    """Refuse a CRL the listener could not use: with a leaf CRL check, a CRL that is not the
    CA's (or is damaged, or expired) refuses every client, and would lock the admins out.

    With the node's CA, certificate and key, the node's own certificate is verified against
    them in memory (one handshake over memory BIOs, a few ms; cached): that proves the CRL
    is signed by this CA and current. The node's own certificate being revoked is no reason
    to refuse it. Raises KilnError.
    """
    _load_crl(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), crl_pem)
    if ca_pem is None or cert_pem is None or key_pem is None:
        return
    server = _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ca_pem, cert_pem, key_pem, None)
    server.verify_mode = ssl.CERT_NONE  # only the client side's verdict matters here
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cadata=ca_pem)
    _load_crl(client, crl_pem)
    failure = _verify_in_memory(server, client)
    if failure is not None and failure.verify_code != _REVOKED:
        raise KilnError(
            f"remote API: the CRL (settings.api.remote.crl) cannot be used with this CA: {failure.verify_message}",
            hint="print the CRL of the fleet this node belongs to: `kiln pki crl DIR`",
        )


def _verify_in_memory(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLCertVerificationError | None:
    """Run a handshake between two contexts over memory BIOs: the client's verification error, if any."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(8):  # TLS 1.3 needs two round trips; 1.2 three
        try:
            c.do_handshake()
            return None
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLCertVerificationError as e:
            return e
        s_in.write(c_out.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            s.do_handshake()
        c_in.write(s_out.read())
    raise KilnError("remote API: checking the CRL: the in-memory handshake did not finish")


class CrlFollowingContext(ssl.SSLContext):
    """A server context that follows a CRL file, for a listener that must not restart.

    The listener builds its context once; this one looks at the file (one stat) on every
    `wrap_socket` and, when it changed, hands the connection to a context rebuilt with the
    new CRL (a few ms, once per change). A file that is missing or empty means no CRL. A
    CRL that does not pass `check_crl` is logged and the last good one kept; with none yet,
    every client is refused until a good one arrives (never served unchecked).
    """

    def __new__(cls, ca_pem: str, cert_pem: str, key_pem: str, crl_file: Path) -> CrlFollowingContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_SERVER)

    def __init__(self, ca_pem: str, cert_pem: str, key_pem: str, crl_file: Path) -> None:
        self._material = (ca_pem, cert_pem, key_pem)
        self._crl_file = crl_file
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = _stamp(crl_file)
        try:
            _configure(self, ca_pem, cert_pem, key_pem, self._checked(_read(crl_file)))
        except _UnusableCrl as e:
            log.error("CRL %s: %s; refusing every client until a usable one is rendered", crl_file, e)
            _configure(self, ca_pem, cert_pem, key_pem, None)
            self.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF  # no CRL to check against: nobody passes
        self._current: ssl.SSLContext = self

    def current(self) -> ssl.SSLContext:
        """The context for the next handshake, rebuilt first if the CRL file changed."""
        try:
            stamp = _stamp(self._crl_file)
        except OSError as e:
            log.error("CRL %s: %s; keeping the one loaded", self._crl_file, e)
            return self._current
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    crl = self._checked(_read(self._crl_file))
                    self._current = _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), *self._material, crl)
                    log.info("CRL %s %s", self._crl_file, "loaded" if crl else "removed: no revocation check")
                except (_UnusableCrl, OSError) as e:
                    log.error("CRL %s: %s; keeping the one loaded", self._crl_file, e)
            return self._current

    def _checked(self, crl: str | None) -> str | None:
        if crl is None:
            return None
        try:
            check_crl(crl, *self._material)
        except KilnError as e:
            raise _UnusableCrl(e.message) from None
        return crl

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        ctx = self.current()
        wrap = super().wrap_socket if ctx is self else ctx.wrap_socket
        return wrap(sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
                    suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname, session=session)


class _UnusableCrl(Exception):
    pass


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the renderer replaces the file (atomic rename: a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise _UnusableCrl("not a PEM file") from None
    return text if text.strip() else None


def peer_identity(sock: ssl.SSLSocket) -> tuple[str, str] | None:
    """(common name, role) of the verified client certificate, or None when it carries no role.

    Call after the handshake. With `server_context` the certificate has been verified against
    the fleet CA, so the subject can be trusted. A subject with no CN, several CNs, no
    `O=kiln:<role>`, several of them or an unknown role gives None: deny, never guess.
    """
    try:
        cert = sock.getpeercert()
    except ValueError:  # handshake not done yet
        return None
    if not cert:  # None: no certificate; {}: not verified
        return None
    names: list[str] = []
    roles: list[str] = []
    subject = cert.get("subject", ())
    for rdn in subject if isinstance(subject, tuple) else ():
        for attr in rdn:
            if not isinstance(attr, tuple):
                continue
            key, value = attr
            if key == "commonName":
                names.append(value)
            elif key == "organizationName" and value.startswith(ROLE_PREFIX):
                roles.append(value.removeprefix(ROLE_PREFIX))
    if len(names) != 1 or len(roles) != 1 or roles[0] not in ROLES:
        return None
    return names[0], roles[0]
