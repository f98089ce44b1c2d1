"""The check that keeps `make setup` complete (tests/toolcheck.py), and the hints of `which()`."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

from kiln.core.errors import KilnError
from kiln.core.run import TOOL_PACKAGES, which
from tests.toolcheck import MAKEFILE, Record, apt_packages, base_packages, owners, problems

ROOT = Path(__file__).resolve().parents[1]
GATEWAY_CALLS = {"run", "which", "spawn", "Popen"}


def literal_tools(src: Path) -> dict[str, str]:
    """Program names written literally where the code starts or resolves a program:
    `which("x")`, `run(["x", ...])`, `Popen(["x", ...])` -> {name: file}."""
    found: dict[str, str] = {}
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name not in GATEWAY_CALLS:
                continue
            arg = node.args[0]
            if isinstance(arg, ast.List | ast.Tuple) and arg.elts:
                arg = arg.elts[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and "/" not in arg.value:
                found.setdefault(arg.value, str(path.relative_to(ROOT)))
    return found


def test_every_program_the_code_names_has_a_package_hint() -> None:
    tools = literal_tools(ROOT / "src")
    assert {"zstd", "mkfs.erofs", "docker-registry", "qemu-system-x86_64"} <= set(tools)  # the scan sees them
    missing = {t: f for t, f in tools.items() if t not in TOOL_PACKAGES}
    assert not missing, f"add these to TOOL_PACKAGES in kiln/core/run.py: {missing}"


def test_every_hinted_package_is_one_make_setup_installs() -> None:
    listed = apt_packages()
    pkgs = set(TOOL_PACKAGES.values())
    assert not pkgs - listed - base_packages(pkgs), "TOOL_PACKAGES names a package the Makefile does not install"


@pytest.mark.parametrize("tool", sorted(TOOL_PACKAGES))
def test_hint_names_the_package_that_ships_the_tool(tool: str) -> None:
    path = shutil.which(tool, path="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    assert path, f"{tool} is not installed: make setup should have installed {TOOL_PACKAGES[tool]}"
    assert owners([path])[path] == TOOL_PACKAGES[tool]


def test_a_missing_tool_names_its_package() -> None:
    TOOL_PACKAGES["kiln-no-such-tool"] = "kiln-no-such-package"
    try:
        with pytest.raises(KilnError) as e:
            which("kiln-no-such-tool")
        assert e.value.hint == "apt-get install kiln-no-such-package"
    finally:
        del TOOL_PACKAGES["kiln-no-such-tool"]


def test_the_makefile_list_is_read_whole() -> None:
    listed = apt_packages()
    assert {"qemu-system-x86", "containerd", "runc", "etcd-server", "etcd-client"} <= listed  # first and last lines


def test_a_package_removed_from_the_list_fails_the_check(tmp_path: Path) -> None:
    """What the session-end check reports when containerd's package is not in the list."""
    containerd = shutil.which("containerd")
    assert containerd
    rec = Record(paths={containerd, "/usr/bin/true"}, asked={"containerd": containerd})
    assert problems(rec, apt_packages()) == []  # coreutils is essential: never listed
    makefile = tmp_path / "Makefile"
    makefile.write_text(re.sub(r"(?<=\s)containerd(?=\s)", "", MAKEFILE.read_text()))
    report = problems(rec, apt_packages(makefile))
    assert report == [f"{containerd}: package 'containerd' is not in the Makefile's APT_PACKAGES"]


def test_unhinted_and_wrongly_hinted_tools_are_reported() -> None:
    sgdisk = shutil.which("sgdisk")
    assert sgdisk
    rec = Record(paths={sgdisk}, asked={"sgdisk": sgdisk})
    assert problems(rec, apt_packages(), {"sgdisk": "fdisk"}) == [
        f"which('sgdisk'): TOOL_PACKAGES says 'fdisk', but dpkg says {sgdisk} is from 'gdisk'"
    ]
    assert problems(rec, apt_packages(), {}) == [
        "which('sgdisk'): no TOOL_PACKAGES entry (kiln.core.run) to name its package in the hint"
    ]


def test_a_program_no_package_ships_is_reported(tmp_path: Path) -> None:
    rec = Record(paths={"/opt/kiln-test/bin/tool"})
    assert problems(rec, apt_packages()) == [
        "/opt/kiln-test/bin/tool: started by the tests but shipped by no Debian package (install it from one)"
    ]


def test_paths_are_matched_across_merged_usr() -> None:
    # e2fsprogs ships /sbin/mkfs.ext4; on merged /usr, which() finds /usr/sbin/mkfs.ext4.
    assert owners(["/usr/sbin/mkfs.ext4"])["/usr/sbin/mkfs.ext4"] == "e2fsprogs"
