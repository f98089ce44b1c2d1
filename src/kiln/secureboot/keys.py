"""The Secure Boot key directory: the UEFI hierarchy (PK, KEK, db) and the boot-file key.

Layout of DIR (made by `kiln keys init`, 0700; private keys 0600):

    PK.key  PK.crt       platform key: owns the firmware's key databases
    KEK.key KEK.crt      key-exchange key: may change db and dbx
    db.key  db.crt       signs EFI binaries (GRUB) that the firmware will start
    boot.key             RSA-3072: signs the files GRUB loads (kernel, initramfs, grub.cfg)
    kiln-keys.json       {"version": 1, "owner_guid": <EFI signature owner>, "created": <unix s>}

The three certificates are self-signed and enrolled directly into the firmware variables
(kiln.secureboot.varstore), so PK signs nothing here. RSA-2048 because that is what UEFI
firmware must support (UEFI 2.10, 32.2.4: EFI_CERT_X509 with RSA-2048; OVMF takes larger,
real machines may not). The validity (2026..2126) outlives any host: edk2 does not check
certificate times when it verifies a binary, and a Secure Boot key expiring under a fleet
is an outage nobody can fix remotely. The certificates' notBefore is also the timestamp of
the authenticated variables in the vars file, so it stays fixed: the same keys give the
same vars file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.core.errors import KilnError
from kiln.core.fs import fsync_dir

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

MANIFEST = "kiln-keys.json"
UEFI_KEYS = ("PK", "KEK", "db")
BOOT_KEY = "boot.key"
FILES = (*(f"{k}.{ext}" for k in UEFI_KEYS for ext in ("key", "crt")), BOOT_KEY, MANIFEST)
UEFI_BITS = 2048
BOOT_BITS = 3072
NOT_BEFORE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2126, 1, 1, tzinfo=dt.UTC)
DEFAULT_NAME = "Kiln"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,47}")


@dataclass(frozen=True)
class KeySet:
    """A loaded key directory: where each file is, and the EFI signature owner GUID."""

    dir: Path
    owner_guid: str
    created: int

    def key(self, name: str) -> Path:
        """The private key of PK, KEK or db (`boot` for the boot-file key)."""
        if name == "boot":
            return self.dir / BOOT_KEY
        _check_uefi_name(name)
        return self.dir / f"{name}.key"

    def cert(self, name: str) -> Path:
        """The certificate of PK, KEK or db."""
        _check_uefi_name(name)
        return self.dir / f"{name}.crt"

    @property
    def db_crt(self) -> Path:
        return self.cert("db")

    @property
    def db_key(self) -> Path:
        return self.key("db")

    @property
    def boot_key(self) -> Path:
        return self.dir / BOOT_KEY

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST

    def files(self) -> dict[str, Path]:
        """Every file of the set by name (what `kiln keys init --json` prints)."""
        return {name: self.dir / name for name in FILES}

    def to_json(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "owner_guid": self.owner_guid, "created": self.created,
                "files": {name: str(p) for name, p in self.files().items()}}


def _check_uefi_name(name: str) -> None:
    if name not in UEFI_KEYS:
        raise ValueError(f"no such Secure Boot key {name!r} (one of {', '.join(UEFI_KEYS)})")


# ------------------------------------------------------------------------------- making


def _self_signed(common_name: str, key: rsa.RSAPrivateKey) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # not left to the umask
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_existing(dir: Path) -> None:
    if dir.is_symlink() or (dir.exists() and not dir.is_dir()):
        raise KilnError(f"{dir} exists and is not a directory", hint="name a new or empty directory")
    if dir.is_dir() and any(dir.iterdir()):
        raise KilnError(f"{dir} exists and is not empty: refusing to write Secure Boot keys into it",
                        hint="name a new or empty directory (a key set is never overwritten)")


def init(dir: Path, *, name: str = DEFAULT_NAME) -> KeySet:
    """Make a new key set in `dir` (new or empty), all at once or not at all.

    The files are written in a sibling temporary directory that is renamed to `dir` when
    complete, so an interrupted run leaves no half key set behind.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if not _NAME.fullmatch(name):
        raise KilnError(f"--name {name!r}: expected 1-48 letters, digits, spaces, '.', '_' or '-'")
    dir = Path(dir).absolute()
    _refuse_existing(dir)
    contents: dict[str, tuple[bytes, int]] = {}
    for k in UEFI_KEYS:
        key = rsa.generate_private_key(public_exponent=65537, key_size=UEFI_BITS)
        cert = _self_signed(f"{name} {k}", key)
        contents[f"{k}.key"] = (_key_pem(key), 0o600)
        contents[f"{k}.crt"] = (cert.public_bytes(serialization.Encoding.PEM), 0o644)
    contents[BOOT_KEY] = (_key_pem(rsa.generate_private_key(public_exponent=65537, key_size=BOOT_BITS)), 0o600)
    keyset = KeySet(dir, str(uuid.uuid4()), int(time.time()))
    manifest = {"version": 1, "owner_guid": keyset.owner_guid, "created": keyset.created}
    contents[MANIFEST] = ((json.dumps(manifest, indent=2) + "\n").encode(), 0o644)

    dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = dir.with_name(f".{dir.name}.partial-{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(tmp, 0o700)
    try:
        os.chmod(tmp, 0o700)
        for fname, (data, mode) in contents.items():
            _write(tmp / fname, data, mode)
        fsync_dir(tmp)
        _refuse_existing(dir)  # again, just before the rename (which fails on a non-empty dir)
        try:
            os.replace(tmp, dir)
        except OSError as e:
            raise KilnError(f"cannot create {dir}: {e.strerror}", hint="name a new or empty directory") from None
        fsync_dir(dir.parent)
    except BaseException:
        for fname in contents:
            with contextlib.suppress(FileNotFoundError):
                (tmp / fname).unlink()
        with contextlib.suppress(OSError):
            tmp.rmdir()
        raise
    return keyset


# ------------------------------------------------------------------------------- loading


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KilnError(f"Secure Boot key set: {path} is missing",
                        hint="a key directory is made whole by `kiln keys init DIR`") from None
    except OSError as e:
        raise KilnError(f"Secure Boot key set: cannot read {path}: {e.strerror}") from None


def _load_key(path: Path, bits: int) -> rsa.RSAPrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as e:
        raise KilnError(f"Secure Boot key set: {path} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != bits:
        raise KilnError(f"Secure Boot key set: {path} is not an RSA-{bits} key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as e:
        raise KilnError(f"Secure Boot key set: {path} is not a PEM certificate ({e})") from None


def _manifest(path: Path) -> tuple[str, int]:
    try:
        doc = json.loads(_read(path))
    except ValueError as e:
        raise KilnError(f"Secure Boot key set: {path} is not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise KilnError(f"Secure Boot key set: {path}: expected an object with \"version\": 1")
    guid, created = doc.get("owner_guid"), doc.get("created")
    try:
        parsed = uuid.UUID(guid) if isinstance(guid, str) else None
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != guid:
        raise KilnError(f"Secure Boot key set: {path}: owner_guid {guid!r} is not a lower-case GUID")
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise KilnError(f"Secure Boot key set: {path}: created {created!r} is not a Unix time in seconds")
    return guid, created


def load(dir: Path) -> KeySet:
    """Read and check a key directory: every file present, each certificate matching its key.

    A mismatched pair (db.crt from one `init`, db.key from another) would sign binaries the
    firmware then refuses, which shows up only as "Access Denied" at boot; it is caught here.
    """
    dir = Path(dir).absolute()
    if not dir.is_dir():
        raise KilnError(f"Secure Boot key directory {dir} does not exist", hint="make one with `kiln keys init DIR`")
    guid, created = _manifest(dir / MANIFEST)
    keyset = KeySet(dir, guid, created)
    from cryptography.hazmat.primitives import serialization

    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    for k in UEFI_KEYS:
        key, cert = _load_key(keyset.key(k), UEFI_BITS), _load_cert(keyset.cert(k))
        if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
                cert.public_key().public_bytes(serialization.Encoding.DER, spki):
            raise KilnError(f"Secure Boot key set: {keyset.cert(k)} does not match {keyset.key(k)}",
                            hint="the certificate and key come from different key sets; restore the pair")
    _load_key(keyset.boot_key, BOOT_BITS)
    return keyset
