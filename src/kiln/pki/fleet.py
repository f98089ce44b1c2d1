"""The fleet PKI directory: one CA, the node's server certificate, client certificates by name.

Layout of DIR (keys 0600, directories 0700 when Kiln creates them):

    ca.crt  ca.key            the fleet CA (10 years); ca.key never leaves this directory
    node.crt  node.key        the server certificate every node presents (goes into user data)
    clients/NAME.crt  .key    client certificates; the role travels as O=kiln:<role>

Nothing is ever overwritten: a second `init` or an existing client name is an error, so a
typo cannot replace the CA a fleet already trusts.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kiln.core.errors import KilnError
from kiln.core.fs import atomic_write
from kiln.pki import certs

Role = Literal["admin", "reader"]
ROLES: tuple[str, ...] = get_args(Role)
# Must match kiln.host.api.tls.ROLE_PREFIX, which reads it back on the node.
ROLE_PREFIX = "kiln:"
CA_DAYS = 3650
LEAF_DAYS = 365
DEFAULT_PORT = 50000
_CLIENT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


@dataclass(frozen=True)
class Layout:
    """Where each file of a PKI directory lives."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def node_cert(self) -> Path:
        return self.dir / "node.crt"

    @property
    def node_key(self) -> Path:
        return self.dir / "node.key"

    @property
    def clients(self) -> Path:
        return self.dir / "clients"

    def client(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of client `name`."""
        return self.clients / f"{name}.crt", self.clients / f"{name}.key"


@dataclass(frozen=True)
class Issued:
    """One certificate and key written to disk."""

    cert: Path
    key: Path
    common_name: str
    not_after: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "common_name": self.common_name,
            "cert": str(self.cert),
            "key": str(self.key),
            "not_after": self.not_after.isoformat(),
        }


@dataclass(frozen=True)
class ClientCert(Issued):
    """A client certificate: its CN is the client's name, its O carries the role."""

    role: Role

    def to_json(self) -> dict[str, Any]:
        return {"name": self.common_name, "role": self.role, **super().to_json()}


@dataclass(frozen=True)
class PkiInit:
    """What `init` wrote."""

    dir: Path
    ca: Issued
    node: Issued
    admin: ClientCert
    sans: tuple[str, ...]

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(p for i in (self.ca, self.node, self.admin) for p in (i.cert, i.key))

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "ca": self.ca.to_json(),
            "node": {**self.node.to_json(), "sans": list(self.sans)},
            "clients": [self.admin.to_json()],
            "files": [str(p) for p in self.files],
        }


def init(dir: Path, *, node_name: str = "kiln-node", sans: Sequence[str] = (), days: int = LEAF_DAYS) -> PkiInit:
    """Create a fleet CA, the node certificate and an `admin` client certificate in `dir`."""
    paths = Layout(Path(dir))
    if not certs.is_dns_name(node_name):
        raise KilnError(f"node name {node_name!r} is not a DNS name", hint="use letters, digits, '-' and '.'")
    _check_days(days)
    admin_cert, admin_key = paths.client("admin")
    for existing in (paths.ca_cert, paths.ca_key, paths.node_cert, paths.node_key, admin_cert, admin_key):
        if existing.exists() or existing.is_symlink():
            raise KilnError(
                f"{existing} already exists: refusing to overwrite a fleet CA",
                hint="pick an empty directory; add clients to this one with `kiln pki issue-client`",
            )
    node_name = node_name.lower()
    general_names = _unique([certs.parse_san(s) for s in (node_name, "localhost", "127.0.0.1", "::1", *sans)])

    # Everything is made in memory first, so a bad argument leaves no partial directory.
    ca = certs.make_ca(f"Kiln fleet CA {secrets.token_hex(4)}", CA_DAYS)
    issued_at = certs.now()
    start, end = issued_at - certs.CLOCK_SKEW, issued_at + dt.timedelta(days=days)
    node_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)])
    node_cert, node_key = certs.make_leaf(ca, node_subject, certs.SERVER_AUTH, start, end, general_names)
    admin = _make_client(ca, "admin", "admin", start, end)

    _private_dir(paths.dir)
    _private_dir(paths.clients)
    _write_pair(paths.ca_cert, paths.ca_key, ca.cert, ca.key)
    _write_pair(paths.node_cert, paths.node_key, node_cert, node_key)
    _write_pair(admin_cert, admin_key, *admin)
    return PkiInit(
        dir=paths.dir,
        ca=_issued(paths.ca_cert, paths.ca_key, ca.cert),
        node=_issued(paths.node_cert, paths.node_key, node_cert),
        admin=_client(admin_cert, admin_key, admin[0], "admin"),
        sans=tuple(_san_text(n) for n in general_names),
    )


def issue_client(
    dir: Path,
    name: str,
    role: str,
    *,
    days: int = LEAF_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> ClientCert:
    """Sign a client certificate `clients/NAME.crt` for `role` with the CA in `dir`.

    `not_before`/`not_after` override the validity window (tests use them for expired certs).
    """
    paths = Layout(Path(dir))
    check_client_name(name)
    checked_role = _role(role)
    _check_days(days)
    ca = load_ca(paths)
    cert_path, key_path = paths.client(name)
    for existing in (cert_path, key_path):
        if existing.exists() or existing.is_symlink():
            raise KilnError(f"{existing} already exists: client {name!r} was issued before", hint="pick another name")
    start = _utc(not_before) if not_before else certs.now() - certs.CLOCK_SKEW
    end = _utc(not_after) if not_after else certs.now() + dt.timedelta(days=days)
    cert, key = _make_client(ca, name, checked_role, start, end)
    _private_dir(paths.clients)
    _write_pair(cert_path, key_path, cert, key)
    return _client(cert_path, key_path, cert, checked_role)


def user_data(dir: Path, *, port: int = DEFAULT_PORT) -> str:
    """The TOML user-data section that turns on the remote API of a node with this PKI's material."""
    paths = Layout(Path(dir))
    values = {
        "ca": _read_text(paths.ca_cert),
        "certificate": _read_text(paths.node_cert),
        "key": _read_text(paths.node_key),
    }
    lines = ["[settings.api.remote]", "enabled = true", f"port = {int(port)}"]
    for key, pem in values.items():
        # PEM is base64, dashes and newlines; anything TOML would unescape means a damaged file.
        if '"""' in pem or "\\" in pem or not pem.startswith("-----BEGIN "):
            raise KilnError(f"{dir}: the {key} file is not a plain PEM file")
        lines.append(f'{key} = """{pem}"""')
    return "\n".join(lines) + "\n"


def client_context(dir: Path, client: str = "admin") -> ssl.SSLContext:
    """A TLS ≥1.2 client context that trusts only this fleet's CA and presents `client`'s certificate."""
    paths = Layout(Path(dir))
    check_client_name(client)
    cert_path, key_path = paths.client(client)
    for needed in (paths.ca_cert, cert_path, key_path):
        if not needed.is_file():
            hint = "issue it with `kiln pki issue-client`" if needed != paths.ca_cert else "run `kiln pki init DIR`"
            raise KilnError(f"{needed} does not exist", hint=hint)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=paths.ca_cert)
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as e:
        raise KilnError(f"{paths.dir}: the CA or client {client!r} does not load: {e}") from None
    return ctx


def check_client_name(name: str) -> None:
    """A client name is a file name and a certificate CN: keep it to a DNS-label alphabet."""
    if not _CLIENT_NAME.fullmatch(name):
        raise KilnError(
            f"invalid client name {name!r}",
            hint="1–63 characters: lowercase letters, digits and '-', not starting with '-'",
        )


def load_ca(paths: Layout) -> certs.Issuer:
    for needed in (paths.ca_cert, paths.ca_key):
        if not needed.is_file():
            raise KilnError(f"{needed} does not exist: no fleet CA in {paths.dir}", hint="run `kiln pki init DIR`")
    return certs.load_issuer(paths.ca_cert.read_bytes(), paths.ca_key.read_bytes(), str(paths.ca_cert))


def _make_client(
    ca: certs.Issuer, name: str, role: Role, start: dt.datetime, end: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{ROLE_PREFIX}{role}"),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    return certs.make_leaf(ca, subject, certs.CLIENT_AUTH, start, end)


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """Key first: a certificate on disk always has its key beside it."""
    atomic_write(key_path, certs.key_pem(key), mode=0o600)
    atomic_write(cert_path, certs.cert_pem(cert), mode=0o644)


def _issued(cert_path: Path, key_path: Path, cert: x509.Certificate) -> Issued:
    return Issued(cert_path, key_path, _common_name(cert), cert.not_valid_after_utc)


def _client(cert_path: Path, key_path: Path, cert: x509.Certificate, role: Role) -> ClientCert:
    return ClientCert(cert_path, key_path, _common_name(cert), cert.not_valid_after_utc, role)


def _role(role: str) -> Role:
    """Narrow a user-supplied string to a Role, or say which roles exist."""
    if role in ROLES:
        return cast(Role, role)
    raise KilnError(f"unknown role {role!r}", hint=f"one of: {', '.join(ROLES)}")


def _common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _private_dir(path: Path) -> None:
    if path.is_dir():
        return
    if path.exists() or path.is_symlink():
        raise KilnError(f"{path} exists and is not a directory")
    path.mkdir(mode=0o700, parents=True)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KilnError(f"{path} does not exist", hint="run `kiln pki init DIR` first") from None
    except UnicodeDecodeError:
        raise KilnError(f"{path} is not a PEM file") from None


def _check_days(days: int) -> None:
    if days < 1:
        raise KilnError(f"validity of {days} days: must be at least 1")


def _utc(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def _unique(names: list[x509.GeneralName]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def _san_text(name: x509.GeneralName) -> str:
    return str(name.value)
