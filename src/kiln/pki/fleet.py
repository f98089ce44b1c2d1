"""The fleet PKI directory: one CA, a certificate per node, client certificates by name, a CRL.

Layout of DIR (keys 0600, directories 0700 when Kiln creates them):

    ca.crt  ca.key            the fleet CA (10 years); ca.key never leaves this directory
    crl.pem                   the CA's revocation list: empty at `init`, grown by `kiln pki revoke`
    nodes/NAME.crt  .key      one server certificate per node (CN and DNS name NAME, its
                              addresses as IP SANs); the key goes into that node's user data only
    clients/NAME.crt  .key    client certificates; the role travels as O=kiln:<role>
    revoked/SERIAL.crt .key   certificates `kiln pki revoke` moved aside (the name is free again)

A node certificate names one node, so a stolen node key impersonates that node alone, and
only to clients that reach it by one of its names (the client checks the name). Nothing is
ever overwritten: a second `init` or an existing client or node name is an error, so a typo
cannot replace the CA a fleet already trusts.
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
# `kiln pki user-data DIR` with no --name: a VM on this machine reached through a port
# forward (`kiln run --forward`), as in the README's walk-through.
LOCAL_NODE = "localhost"
LOCAL_ADDRESSES = ("127.0.0.1", "::1")
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
    def crl(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def legacy_node_cert(self) -> Path:
        """The one node certificate directories made before per-node certificates shared."""
        return self.dir / "node.crt"

    @property
    def clients(self) -> Path:
        return self.dir / "clients"

    @property
    def nodes(self) -> Path:
        return self.dir / "nodes"

    @property
    def revoked(self) -> Path:
        return self.dir / "revoked"

    def client(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of client `name`."""
        return self.clients / f"{name}.crt", self.clients / f"{name}.key"

    def node(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of node `name`."""
        return self.nodes / f"{name}.crt", self.nodes / f"{name}.key"


@dataclass(frozen=True)
class Issued:
    """One certificate and key written to disk."""

    cert: Path
    key: Path
    common_name: str
    not_after: dt.datetime
    serial: int

    def to_json(self) -> dict[str, Any]:
        return {
            "common_name": self.common_name,
            "serial": serial_text(self.serial),
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
class NodeCert(Issued):
    """A node's server certificate: CN = the node's name; SANs = that name and its addresses."""

    sans: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.common_name, "sans": list(self.sans), **super().to_json()}


@dataclass(frozen=True)
class PkiInit:
    """What `init` wrote."""

    dir: Path
    ca: Issued
    crl: Path
    admin: ClientCert

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.ca.cert, self.ca.key, self.crl, self.admin.cert, self.admin.key)

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "ca": self.ca.to_json(),
            "crl": str(self.crl),
            "clients": [self.admin.to_json()],
            "files": [str(p) for p in self.files],
        }


def init(dir: Path, *, days: int = LEAF_DAYS) -> PkiInit:
    """Create a fleet CA, its (empty) CRL and an `admin` client certificate in `dir`.

    Node certificates come later, one per node (`issue_node`, `user_data`).
    """
    paths = Layout(Path(dir))
    _check_days(days)
    admin_cert, admin_key = paths.client("admin")
    for existing in (paths.ca_cert, paths.ca_key, paths.crl, admin_cert, admin_key):
        if existing.exists() or existing.is_symlink():
            raise KilnError(
                f"{existing} already exists: refusing to overwrite a fleet CA",
                hint="pick an empty directory; add clients to this one with `kiln pki issue-client`",
            )
    # Everything is made in memory first, so a bad argument leaves no partial directory.
    ca = certs.make_ca(f"Kiln fleet CA {secrets.token_hex(4)}", CA_DAYS)
    issued_at = certs.now()
    admin = _make_client(ca, "admin", "admin", issued_at - certs.CLOCK_SKEW, issued_at + dt.timedelta(days=days))
    crl = certs.make_crl(ca, [], 1)

    _private_dir(paths.dir)
    _private_dir(paths.clients)
    _write_pair(paths.ca_cert, paths.ca_key, ca.cert, ca.key)
    atomic_write(paths.crl, certs.crl_pem(crl), mode=0o644)
    _write_pair(admin_cert, admin_key, *admin)
    return PkiInit(
        dir=paths.dir,
        ca=_issued(paths.ca_cert, paths.ca_key, ca.cert),
        crl=paths.crl,
        admin=_client(admin_cert, admin_key, admin[0], "admin"),
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
    _refuse_existing(cert_path, key_path, f"client {name!r}")
    start = _utc(not_before) if not_before else certs.now() - certs.CLOCK_SKEW
    end = _utc(not_after) if not_after else certs.now() + dt.timedelta(days=days)
    cert, key = _make_client(ca, name, checked_role, start, end)
    _private_dir(paths.clients)
    _write_pair(cert_path, key_path, cert, key)
    return _client(cert_path, key_path, cert, checked_role)


def issue_node(dir: Path, name: str, addresses: Sequence[str] = (), *, days: int = LEAF_DAYS) -> NodeCert:
    """Sign `nodes/NAME.crt`: CN and first SAN the node's name, then its `addresses` (IPs or DNS names)."""
    paths = Layout(Path(dir))
    name = check_node_name(name)
    general_names = _node_sans(name, addresses)
    _check_days(days)
    ca = load_ca(paths)
    cert_path, key_path = paths.node(name)
    _refuse_existing(cert_path, key_path, f"node {name!r}")
    issued_at = certs.now()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = issued_at - certs.CLOCK_SKEW, issued_at + dt.timedelta(days=days)
    cert, key = certs.make_leaf(ca, subject, certs.SERVER_AUTH, start, end, general_names)
    _private_dir(paths.nodes)
    _write_pair(cert_path, key_path, cert, key)
    return _node(cert_path, key_path, cert)


def node_for_user_data(
    dir: Path, name: str | None = None, addresses: Sequence[str] | None = None, *, days: int = LEAF_DAYS
) -> NodeCert:
    """The certificate of the node the user data is for: issued now if the node has none.

    No `name`: the local node (`localhost`, 127.0.0.1, ::1, plus `addresses`). An existing
    certificate is reused when it carries exactly the names asked for (any, when no
    `addresses` are given with a `name`); otherwise it is an error, never a silent reissue.
    """
    paths = Layout(Path(dir))
    if name is None:
        name, addresses = LOCAL_NODE, (*LOCAL_ADDRESSES, *(addresses or ()))
    name = check_node_name(name)
    cert_path, key_path = paths.node(name)
    if not cert_path.exists():
        return issue_node(dir, name, addresses or (), days=days)
    if not key_path.is_file():
        raise KilnError(f"{key_path} does not exist: node {name!r} has a certificate but no key",
                        hint=f"revoke it (`kiln pki revoke {dir} node:{name}`) and issue it again")
    cert = _load_cert(cert_path)
    node = _node(cert_path, key_path, cert)
    if addresses is not None:
        wanted = [_san_text(n) for n in _node_sans(name, addresses)]
        if sorted(wanted) != sorted(node.sans):
            raise KilnError(
                f"node {name!r} was issued for {', '.join(node.sans)}, not {', '.join(wanted)}",
                hint=f"ask for the same addresses, or revoke it (`kiln pki revoke {dir} node:{name}`) and issue again",
            )
    if paths.crl.is_file() and node.serial in revoked_serials(paths):
        raise KilnError(f"the certificate of node {name!r} ({cert_path}) is revoked",
                        hint=f"`kiln pki revoke {dir} node:{name}` moves it aside; then issue it again")
    return node


def user_data(
    dir: Path, name: str | None = None, addresses: Sequence[str] | None = None, *, port: int = DEFAULT_PORT,
    days: int = LEAF_DAYS,
) -> str:
    """The TOML user-data section that turns on the remote API of one node, with its own
    certificate (see `node_for_user_data`), the fleet CA and, when there is one, the CRL."""
    paths = Layout(Path(dir))
    ca = _read_text(paths.ca_cert)  # first: a missing CA is the clearest error
    node = node_for_user_data(dir, name, addresses, days=days)
    values = {"ca": ca, "certificate": _read_text(node.cert), "key": _read_text(node.key)}
    if paths.crl.is_file():
        values["crl"] = _read_text(paths.crl)
    return settings_toml(dir, {"enabled": True, "port": int(port)}, values)


def settings_toml(dir: Path, plain: dict[str, Any], pems: dict[str, str]) -> str:
    """A `[settings.api.remote]` table: `plain` values as TOML, then each PEM as a multi-line string."""
    lines = ["[settings.api.remote]"]
    for key, value in plain.items():
        lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    for key, pem in pems.items():
        # PEM is base64, dashes and newlines; anything TOML would unescape means a damaged file.
        if '"""' in pem or "\\" in pem or not pem.startswith("-----BEGIN "):
            raise KilnError(f"{dir}: the {key} file is not a plain PEM file")
        lines.append(f'{key} = """{pem}"""')
    return "\n".join(lines) + "\n"


def client_context(dir: Path, client: str = "admin") -> ssl.SSLContext:
    """A TLS ≥1.2 client context that trusts only this fleet's CA, refuses the node certificates
    its CRL revokes, and presents `client`'s certificate. The caller names the node to check."""
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
        if paths.crl.is_file():  # directories from before revocation have none
            ctx.load_verify_locations(cafile=paths.crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as e:
        raise KilnError(f"{paths.dir}: the CA, its CRL or client {client!r} does not load: {e}") from None
    return ctx


def check_client_name(name: str) -> None:
    """A client name is a file name and a certificate CN: keep it to a DNS-label alphabet."""
    if not _CLIENT_NAME.fullmatch(name):
        raise KilnError(
            f"invalid client name {name!r}",
            hint="1–63 characters: lowercase letters, digits and '-', not starting with '-'",
        )


def check_node_name(name: str) -> str:
    """A node name is a DNS name (or an IP address), a file name and the certificate's CN."""
    if name.startswith("*") or not certs.is_dns_name(name):
        raise KilnError(f"node name {name!r} is not a DNS name", hint="use letters, digits, '-' and '.'")
    return name.lower()


def load_ca(paths: Layout) -> certs.Issuer:
    for needed in (paths.ca_cert, paths.ca_key):
        if not needed.is_file():
            raise KilnError(f"{needed} does not exist: no fleet CA in {paths.dir}", hint="run `kiln pki init DIR`")
    return certs.load_issuer(paths.ca_cert.read_bytes(), paths.ca_key.read_bytes(), str(paths.ca_cert))


def read_crl(paths: Layout) -> x509.CertificateRevocationList | None:
    """The directory's CRL, checked against its CA certificate; None when it has none yet."""
    if not paths.crl.is_file():
        return None
    return certs.load_crl(paths.crl.read_bytes(), _load_cert(paths.ca_cert), str(paths.crl))


def revoked_serials(paths: Layout) -> set[int]:
    crl = read_crl(paths)
    return {entry.serial_number for entry in crl} if crl is not None else set()


def serial_text(serial: int) -> str:
    """Upper-case hex, whole bytes: what `openssl x509 -serial` and Python's getpeercert() print."""
    text = f"{serial:X}"
    return text.zfill(len(text) + len(text) % 2)


def _node_sans(name: str, addresses: Sequence[str]) -> list[x509.GeneralName]:
    return _unique([certs.parse_san(s) for s in (name, *addresses)])


def _make_client(
    ca: certs.Issuer, name: str, role: Role, start: dt.datetime, end: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{ROLE_PREFIX}{role}"),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    return certs.make_leaf(ca, subject, certs.CLIENT_AUTH, start, end)


def _refuse_existing(cert_path: Path, key_path: Path, what: str) -> None:
    for existing in (cert_path, key_path):
        if existing.exists() or existing.is_symlink():
            raise KilnError(f"{existing} already exists: {what} was issued before",
                            hint="pick another name, or revoke that one first (`kiln pki revoke`)")


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """Key first: a certificate on disk always has its key beside it."""
    atomic_write(key_path, certs.key_pem(key), mode=0o600)
    atomic_write(cert_path, certs.cert_pem(cert), mode=0o644)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise KilnError(f"{path} does not exist", hint="run `kiln pki init DIR` first") from None
    except ValueError as e:
        raise KilnError(f"{path}: not a PEM certificate: {e}") from None


def _issued(cert_path: Path, key_path: Path, cert: x509.Certificate) -> Issued:
    return Issued(cert_path, key_path, common_name(cert), cert.not_valid_after_utc, cert.serial_number)


def _client(cert_path: Path, key_path: Path, cert: x509.Certificate, role: Role) -> ClientCert:
    return ClientCert(cert_path, key_path, common_name(cert), cert.not_valid_after_utc, cert.serial_number, role)


def _node(cert_path: Path, key_path: Path, cert: x509.Certificate) -> NodeCert:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    return NodeCert(cert_path, key_path, common_name(cert), cert.not_valid_after_utc, cert.serial_number,
                    tuple(_san_text(n) for n in sans))


def _role(role: str) -> Role:
    """Narrow a user-supplied string to a Role, or say which roles exist."""
    if role in ROLES:
        return cast(Role, role)
    raise KilnError(f"unknown role {role!r}", hint=f"one of: {', '.join(ROLES)}")


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


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
