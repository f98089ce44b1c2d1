"""Vendoring the in-image Python dependencies: pinned wheels for the image's CPython."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.build import wheels
from kiln.core.errors import KilnError


def test_shipped_requirements_are_pinned() -> None:
    for req in wheels.read_requirements():
        assert "==" in req


def test_unpinned_requirement_is_refused(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("# deps\nmsgspec>=0.18\n")
    with pytest.raises(KilnError, match=r"requirements.txt:2: 'msgspec>=0.18' must be pinned"):
        wheels.read_requirements(req)


def test_vendor_installs_a_binary_wheel_for_cp311(tmp_path: Path) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    used = wheels.vendor(["msgspec==0.18.6"], site, cache)
    assert [w.name.split("-")[0] for w in used] == ["msgspec"]
    assert "cp311" in used[0].name and "manylinux" in used[0].name
    assert (site / "msgspec" / "__init__.py").is_file()
    assert list((site / "msgspec").glob("_core.cpython-311-x86_64-linux-gnu.so"))
    # Second run: served from the cache, same result.
    assert wheels.vendor(["msgspec==0.18.6"], site, cache) == used


def test_unknown_wheel_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match="cannot download the in-image Python wheels"):
        wheels.vendor(["kiln-no-such-package-xyz==1.0"], tmp_path / "site", tmp_path / "cache")
