"""kiln.image.grubenv against grub-editenv, in both directions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kiln.core.errors import KilnError
from kiln.image import grubenv


def _editenv(path: Path, *args: str) -> str:
    return subprocess.run(
        ["grub-editenv", str(path), *args], check=True, capture_output=True, text=True
    ).stdout


ENV = {
    "kiln_slot": "a",
    "kiln_a_tries": "3",
    "kiln_b_ok": "0",
    "empty": "",
    "eq": "x=y=z",
    "backslash": "C:\\path\\",
    "unicode": "grüße",
}


def test_serialize_is_read_by_grub_editenv(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    block = grubenv.serialize(ENV)
    assert len(block) == grubenv.SIZE
    assert block.startswith(b"# GRUB Environment Block\n")
    assert block.endswith(b"#")
    path.write_bytes(block)
    assert _editenv(path, "list") == "".join(f"{k}={v}\n" for k, v in ENV.items())


def test_parse_reads_grub_editenv_output(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    _editenv(path, "create")
    _editenv(path, "set", "a=1", "b=x")
    assert grubenv.parse(path.read_bytes()) == {"a": "1", "b": "x"}
    _editenv(path, "set", "c=back\\slash", "a=2", "d=multi\nline")
    env = grubenv.parse(path.read_bytes())
    assert env == {"a": "2", "b": "x", "c": "back\\slash", "d": "multi\nline"}


def test_grub_editenv_set_after_serialize(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(grubenv.serialize(ENV))
    _editenv(path, "set", "kiln_slot=b", "new=1")
    _editenv(path, "unset", "kiln_b_ok")
    want = {k: v for k, v in ENV.items() if k != "kiln_b_ok"} | {"kiln_slot": "b", "new": "1"}
    assert grubenv.parse(path.read_bytes()) == want
    assert grubenv.parse(grubenv.serialize(want)) == want


def test_round_trip() -> None:
    assert grubenv.parse(grubenv.serialize(ENV)) == ENV
    assert list(grubenv.parse(grubenv.serialize(ENV))) == list(ENV)  # order kept


def test_too_large_raises() -> None:
    with pytest.raises(KilnError, match="1024"):
        grubenv.serialize({"big": "x" * 1000})
    exact = {"k": "x" * (grubenv.SIZE - len(grubenv.HEADER) - 3)}
    assert grubenv.serialize(exact).endswith(b"x\n")


def test_fits_first_sector() -> None:
    assert grubenv.fits_first_sector(ENV)
    assert not grubenv.fits_first_sector({"k": "x" * 500})
    limit = grubenv.SECTOR - len(grubenv.HEADER) - 3
    assert grubenv.fits_first_sector({"k": "x" * limit})
    assert not grubenv.fits_first_sector({"k": "x" * (limit + 1)})


@pytest.mark.parametrize(
    "env",
    [{"a=b": "1"}, {"a\nb": "1"}, {"": "1"}, {"#a": "1"}, {"a": "1\n2"}],
    ids=["eq-in-key", "newline-in-key", "empty-key", "comment-key", "newline-in-value"],
)
def test_invalid_variables_raise(env: dict[str, str]) -> None:
    with pytest.raises(KilnError, match="grubenv"):
        grubenv.serialize(env)


def test_parse_rejects_bad_blocks() -> None:
    with pytest.raises(KilnError, match="1023 bytes"):
        grubenv.parse(grubenv.serialize({})[:-1])
    with pytest.raises(KilnError, match="does not start"):
        grubenv.parse(b"#" * grubenv.SIZE)
