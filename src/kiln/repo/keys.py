"""Private signing keys: `DIR/keys/<role>-<n>.pem`, ed25519, unencrypted PKCS#8.

The directory is 0700 and every key file 0600, written atomically. A key's public half
(and so its TUF key id) is derived from the private key; which role a key signs for is
decided by root metadata, the file name is only for people. `securesystemslib` and
`cryptography` are imported on first use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.core.errors import KilnError
from kiln.core.fs import atomic_write, fsync_dir

if TYPE_CHECKING:
    from securesystemslib.signer import CryptoSigner

_KEY_FILE = re.compile(r"^(root|targets|snapshot|timestamp)-(\d+)\.pem$")


@dataclass(frozen=True)
class KeyFile:
    path: Path
    role: str
    signer: CryptoSigner

    @property
    def keyid(self) -> str:
        return str(self.signer.public_key.keyid)


class KeyStore:
    """The private keys of one repository, loaded once and indexed by key id."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._loaded: dict[str, KeyFile] | None = None

    def _load(self) -> dict[str, KeyFile]:
        if self._loaded is None:
            self._loaded = {}
            if self.dir.is_dir():
                for path in sorted(self.dir.iterdir()):
                    m = _KEY_FILE.match(path.name)
                    if m:
                        kf = KeyFile(path, m[1], _read_signer(path))
                        self._loaded[kf.keyid] = kf
        return self._loaded

    def get(self, keyid: str) -> KeyFile | None:
        return self._load().get(keyid)

    def signers(self, keyids: list[str]) -> list[CryptoSigner]:
        """The signers we hold for these key ids (in the given order; missing ones skipped)."""
        keys = self._load()
        return [keys[k].signer for k in keyids if k in keys]

    def generate(self, role: str) -> KeyFile:
        """A new ed25519 key for `role`, written as the next free `<role>-<n>.pem`."""
        from securesystemslib.signer import CryptoSigner

        keys = self._load()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        used = [int(m[2]) for p in self.dir.iterdir() if (m := _KEY_FILE.match(p.name)) and m[1] == role]
        path = self.dir / f"{role}-{max(used, default=0) + 1}.pem"
        signer = CryptoSigner.generate_ed25519()
        atomic_write(path, signer.private_bytes, mode=0o600)
        kf = KeyFile(path, role, signer)
        keys[kf.keyid] = kf
        return kf

    def remove(self, keyids: list[str]) -> list[Path]:
        """Delete the private key files of these key ids; returns the paths removed."""
        keys = self._load()
        removed = []
        for keyid in keyids:
            kf = keys.pop(keyid, None)
            if kf is not None:
                kf.path.unlink(missing_ok=True)
                removed.append(kf.path)
        if removed:
            fsync_dir(self.dir)
        return removed


def _read_signer(path: Path) -> CryptoSigner:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    try:
        private = load_pem_private_key(path.read_bytes(), password=None)
        return CryptoSigner(private)
    except (ValueError, TypeError) as e:
        raise KilnError(f"{path}: not an unencrypted PEM private key ({e})") from None
