"""OpenPGP (RFC 4880) v4 RSA keys and detached signatures, the form GRUB's `pgp` module checks.

GRUB verifies every file it loads when `check_signatures=enforce`, against the public key
embedded in its signed core image; it reads a detached `<file>.sig` beside each file. Kiln
writes these packets itself instead of driving gpg: no keyring or agent state, and the
bytes depend only on the key, the data and the given time (RSA PKCS#1 v1.5 signing is
deterministic), so a signed build stays reproducible under SOURCE_DATE_EPOCH.

GRUB's reader is narrow, and this writer stays inside it: signature type 0 (binary
document), RSA (algorithm 1), SHA-256, creation time in the hashed area and the issuer
key id in the *unhashed* area (GRUB 2.06 looks for it nowhere else). The public key is
exported with a user id and a self-certification so that gpg/gpgv accept it too; GRUB
skips those packets.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

PUBKEY_ALGO_RSA = 1
HASH_SHA256 = 8
SIG_BINARY = 0x00
SIG_POSITIVE_CERT = 0x13
TAG_SIGNATURE, TAG_PUBLIC_KEY, TAG_USER_ID = 2, 6, 13
SUB_CREATION_TIME, SUB_ISSUER, SUB_KEY_FLAGS, SUB_ISSUER_FPR = 2, 16, 27, 33
KEY_FLAG_SIGN = 0x02


def _mpi(n: int) -> bytes:
    return struct.pack(">H", n.bit_length()) + n.to_bytes((n.bit_length() + 7) // 8, "big")


def _packet(tag: int, body: bytes) -> bytes:
    """An old-format packet header (RFC 4880 4.2.1), as gpg writes these tags. Not the new
    format: GRUB 2.06 decodes its two-octet lengths without the +192 the RFC adds."""
    n = len(body)
    if n < 0x100:
        return bytes([0x80 | tag << 2 | 0, n]) + body
    if n < 0x10000:
        return bytes([0x80 | tag << 2 | 1]) + struct.pack(">H", n) + body
    return bytes([0x80 | tag << 2 | 2]) + struct.pack(">I", n) + body


def _subpacket(kind: int, data: bytes) -> bytes:
    assert len(data) + 1 < 192
    return bytes([len(data) + 1, kind]) + data


@dataclass(frozen=True)
class SigningKey:
    """An RSA private key as an OpenPGP v4 primary key created at `created` (Unix time)."""

    private: rsa.RSAPrivateKey
    created: int
    user_id: str = "Kiln boot signing key"

    @property
    def key_body(self) -> bytes:
        pub = self.private.public_key().public_numbers()
        return struct.pack(">BIB", 4, self.created, PUBKEY_ALGO_RSA) + _mpi(pub.n) + _mpi(pub.e)

    @property
    def fingerprint(self) -> bytes:
        body = self.key_body
        return hashlib.sha1(b"\x99" + struct.pack(">H", len(body)) + body, usedforsecurity=False).digest()

    @property
    def key_id(self) -> bytes:
        return self.fingerprint[-8:]

    def _signature(self, sig_type: int, chunks: Iterable[bytes], when: int, extra_hashed: bytes = b"") -> bytes:
        hashed = _subpacket(SUB_CREATION_TIME, struct.pack(">I", when)) + extra_hashed
        unhashed = _subpacket(SUB_ISSUER, self.key_id)
        head = struct.pack(">BBBBH", 4, sig_type, PUBKEY_ALGO_RSA, HASH_SHA256, len(hashed)) + hashed
        h = hashlib.sha256()
        for chunk in chunks:
            h.update(chunk)
        h.update(head)
        h.update(b"\x04\xff" + struct.pack(">I", len(head)))
        digest = h.digest()
        sig = self.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        body = head + struct.pack(">H", len(unhashed)) + unhashed + digest[:2] + _mpi(int.from_bytes(sig, "big"))
        return _packet(TAG_SIGNATURE, body)

    def public_key(self) -> bytes:
        """The transferable public key: key, user id and its self-certification (what
        `grub-mkimage --pubkey` embeds and `gpgv --keyring` reads)."""
        body = self.key_body
        uid = self.user_id.encode()
        certified = [b"\x99" + struct.pack(">H", len(body)) + body, b"\xb4" + struct.pack(">I", len(uid)) + uid]
        flags = _subpacket(SUB_KEY_FLAGS, bytes([KEY_FLAG_SIGN]))
        flags += _subpacket(SUB_ISSUER_FPR, b"\x04" + self.fingerprint)
        cert = self._signature(SIG_POSITIVE_CERT, certified, self.created, flags)
        return _packet(TAG_PUBLIC_KEY, body) + _packet(TAG_USER_ID, uid) + cert

    def sign(self, chunks: Iterable[bytes], when: int) -> bytes:
        """A detached signature over the concatenated `chunks`, made at `when`."""
        if when < self.created:
            raise ValueError(f"signature time {when} is before the key's creation time {self.created}")
        return self._signature(SIG_BINARY, chunks, when)

    def sign_file(self, path: Path, when: int) -> Path:
        """Write `<path>.sig` (GRUB's name for a file's detached signature)."""
        sig = path.with_name(path.name + ".sig")
        sig.write_bytes(self.sign(_read_chunks(path), when))
        return sig


def _read_chunks(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk
