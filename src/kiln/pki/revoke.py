"""Revocation: `kiln pki revoke` adds a certificate to the fleet CA's CRL; `kiln pki crl` prints
the CRL as the setting (`settings.api.remote.crl`) that nodes enforce.

Both sides honour the CRL: a node refuses the client certificates it lists from its next
handshake on, without a restart (`kiln.host.api.tls`), and `kiln --endpoint` refuses the
node certificates it lists (`kiln.pki.fleet.client_context`). A revoked certificate and its
key are moved to `revoked/SERIAL.*`, so its name can be issued again.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509

from kiln.core.errors import KilnError
from kiln.core.fs import atomic_write
from kiln.pki import certs
from kiln.pki.fleet import (
    Layout,
    check_client_name,
    check_node_name,
    common_name,
    load_ca,
    read_crl,
    serial_text,
    settings_toml,
)

Kind = Literal["client", "node", "certificate"]
# RFC 5280: serials are positive and at most 20 octets.
_SERIAL = re.compile(r"(?:0x)?([0-9a-f]{1,40}(?::[0-9a-f]{1,40})*)", re.IGNORECASE)
_MAX_SERIAL = 1 << 159


@dataclass(frozen=True)
class Found:
    """A certificate of this directory: what it is and where its files are."""

    kind: Kind
    name: str
    serial: int
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Revoked:
    """What `revoke` did."""

    target: Found
    already: bool  # it was on the CRL before: nothing rewritten
    moved: tuple[Path, ...]
    crl: Path
    count: int  # certificates on the CRL now

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.target.kind,
            "name": self.target.name,
            "serial": serial_text(self.target.serial),
            "already_revoked": self.already,
            "moved": [str(p) for p in self.moved],
            "crl": str(self.crl),
            "revoked_count": self.count,
        }


def revoke(dir: Path, target: str, *, force: bool = False) -> Revoked:
    """Put `target` on the CRL and move its files to `revoked/`.

    `target`: `client:NAME`, `node:NAME`, a bare NAME (a client or a node, if only one has
    it) or a serial number in hex (as `openssl x509 -serial` prints it). A serial that no
    certificate here carries is refused unless `force` (a certificate whose files were lost).
    """
    paths = Layout(Path(dir))
    ca = load_ca(paths)
    found = _resolve(paths, target, force)
    previous = read_crl(paths)
    entries = [(e.serial_number, e.revocation_date_utc) for e in previous] if previous is not None else []
    already = any(serial == found.serial for serial, _ in entries)
    if not already:
        entries.append((found.serial, certs.now()))
        number = _crl_number(previous) + 1
        # The CRL first: if the move below fails, the certificate is revoked all the same
        # and revoking it again finishes the move.
        atomic_write(paths.crl, certs.crl_pem(certs.make_crl(ca, entries, number)), mode=0o644)
    moved = _move_aside(paths, found)
    return Revoked(found, already, moved, paths.crl, len(entries))


def crl_toml(dir: Path) -> str:
    """`[settings.api.remote] crl = ...`: feed it to every node (`kiln settings apply -`)."""
    paths = Layout(Path(dir))
    if not paths.crl.is_file():
        raise KilnError(f"{paths.crl} does not exist",
                        hint="`kiln pki revoke` writes it (directories made by `kiln pki init` have one)")
    read_crl(paths)  # signed by this CA, or an error now rather than on every node
    return settings_toml(dir, {}, {"crl": paths.crl.read_text(encoding="ascii")})


def parse_serial(text: str) -> int | None:
    """A certificate serial in hex (`0x` and `:` separators allowed), or None if it is not one."""
    m = _SERIAL.fullmatch(text.strip())
    if m is None:
        return None
    serial = int(m.group(1).replace(":", ""), 16)
    return serial if 0 < serial < _MAX_SERIAL else None


def _resolve(paths: Layout, target: str, force: bool) -> Found:
    kind, sep, rest = target.partition(":")
    if sep and kind == "client":
        check_client_name(rest)
        return _by_name(paths, "client", rest) or _revoked_named(paths, rest) or _no_such(paths, "client", rest)
    if sep and kind == "node":
        name = check_node_name(rest)
        return _by_name(paths, "node", name) or _revoked_named(paths, name) or _no_such(paths, "node", name)
    candidates = []
    if _looks_like_client(target):
        candidates.append(_by_name(paths, "client", target))
    if _looks_like_node(target):
        candidates.append(_by_name(paths, "node", target.lower()))
    named = [c for c in candidates if c is not None]
    if len(named) > 1:
        raise KilnError(f"both a client and a node are named {target!r}",
                        hint=f"say which: client:{target} or node:{target}")
    if named:
        return named[0]
    serial = parse_serial(target)
    again = _revoked_named(paths, target.lower()) if serial is None else None
    if again is not None:
        return again
    if serial is None:
        raise KilnError(
            f"no client or node named {target!r} in {paths.dir}, and it is not a serial number",
            hint="kiln pki revoke DIR NAME | client:NAME | node:NAME | SERIAL (hex, as `openssl x509 -serial` prints)",
        )
    for cert_path, found_kind in _known(paths):
        cert = _load(cert_path)
        if cert is not None and cert.serial_number == serial:
            return Found(found_kind, _name_of(paths, cert_path, cert), serial, _with_key(cert_path))
    if not force:
        raise KilnError(f"no certificate with serial {serial_text(serial)} in {paths.dir}",
                        hint="check the serial; --force revokes it anyway (a certificate whose files were lost)")
    return Found("certificate", "", serial, ())


def _by_name(paths: Layout, kind: Kind, name: str) -> Found | None:
    cert_path, key_path = paths.client(name) if kind == "client" else paths.node(name)
    if not cert_path.is_file():
        return None
    cert = _load(cert_path)
    if cert is None:
        raise KilnError(f"{cert_path}: not a PEM certificate", hint="revoke it by its serial number instead")
    return Found(kind, name, cert.serial_number, tuple(p for p in (cert_path, key_path) if p.exists()))


def _revoked_named(paths: Layout, name: str) -> Found | None:
    """A certificate of that name revoked before (revoking again changes nothing)."""
    for cert_path in sorted(paths.revoked.glob("*.crt")):
        cert = _load(cert_path)
        if cert is not None and common_name(cert) == name:
            return Found("certificate", name, cert.serial_number, _with_key(cert_path))
    return None


def _no_such(paths: Layout, kind: Kind, name: str) -> Found:
    where = paths.clients if kind == "client" else paths.nodes
    have = sorted(p.stem for p in where.glob("*.crt")) if where.is_dir() else []
    raise KilnError(f"no {kind} named {name!r} in {paths.dir}",
                    hint=f"{kind}s: {', '.join(have)}" if have else f"{where} holds no certificate")


def _looks_like_client(name: str) -> bool:
    try:
        check_client_name(name)
    except KilnError:
        return False
    return True


def _looks_like_node(name: str) -> bool:
    try:
        check_node_name(name)
    except KilnError:
        return False
    return True


def _known(paths: Layout) -> list[tuple[Path, Kind]]:
    """Every certificate file a serial may belong to (the legacy shared node.crt included)."""
    out: list[tuple[Path, Kind]] = [(p, "client") for p in sorted(paths.clients.glob("*.crt"))]
    out += [(p, "node") for p in sorted(paths.nodes.glob("*.crt"))]
    if paths.legacy_node_cert.is_file():
        out.append((paths.legacy_node_cert, "node"))
    out += [(p, "certificate") for p in sorted(paths.revoked.glob("*.crt"))]
    return out


def _load(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _name_of(paths: Layout, cert_path: Path, cert: x509.Certificate) -> str:
    return cert_path.stem if cert_path.parent in (paths.clients, paths.nodes) else common_name(cert)


def _with_key(cert_path: Path) -> tuple[Path, ...]:
    key = cert_path.with_suffix(".key")
    return (cert_path, key) if key.exists() else (cert_path,)


def _move_aside(paths: Layout, found: Found) -> tuple[Path, ...]:
    """Move a revoked certificate's files to revoked/SERIAL.*: its name may be issued again."""
    todo = [p for p in found.files if p.parent != paths.revoked]
    if not todo:
        return ()
    if not paths.revoked.is_dir():
        paths.revoked.mkdir(mode=0o700)
    moved = []
    for src in todo:
        dst = paths.revoked / f"{serial_text(found.serial)}{src.suffix}"
        os.replace(src, dst)
        moved.append(dst)
    return tuple(moved)


def _crl_number(crl: x509.CertificateRevocationList | None) -> int:
    if crl is None:
        return 0
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0
