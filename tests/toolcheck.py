"""Every program the test run starts must come from a package `make setup` installs.

A newcomer's machine has only what the Makefile's APT_PACKAGES installs (and Debian's
essential/required base); a developer's machine has whatever earlier work left there, so
a missing package shows up only on the newcomer's. This plugin records the programs the
run actually starts:

- in this process, through an audit hook on `subprocess.Popen`, `os.exec*` and
  `os.posix_spawn` (tests and fixtures that start tools or daemons directly);
- in every child Python process (the `kiln` CLI, fixtures' helpers), through `which()`
  in the one subprocess gateway, which appends to the file named by $KILN_TOOL_LOG;

and at the end maps each to the Debian package that owns it (`dpkg -S`). The session
fails when a package is neither in APT_PACKAGES nor part of every Debian system, or when
`which()` was asked for a tool that `TOOL_PACKAGES` gives no (or a wrong) package hint for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kiln.core.run import TOOL_LOG_ENV, TOOL_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / "Makefile"
PYTHON = re.compile(r"python3(\.\d+)?")


def apt_packages(makefile: Path = MAKEFILE) -> set[str]:
    """The Makefile's APT_PACKAGES (with its backslash continuations)."""
    text = makefile.read_text().replace("\\\n", " ")
    m = re.search(r"^APT_PACKAGES\s*:?=(.*)$", text, re.MULTILINE)
    if not m:
        raise ValueError(f"{makefile}: no APT_PACKAGES line")
    return set(m[1].split())


@dataclass
class Record:
    """What the run started: executable paths, and the names `which()` was asked for."""

    paths: set[str] = field(default_factory=set)
    asked: dict[str, str] = field(default_factory=dict)  # tool -> resolved path ('' if missing)

    def add_path(self, exe: str | bytes | os.PathLike[str] | None) -> None:
        if exe is None:
            return
        text = os.fsdecode(exe)
        if "/" not in text:
            import shutil

            found = shutil.which(text, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
            if found is None:
                return  # the start fails on its own, with its own error
            text = found
        self.paths.add(text)

    def read_log(self, path: Path) -> None:
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            tool, _, found = line.partition("\t")
            self.asked[tool] = found or self.asked.get(tool, "")
            if found:
                self.paths.add(found)


def _alternatives(path: str) -> list[str]:
    """The spellings dpkg may know a path by (merged /usr, symlinks to the real file)."""
    out = [path, os.path.realpath(path)]
    for p in list(out):
        if p.startswith("/usr/"):
            out.append(p[len("/usr"):])
        elif p.startswith(("/bin/", "/sbin/", "/lib/")):
            out.append("/usr" + p)
    return list(dict.fromkeys(out))


def owners(paths: Iterable[str]) -> dict[str, str | None]:
    """Map each path to the Debian package that ships it (None: no package does)."""
    wanted = {p: _alternatives(p) for p in paths}
    every = sorted({a for alts in wanted.values() for a in alts})
    found: dict[str, str] = {}
    if every:
        out = subprocess.run(["dpkg-query", "-S", *every], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("diversion ") or ": " not in line:
                continue
            pkgs, _, path = line.partition(": ")
            found.setdefault(path.strip(), pkgs.split(",")[0].strip().split(":")[0])
    return {p: next((found[a] for a in alts if a in found), None) for p, alts in wanted.items()}


def base_packages(packages: Iterable[str]) -> set[str]:
    """Those of `packages` every Debian system has (Essential: yes, or Priority: required)."""
    names = sorted(set(packages))
    if not names:
        return set()
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\t${Essential}\t${Priority}\n", *names],
        capture_output=True, text=True, check=False,
    ).stdout
    base = set()
    for line in out.splitlines():
        name, essential, priority = [*line.split("\t"), "", ""][:3]
        if essential == "yes" or priority == "required":
            base.add(name)
    return base


def _ignored(path: str) -> bool:
    """Python itself (the venv's interpreter and scripts), files the tests wrote, and
    programs run from memory (/proc/self/fd/N: the migrator's sealed memfd)."""
    if path.startswith("/proc/"):
        return True
    real = os.path.realpath(path)
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, tempfile.gettempdir(), str(ROOT)}
    return any(real.startswith(r.rstrip("/") + "/") or path.startswith(r.rstrip("/") + "/") for r in roots)


def problems(record: Record, listed: set[str], tool_packages: dict[str, str] = TOOL_PACKAGES) -> list[str]:
    """What a fresh machine set up by `make setup` would lack, in words."""
    out: list[str] = []
    paths = sorted(p for p in record.paths if not _ignored(p))
    owner = owners(paths)
    needed = {pkg for pkg in owner.values() if pkg}
    base = base_packages(needed)
    for path in paths:
        pkg = owner[path]
        if pkg is None and PYTHON.fullmatch(os.path.basename(path)):
            pkg = "python3-minimal"  # this machine's own interpreter (pyenv, /usr/local): Debian's on a fresh one
        if pkg is None:
            out.append(f"{path}: started by the tests but shipped by no Debian package (install it from one)")
        elif pkg not in listed and pkg not in base:
            out.append(f"{path}: package '{pkg}' is not in the Makefile's APT_PACKAGES")
    for tool, found in sorted(record.asked.items()):
        if "/" in tool or not found:
            continue  # an absolute path; or a tool that is not installed, which fails its test anyway
        hint = tool_packages.get(tool)
        if hint is None:
            out.append(f"which('{tool}'): no TOOL_PACKAGES entry (kiln.core.run) to name its package in the hint")
            continue
        real = owners([found]).get(found) if found and not _ignored(found) else None
        if real is not None and real != hint:
            out.append(f"which('{tool}'): TOOL_PACKAGES says '{hint}', but dpkg says {found} is from '{real}'")
    return out


class ToolCheck:
    """The pytest plugin: records during the session, judges at its end."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="kiln-tools-", suffix=".log")
        os.close(fd)
        self.log = Path(name)
        os.environ[TOOL_LOG_ENV] = name
        self.record = Record()
        self.report: list[str] = []
        sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple[object, ...]) -> None:
        if event == "subprocess.Popen":
            exe, argv = args[0], args[1]
            if exe is None and isinstance(argv, list | tuple) and argv:
                exe = argv[0]
            elif exe is None and isinstance(argv, str | bytes):
                exe = argv.split()[0] if argv.split() else None
            if isinstance(exe, str | bytes | os.PathLike):
                self.record.add_path(exe)
        elif event in ("os.exec", "os.posix_spawn") and isinstance(args[0], str | bytes | os.PathLike):
            self.record.add_path(args[0])

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.record.read_log(self.log)
        self.log.unlink(missing_ok=True)
        self.report = problems(self.record, apt_packages())
        if self.report and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.report:
            terminalreporter.section("programs a fresh machine would lack (tests/toolcheck.py)", red=True)
            for line in self.report:
                terminalreporter.line(line)
            terminalreporter.line("add the package to APT_PACKAGES in the Makefile (and the tool to TOOL_PACKAGES)")
        else:
            n = len([p for p in self.record.paths if not _ignored(p)])
            terminalreporter.line(f"toolcheck: {n} programs started, every one from a package make setup installs")
