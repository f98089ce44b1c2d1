"""The OVMF variables file with Kiln's keys enrolled: Secure Boot on, in user mode, from the first power-on.

`make_vars` runs virt-firmware's `virt-fw-vars` (PyPI `virt-firmware`, the tool QEMU's
own firmware packaging uses) as `python -m virt.firmware.vars` with this interpreter, so it
is found wherever Kiln is installed (a venv's scripts are not on root's PATH under sudo),
and a bad file makes it exit, not Kiln. It starts from Debian's empty 4 MiB store
(`OVMF_VARS_4M.fd`, the layout `OVMF_CODE_4M.secboot.fd` expects), sets PK and adds KEK
and db (each our certificate, with the key set's owner GUID), and `--sb` adds a
placeholder dbx and sets SecureBootEnable=1, CustomMode=0. With PK set the firmware is in
user mode, so it enforces db from the first boot; no enrollment step runs in the guest.

Reproducible: the authenticated variables' timestamps are the certificates' notBefore
(fixed at 2026-01-01 by kiln.secureboot.keys), not the time of the run, and the store is
written in a fixed order; the same keys give the same bytes (tested).

`read_vars` parses a store back with Kiln's own reader of the edk2 format (firmware volume
→ authenticated variable store → EFI_SIGNATURE_LISTs), independent of the writer, so the
tests check virt-firmware's output rather than its own round trip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import struct
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.core.fs import fsync_dir
from kiln.core.run import run
from kiln.secureboot.keys import UEFI_KEYS, KeySet

VARS_TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Where `kiln build --keys` puts the store (beside disk.img) and `kiln run --secure-boot` looks.
VARS_NAME = "secureboot-vars.fd"

# edk2 GUIDs (MdePkg/MdeModulePkg/SecurityPkg).
NVDATA_FV = uuid.UUID("fff12b8d-7696-4c8b-a985-2747075b4f50")  # gEfiSystemNvDataFvGuid
AUTH_VARS = uuid.UUID("aaf32c78-947b-439a-a180-2e144ec37792")  # gEfiAuthenticatedVariableGuid
GLOBAL = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")  # EFI_GLOBAL_VARIABLE: PK, KEK
IMAGE_SECURITY = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")  # db, dbx
SECURE_BOOT_ENABLE = uuid.UUID("f0a30bc7-af08-4556-99c4-001009c93a44")
CUSTOM_MODE = uuid.UUID("c076ec0c-7028-4399-a072-71ee5c448b9f")
CERT_X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
CERT_SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")

_FVH = 0x4856465F  # "_FVH"
_VAR_START = 0x55AA
_VAR_ADDED = 0x3F
_VAR_ADDED_IN_DELETE = 0x3E  # VAR_ADDED & VAR_IN_DELETED_TRANSITION: still the live copy until replaced
_VAR_HEADER = struct.Struct("<HBxLQ16sLLL16s")  # edk2 AUTHENTICATED_VARIABLE_HEADER, 60 bytes


def _virt_fw_vars() -> list[str]:
    if importlib.util.find_spec("virt") is None or importlib.util.find_spec("virt.firmware.vars") is None:
        raise KilnError("the Python package virt-firmware (virt-fw-vars) is not installed",
                        hint="run 'make setup' (or: pip install virt-firmware)")
    return [sys.executable, "-m", "virt.firmware.vars"]


def make_vars(keys: KeySet, out: Path, template: Path = VARS_TEMPLATE) -> None:
    """Write `out`: OVMF variables with `keys`' PK, KEK and db enrolled and Secure Boot on."""
    if not template.is_file():
        raise KilnError(f"OVMF variables template {template} is missing", hint="apt-get install ovmf")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{os.urandom(4).hex()}")
    guid = keys.owner_guid
    try:
        run([*_virt_fw_vars(), "--input", template, "--output", tmp,
             "--set-pk", guid, keys.cert("PK"), "--add-kek", guid, keys.cert("KEK"),
             "--add-db", guid, keys.cert("db"), "--sb"])
        if tmp.stat().st_size != template.stat().st_size:
            raise KilnError(f"virt-fw-vars wrote {tmp.stat().st_size} bytes, not the template's "
                            f"{template.stat().st_size}: the firmware would not take it")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(out.parent)


# ------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Enrolled:
    """One entry of a signature database: an X.509 certificate or a SHA-256 hash."""

    owner: str  # the EFI signature owner GUID
    kind: str  # "x509" or "sha256" (or the signature type GUID for any other)
    sha256: str  # hex: of the certificate's DER, or the hash itself
    subject: str | None = None  # RFC 4514, certificates only

    def to_json(self) -> dict[str, Any]:
        return {"owner": self.owner, "kind": self.kind, "sha256": self.sha256, "subject": self.subject}


@dataclass(frozen=True)
class Vars:
    """What a variables file says about Secure Boot."""

    pk: tuple[Enrolled, ...]
    kek: tuple[Enrolled, ...]
    db: tuple[Enrolled, ...]
    dbx: tuple[Enrolled, ...]
    secure_boot_enable: bool
    custom_mode: bool
    names: tuple[str, ...]  # every live variable, "Name-guid"

    @property
    def user_mode(self) -> bool:
        """PK is set: the firmware enforces db (without PK it is in setup mode and runs anything)."""
        return bool(self.pk)

    def enrolls(self, keys: KeySet) -> bool:
        """Exactly `keys`' PK, KEK and db certificates are enrolled, under its owner GUID."""
        for name, have in (("PK", self.pk), ("KEK", self.kek), ("db", self.db)):
            want = _cert_fingerprint(keys.cert(name))
            if [(e.kind, e.sha256, e.owner) for e in have] != [("x509", want, keys.owner_guid)]:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {"PK": [e.to_json() for e in self.pk], "KEK": [e.to_json() for e in self.kek],
                "db": [e.to_json() for e in self.db], "dbx": [e.to_json() for e in self.dbx],
                "SecureBootEnable": self.secure_boot_enable, "CustomMode": self.custom_mode,
                "user_mode": self.user_mode}


def _cert_fingerprint(pem: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificate(pem.read_bytes()).fingerprint(hashes.SHA256()).hex()


def _variables(data: bytes, where: Path) -> dict[tuple[str, uuid.UUID], bytes]:
    """The live variables of an edk2 authenticated variable store: (name, vendor GUID) → data."""

    def bad(why: str) -> KilnError:
        return KilnError(f"{where} is not an OVMF variables file: {why}")

    if len(data) < 64 or uuid.UUID(bytes_le=data[16:32]) != NVDATA_FV:
        raise bad("no NV data firmware volume at its start")
    fv_length, signature, _attrs, header_len = struct.unpack_from("<QLLH", data, 32)
    if signature != _FVH or fv_length > len(data) or header_len < 56:
        raise bad("bad firmware volume header")
    if len(data) < header_len + 28 or uuid.UUID(bytes_le=data[header_len:header_len + 16]) != AUTH_VARS:
        raise bad("no authenticated variable store")
    size, fmt, state = struct.unpack_from("<LBB", data, header_len + 16)
    if fmt != 0x5A or state != 0xFE or header_len + size > fv_length:
        raise bad(f"variable store not formatted/healthy (format {fmt:#x}, state {state:#x})")
    pos, end = header_len + 28, header_len + size
    out: dict[tuple[str, uuid.UUID], bytes] = {}
    while pos + _VAR_HEADER.size <= end:
        start, vstate, _attr, _count, _time, _pk, nsize, dsize, guid = _VAR_HEADER.unpack_from(data, pos)
        if start != _VAR_START:
            break  # the free space (0xff) after the last variable
        body = pos + _VAR_HEADER.size
        if nsize % 2 or body + nsize + dsize > end:
            raise bad(f"variable at {pos:#x} runs past the store")
        if vstate in (_VAR_ADDED, _VAR_ADDED_IN_DELETE):
            name = data[body:body + nsize].decode("utf-16-le").rstrip("\0")
            key = (name, uuid.UUID(bytes_le=guid))
            if vstate == _VAR_ADDED or key not in out:
                out[key] = data[body + nsize:body + nsize + dsize]
        pos = (body + nsize + dsize + 3) & ~3
    return out


def _signature_lists(blob: bytes, what: str, where: Path) -> tuple[Enrolled, ...]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    out: list[Enrolled] = []
    pos = 0
    while pos < len(blob):
        if pos + 28 > len(blob):
            raise KilnError(f"{where}: {what} ends inside a signature list header")
        stype = uuid.UUID(bytes_le=blob[pos:pos + 16])
        list_size, header_size, sig_size = struct.unpack_from("<LLL", blob, pos + 16)
        if list_size < 28 + header_size or pos + list_size > len(blob) or sig_size <= 16 \
                or (list_size - 28 - header_size) % sig_size:
            raise KilnError(f"{where}: {what} has a malformed signature list at byte {pos}")
        p = pos + 28 + header_size
        while p < pos + list_size:
            owner = str(uuid.UUID(bytes_le=blob[p:p + 16]))
            sig = blob[p + 16:p + sig_size]
            if stype == CERT_X509:
                try:
                    cert = x509.load_der_x509_certificate(sig)
                except ValueError:
                    raise KilnError(f"{where}: {what} holds a certificate that does not parse") from None
                fingerprint = cert.fingerprint(hashes.SHA256()).hex()
                out.append(Enrolled(owner, "x509", fingerprint, cert.subject.rfc4514_string()))
            elif stype == CERT_SHA256:
                out.append(Enrolled(owner, "sha256", sig.hex()))
            else:
                out.append(Enrolled(owner, str(stype), sig.hex()))
            p += sig_size
        pos += list_size
    return tuple(out)


def read_vars(path: Path) -> Vars:
    """Parse an OVMF variables file: the enrolled PK, KEK, db, dbx and the Secure Boot switches."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KilnError(f"cannot read OVMF variables {path}: {e.strerror}") from None
    found = _variables(data, path)

    def sigs(name: str, guid: uuid.UUID) -> tuple[Enrolled, ...]:
        return _signature_lists(found.get((name, guid), b""), name, path)

    def flag(name: str, guid: uuid.UUID) -> bool:
        return found.get((name, guid), b"\0")[:1] == b"\x01"

    return Vars(
        pk=sigs("PK", GLOBAL), kek=sigs("KEK", GLOBAL), db=sigs("db", IMAGE_SECURITY),
        dbx=sigs("dbx", IMAGE_SECURITY),
        secure_boot_enable=flag("SecureBootEnable", SECURE_BOOT_ENABLE),
        custom_mode=flag("CustomMode", CUSTOM_MODE),
        names=tuple(sorted(f"{n}-{g}" for n, g in found)),
    )


__all__ = ["UEFI_KEYS", "VARS_NAME", "VARS_TEMPLATE", "Enrolled", "Vars", "make_vars", "read_vars"]
