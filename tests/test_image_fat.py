"""kiln.image.fat against filesystems made by mkfs.vfat and filled by mtools."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.core.errors import KilnError
from kiln.image.fat import Extent, find_file

ReadAt = Callable[[int, int], bytes]


def _run(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True)


def _mkfs(img: Path, fat: int, kib: int) -> None:
    _run("mkfs.vfat", "-C", "-F", str(fat), str(img), str(kib))


def _put(img: Path, tmp: Path, dest: str, content: bytes) -> None:
    src = tmp / "src.bin"
    src.write_bytes(content)
    _run("mcopy", "-o", "-i", str(img), str(src), f"::{dest}")


def _reader(img: Path, base: int = 0) -> ReadAt:
    data = img.read_bytes()

    def read_at(offset: int, size: int) -> bytes:
        return data[base + offset : base + offset + size]

    return read_at


def _content(read_at: ReadAt, ext: Extent) -> bytes:
    return read_at(ext.offset, ext.length)


@pytest.fixture(params=[(32, 65536), (16, 32768), (12, 1440)], ids=["fat32", "fat16", "fat12"])
def esp(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    fat, kib = request.param
    img = tmp_path / "esp.img"
    _mkfs(img, fat, kib)
    _run("mmd", "-i", str(img), "::/EFI", "::/EFI/BOOT", "::/EFI/kiln", "::/loader")
    files = {
        "/EFI/BOOT/BOOTX64.EFI": os.urandom(70_000),
        "/EFI/BOOT/grub.cfg": b"set default=0\n" * 50,
        "/EFI/kiln/a-rather-long-file-name.conf": os.urandom(3000),
        "/loader/notes.txt": b"hello\n",
        "/EFI/BOOT/grubenv": b"# GRUB Environment Block\n".ljust(1024, b"#"),
    }
    for dest, content in files.items():
        _put(img, tmp_path, dest, content)
    return img, files


def test_finds_every_file(esp: tuple[Path, dict[str, bytes]]) -> None:
    img, files = esp
    read_at = _reader(img)
    for path, content in files.items():
        ext = find_file(read_at, path)
        assert ext.length == len(content)
        assert _content(read_at, ext) == content, path


def test_names_are_case_insensitive(esp: tuple[Path, dict[str, bytes]]) -> None:
    img, files = esp
    read_at = _reader(img)
    want = files["/EFI/BOOT/grubenv"]
    for path in ("/efi/boot/GRUBENV", "EFI/BOOT/grubenv", "//Efi/Boot/GrubEnv"):
        assert _content(read_at, find_file(read_at, path)) == want
    # Only the long-name entries can match this; the short name is A-RATH~1.CON.
    ext = find_file(read_at, "/efi/KILN/A-Rather-Long-File-Name.CONF")
    assert _content(read_at, ext) == files["/EFI/kiln/a-rather-long-file-name.conf"]


def test_in_place_rewrite_is_seen_by_mtools(
    esp: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """The whole point: overwrite the extent's bytes, mtools reads the new content."""
    img, _ = esp
    ext = find_file(_reader(img), "/EFI/BOOT/grubenv")
    new = b"# GRUB Environment Block\nkiln_slot=b\n".ljust(1024, b"#")
    with img.open("r+b") as f:
        f.seek(ext.offset)
        f.write(new)
    out = tmp_path / "out"
    _run("mcopy", "-i", str(img), "::/EFI/BOOT/grubenv", str(out))
    assert out.read_bytes() == new
    _run("fsck.vfat", "-n", str(img))


def test_filesystem_at_an_offset(esp: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    """As on the raw disk: the ESP starts 1 MiB in; offsets stay filesystem-relative."""
    img, files = esp
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20) + img.read_bytes())
    read_at = _reader(disk, base=1 << 20)
    ext = find_file(read_at, "/EFI/BOOT/grubenv")
    assert disk.read_bytes()[(1 << 20) + ext.offset :][: ext.length] == files["/EFI/BOOT/grubenv"]


@pytest.mark.parametrize(
    ("path", "culprit"),
    [
        ("/EFI/BOOT/missing.cfg", "/EFI/BOOT/missing.cfg"),
        ("/EFI/NOPE/grubenv", "/EFI/NOPE"),
        ("/nothere", "/nothere"),
    ],
)
def test_missing_path_raises(esp: tuple[Path, dict[str, bytes]], path: str, culprit: str) -> None:
    img, _ = esp
    with pytest.raises(KilnError, match=f"'{culprit}' not found"):
        find_file(_reader(img), path)


def test_directory_and_file_confusion_raises(esp: tuple[Path, dict[str, bytes]]) -> None:
    img, _ = esp
    with pytest.raises(KilnError, match="is a directory"):
        find_file(_reader(img), "/EFI/BOOT")
    with pytest.raises(KilnError, match="not a directory"):
        find_file(_reader(img), "/loader/notes.txt/x")


def test_fragmented_file_raises(tmp_path: Path) -> None:
    img = tmp_path / "frag.img"
    _mkfs(img, 16, 32768)  # 2 KiB clusters
    _run("mmd", "-i", str(img), "::/EFI")
    for i in range(3):
        _put(img, tmp_path, f"/EFI/f{i}", os.urandom(2048))
    _run("mdel", "-i", str(img), "::/EFI/f1")
    _put(img, tmp_path, "/EFI/big", os.urandom(100_000))  # fills f1's hole, then jumps
    read_at = _reader(img)
    find_file(read_at, "/EFI/f2")
    with pytest.raises(KilnError, match=r"'/EFI/big' is fragmented"):
        find_file(read_at, "/EFI/big")


def test_not_fat_raises(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match="not a FAT filesystem"):
        find_file(_reader_of(bytes(4096)), "/x")


def _reader_of(data: bytes) -> ReadAt:
    return lambda offset, size: data[offset : offset + size]
