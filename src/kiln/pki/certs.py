"""X.509 building blocks for the fleet PKI: ECDSA P-256 keys, SHA-256 signatures.

Pure functions over `cryptography` objects; `kiln.pki.fleet` decides where they are written.
Every certificate is backdated a few minutes so that a node whose clock runs slightly
behind the workstation still accepts a freshly issued one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kiln.core.errors import KilnError

CLOCK_SKEW = dt.timedelta(minutes=5)
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.IGNORECASE)


@dataclass(frozen=True)
class Issuer:
    """A CA certificate and its key, able to sign leaves."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8: what OpenSSL and Python's ssl read without a passphrase prompt."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def is_dns_name(name: str) -> bool:
    """A hostname: dot-separated LDH labels, 253 characters at most (a leading `*.` is allowed)."""
    host = name.removeprefix("*.")
    return 0 < len(host) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in host.split("."))


def parse_san(entry: str) -> x509.GeneralName:
    """An IP address if `entry` is one, else a DNS name; anything else is the user's mistake."""
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        pass
    if not is_dns_name(entry):
        raise KilnError(f"subject alternative name {entry!r} is neither an IP address nor a DNS name")
    return x509.DNSName(entry.lower())


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    if not_after <= not_before:
        raise KilnError(f"certificate would expire ({not_after}) before it starts ({not_before})")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_ca(common_name: str, days: int) -> Issuer:
    """A self-signed root that may sign leaves only (pathlen 0)."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = now() - CLOCK_SKEW
    cert = (
        _builder(name, name, key.public_key(), start, start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issuer(cert, key)


def make_leaf(
    issuer: Issuer,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    not_before: dt.datetime,
    not_after: dt.datetime,
    sans: Sequence[x509.GeneralName] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new key and its end-entity certificate for one extended key usage (server or client auth)."""
    if not_after > issuer.cert.not_valid_after_utc:
        raise KilnError(
            f"the certificate would outlive the CA (CA expires {issuer.cert.not_valid_after_utc:%Y-%m-%d})",
            hint="ask for fewer days",
        )
    key = new_key()
    ca_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _builder(subject, issuer.cert.subject, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer.key, hashes.SHA256()), key


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_crl(
    issuer: Issuer, revoked: Sequence[tuple[int, dt.datetime]], number: int
) -> x509.CertificateRevocationList:
    """A CRL of `revoked` (serial, revocation date), numbered `number`.

    It starts CLOCK_SKEW in the past like the certificates (a node whose clock runs behind
    would take a CRL "not yet valid" for a reason to refuse every client) and runs until the
    CA expires: a CRL past its next update refuses every client too, and nothing here
    republishes one on a schedule.
    """
    ca_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(now() - CLOCK_SKEW)
        .next_update(issuer.cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    for serial, when in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(issuer.key, hashes.SHA256())


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def load_crl(data: bytes, ca: x509.Certificate, source: str) -> x509.CertificateRevocationList:
    """Parse a CRL and make sure the CA `ca` signed it; `source` names the file in errors."""
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as e:
        raise KilnError(f"{source}: not a PEM CRL: {e}") from None
    public_key = ca.public_key()
    if crl.issuer != ca.subject or not (
        isinstance(public_key, ec.EllipticCurvePublicKey) and crl.is_signature_valid(public_key)
    ):
        raise KilnError(f"{source}: this CRL was not signed by the fleet CA beside it")
    return crl


def load_issuer(cert_data: bytes, key_data: bytes, source: str) -> Issuer:
    """Parse a CA written by `make_ca`; `source` names the files in errors."""
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as e:
        raise KilnError(f"{source}: not a PEM certificate and unencrypted key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KilnError(f"{source}: the CA key is not an ECDSA key")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise KilnError(f"{source}: the CA key does not belong to the CA certificate")
    return Issuer(cert, key)


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
