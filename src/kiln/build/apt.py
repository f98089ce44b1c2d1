"""Resolve and download Debian package closures with apt, in a private state directory.

apt runs with its own lists, an empty dpkg status file and its own archive cache under the
Kiln cache, so it never reads or changes the host's dpkg database, and it checks every
download against the archive's signed Release file as usual. The result is a list of
exact (package, version, .deb path) entries: the image's package manifest.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.core.errors import KilnError
from kiln.core.run import CommandError, run

_KEYRING = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_SOURCES = "".join(
    f"deb [{_KEYRING}] http://deb.debian.org/{archive} {suite} main\n"
    for archive, suite in (
        ("debian", "bookworm"),
        ("debian", "bookworm-updates"),
        ("debian-security", "bookworm-security"),
    )
)
LISTS_MAX_AGE = 6 * 3600  # re-run `apt-get update` when the private lists are older than this


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str
    deb: Path


class Apt:
    """An apt instance confined to `root` (lists, status, archives)."""

    def __init__(self, root: Path, arch: str = "amd64", sources: str = DEFAULT_SOURCES) -> None:
        self.root = root
        self.arch = arch
        self.archives = root / "archives"
        (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.archives / "partial").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "preferences.d").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "sources.list").write_text(sources)
        self.status = root / "status"
        self.status.write_text("")  # an empty system: apt resolves the whole closure

    def _argv(self, *args: str) -> list[str]:
        r = self.root
        opts = {
            "APT::Architecture": self.arch,
            "APT::Architectures": self.arch,
            "APT::Install-Recommends": "false",
            "APT::Install-Suggests": "false",
            "Dir::State": str(r),
            "Dir::State::lists": str(r / "lists"),
            "Dir::State::status": str(self.status),
            "Dir::Cache": str(r / "cache"),
            "Dir::Cache::archives": str(self.archives),
            "Dir::Etc::SourceList": str(r / "etc" / "sources.list"),
            "Dir::Etc::SourceParts": str(r / "etc" / "sources.list.d"),
            "Dir::Etc::Preferences": str(r / "etc" / "preferences"),
            "Dir::Etc::PreferencesParts": str(r / "etc" / "preferences.d"),
            "Dir::Log": str(r / "log"),
            "Debug::NoLocking": "true",
            "Acquire::Languages": "none",
            "Acquire::Retries": "3",
        }
        argv = ["apt-get", "-q"]
        for k, v in opts.items():
            argv += ["-o", f"{k}={v}"]
        return [*argv, *args]

    def update(self, force: bool = False) -> bool:
        """Refresh the private package lists; returns whether it ran."""
        stamp = self.root / "lists" / ".kiln-updated"
        if not force and stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE:
            return False
        try:
            run(self._argv("update"))
        except CommandError as e:
            raise KilnError(
                "could not refresh Debian package lists", hint="check the network or the apt sources"
            ) from e
        stamp.touch()
        return True

    def resolve(self, packages: list[str], what: str) -> list[tuple[str, str, str]]:
        """The full dependency closure of `packages` as (name, version, arch), sorted."""
        try:
            out = run(self._argv("install", "-s", "-y", *packages)).stdout.decode()
        except CommandError as e:
            missing = re.findall(r"Unable to locate package (\S+)", e.stderr)
            if missing:
                raise KilnError(
                    f"{what}: unknown Debian package '{missing[0]}'",
                    hint="check the spelling; 'apt-cache search' on a Debian 12 machine helps",
                ) from None
            broken = re.findall(r"^\s*(\S+) : Depends: .*$", e.stderr, re.M)
            if broken or "no installation candidate" in e.stderr:
                detail = e.stderr.strip().splitlines()[-6:]
                raise KilnError(f"{what}: packages cannot be installed together:\n" + "\n".join(detail)) from None
            raise
        found = re.findall(r"^Inst (\S+) \((\S+) [^\[]*\[(\S+)\]\)", out, re.M)
        if not found:
            raise KilnError(f"{what}: apt resolved no packages for {packages}")
        return sorted(found)

    def _deb(self, name: str, version: str, arch: str) -> Path:
        return self.archives / f"{name}_{version.replace(':', '%3a')}_{arch}.deb"

    def download(self, packages: list[str], what: str) -> list[Package]:
        """Resolve and fetch the closure into the cache (apt verifies against Release)."""
        closure = self.resolve(packages, what)
        if not all(self._deb(*c).is_file() for c in closure):
            run(self._argv("install", "--download-only", "-y", *packages))
        result = []
        for name, version, arch in closure:
            deb = self._deb(name, version, arch)
            if not deb.is_file():
                raise KilnError(f"{what}: apt did not download {name} {version} ({deb.name})")
            result.append(Package(name, version, arch, deb))
        return result
