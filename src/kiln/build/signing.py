"""Signing a build for Secure Boot (`kiln build --keys DIR`): the links the builder makes.

The firmware checks GRUB's EFI image against db (Authenticode, `sbsign`); GRUB, whose
embedded configuration turns on `check_signatures=enforce`, checks every file it then
loads against the OpenPGP boot key embedded in that same signed image: grub.cfg on the
ESP, and each slot's kiln.cfg (command line and verity root hash), kernel and initramfs.
The private keys stay in DIR; only signatures and public keys reach the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiln.core.errors import KilnError
from kiln.image.pgp import SigningKey
from kiln.secureboot import pe
from kiln.secureboot.keys import KeySet


@dataclass(frozen=True)
class BootSigner:
    keys: KeySet
    sde: int  # SOURCE_DATE_EPOCH: signatures carry this time (or the key's, if later)

    @cached_property
    def boot_key(self) -> SigningKey:
        path = self.keys.boot_key
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KilnError(f"{path} is not an RSA private key", hint="make a key set with 'kiln keys init DIR'")
        # The key's OpenPGP creation time is part of its fingerprint, so it is fixed per key
        # set: GRUB images from earlier builds must keep finding it by key id.
        return SigningKey(key, created=self.keys.created)

    @property
    def when(self) -> int:
        return max(self.sde, self.keys.created)

    def public_key(self, out: Path) -> Path:
        """The OpenPGP public key GRUB embeds (`grub-mkimage --pubkey`)."""
        out.write_bytes(self.boot_key.public_key())
        return out

    def sign_for_grub(self, *paths: Path) -> list[Path]:
        """A detached `<file>.sig` beside each file."""
        return [self.boot_key.sign_file(p, self.when) for p in paths]

    def sign_efi(self, src: Path, dst: Path) -> None:
        """GRUB's EFI image, signed for the firmware's db."""
        pe.sign_pe(self.keys, src, dst)
