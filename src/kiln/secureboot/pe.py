"""Authenticode signatures on EFI binaries (GRUB's BOOTX64.EFI), for the firmware's db check.

`sbsign` (sbsigntool) signs; `sbverify` checks. sbsign alone is not reproducible: OpenSSL
adds a PKCS#7 signingTime attribute with the current time (measured: two signatures of
the same GRUB a second apart differ in 258 bytes: the time, the RSA signature over the
signed attributes, the PE checksum), and sbsign has no option to set or drop it. So
sbsign runs under `faketime` with a frozen clock: SOURCE_DATE_EPOCH when set (the
reproducible-builds convention, as the rest of the build), else the db certificate's
notBefore. edk2 ignores the signing time (it verifies with time checks off), so the value
only has to be stable. RSA PKCS#1 v1.5 signatures are deterministic, so the same key and
the same file then give the same bytes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path

from kiln.core.errors import KilnError
from kiln.core.fs import fsync_dir
from kiln.core.run import run, which
from kiln.secureboot.keys import KeySet


def signing_time(keys: KeySet) -> dt.datetime:
    """The clock sbsign sees: SOURCE_DATE_EPOCH, else the db certificate's notBefore."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env is not None:
        try:
            return dt.datetime.fromtimestamp(int(env), dt.UTC)
        except (ValueError, OverflowError, OSError):
            raise KilnError(f"SOURCE_DATE_EPOCH: '{env}' is not a number of seconds") from None
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(keys.db_crt.read_bytes())
    return cert.not_valid_before_utc


def sign_pe(keys: KeySet, src: Path, dst: Path) -> None:
    """Sign the PE/COFF image `src` with db.key/db.crt into `dst` (written atomically).

    Deterministic: the same keys and the same `src` give the same `dst`, byte for byte.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise KilnError(f"cannot sign {src}: no such file")
    when = signing_time(keys).strftime("%Y-%m-%d %H:%M:%S")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        # An absolute faketime date (no '@') freezes the clock, so the second never ticks over.
        run(["faketime", "-f", when, which("sbsign"), "--key", keys.db_key, "--cert", keys.db_crt,
             "--output", tmp, src], env={"TZ": "UTC"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(dst.parent)


def verify_pe(cert: Path, path: Path) -> bool:
    """True if `path` carries a valid Authenticode signature by `cert` (`sbverify --cert`).

    False for an unsigned image, another signer, or any changed byte the signature covers.
    """
    if not Path(path).is_file():
        raise KilnError(f"cannot verify {path}: no such file")
    if not Path(cert).is_file():
        raise KilnError(f"cannot verify against {cert}: no such certificate")
    return run(["sbverify", "--cert", cert, path], check=False).returncode == 0
