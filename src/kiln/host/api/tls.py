"""Mutual TLS for the remote API, inside the image: the server context and who the peer is.

Standard library only: this runs on the host at boot, where every import costs time under
emulation and `cryptography` is not shipped. The node's CA, certificate and key arrive as
PEM strings in the settings (`settings.api.remote.*`, from `kiln pki user-data`).

A client's role travels in its certificate subject as `O=kiln:<role>` (set by
`kiln pki issue-client`); the CA is the only issuer the server trusts, so a verified
subject is an authenticated identity.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from kiln.core.errors import KilnError

ROLES = ("admin", "reader")
ROLE_PREFIX = "kiln:"


def server_context(ca_pem: str, cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """A TLS ≥1.2 server context that requires a client certificate issued by `ca_pem` alone."""
    if "-----BEGIN CERTIFICATE-----" not in ca_pem:
        raise KilnError("remote API: the CA (settings.api.remote.ca) holds no PEM certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=ca_pem)
    except ssl.SSLError as e:
        raise KilnError(f"remote API: the CA (settings.api.remote.ca) does not load: {e}") from None
    # load_cert_chain only reads files: stage the PEMs in a private directory that goes away.
    with tempfile.TemporaryDirectory(prefix="kiln-tls-") as tmp:  # mkdtemp: mode 0700
        cert_file = _write_private(Path(tmp, "cert.pem"), cert_pem)
        key_file = _write_private(Path(tmp, "key.pem"), key_pem)
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as e:
            raise KilnError(
                f"remote API: the certificate and key (settings.api.remote.certificate/key) do not load: {e}",
                hint="regenerate them with `kiln pki user-data DIR`",
            ) from None
    return ctx


def _write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


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
