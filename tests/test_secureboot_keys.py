"""The workstation's Secure Boot side: key sets, signed EFI binaries, the OVMF variables file.

Real tools throughout: `cryptography` makes the keys, `sbsign`/`sbverify` sign and check a
real PE made by `grub-mkimage`, `virt-fw-vars` writes the variables that Kiln's own edk2
reader parses back (and Debian's Microsoft-enrolled store is read by the same reader).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from kiln.cli.main import main
from kiln.cli.run_cmd import secure_boot_vars
from kiln.core.errors import KilnError
from kiln.core.run import run
from kiln.secureboot import keys, pe, varstore
from kiln.vm.qemu import OVMF_CODE, OVMF_CODE_SECBOOT, VmConfig

KEY_FILES = {"PK.key", "KEK.key", "db.key", "boot.key"}


@pytest.fixture(scope="module")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> keys.KeySet:
    return keys.init(tmp_path_factory.mktemp("sb") / "keys")


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> keys.KeySet:
    return keys.init(tmp_path_factory.mktemp("sb") / "other", name="Other")


@pytest.fixture(scope="module")
def efi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, unsigned x86_64 EFI application: a GRUB core image."""
    out = tmp_path_factory.mktemp("pe") / "grub.efi"
    run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/EFI/BOOT", "-o", out, "normal"])
    return out


# ------------------------------------------------------------------------------- keys init


def test_init_writes_the_hierarchy_private(keyset: keys.KeySet) -> None:
    d = keyset.dir
    assert sorted(p.name for p in d.iterdir()) == sorted(keys.FILES)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in KEY_FILES:
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")], "a temporary directory was left"
    manifest = json.loads(keyset.manifest.read_text())
    assert manifest == {"version": 1, "owner_guid": keyset.owner_guid, "created": keyset.created}
    assert abs(manifest["created"] - time.time()) < 600
    for k in ("PK", "KEK", "db"):
        cert = x509.load_pem_x509_certificate(keyset.cert(k).read_bytes())
        assert cert.subject.rfc4514_string() == f"CN=Kiln {k}" and cert.issuer == cert.subject
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        public = cert.public_key()
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
        assert (cert.not_valid_before_utc.year, cert.not_valid_after_utc.year) == (2026, 2126)
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert keys.load(keyset.dir) == keyset


def test_init_name_and_json_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "init", str(tmp_path / "k"), "--name", "Acme Fleet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["files"]) == set(keys.FILES) and all(Path(p).is_file() for p in out["files"].values())
    cert = x509.load_pem_x509_certificate(Path(out["files"]["db.crt"]).read_bytes())
    assert cert.subject.rfc4514_string() == "CN=Acme Fleet db"
    assert keys.load(tmp_path / "k").owner_guid == out["owner_guid"]
    assert main(["keys", "show", str(tmp_path / "k")]) == 0
    assert "matching" in capsys.readouterr().out


def test_init_takes_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    keys.init(tmp_path / "empty")
    assert keys.load(tmp_path / "empty")


def test_init_refuses_a_directory_with_anything_in_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "full"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    assert main(["keys", "init", str(d)]) == 1
    err = capsys.readouterr().err
    assert str(d) in err and "not empty" in err
    assert [p.name for p in d.iterdir()] == ["notes.txt"] and (d / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["full"], "nothing written beside it either"
    (tmp_path / "file").write_text("x")
    with pytest.raises(KilnError, match="not a directory"):
        keys.init(tmp_path / "file")
    with pytest.raises(KilnError, match="--name"):
        keys.init(tmp_path / "new", name="")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------- load


def _copy(src: keys.KeySet, dest: Path) -> Path:
    shutil.copytree(src.dir, dest)
    return dest


def test_load_names_a_missing_file(keyset: keys.KeySet, tmp_path: Path) -> None:
    for name in keys.FILES:
        d = _copy(keyset, tmp_path / name)
        (d / name).unlink()
        with pytest.raises(KilnError, match=str(d / name)):
            keys.load(d)
    with pytest.raises(KilnError, match="does not exist"):
        keys.load(tmp_path / "nowhere")


def test_load_names_a_mismatched_or_broken_file(keyset: keys.KeySet, other: keys.KeySet, tmp_path: Path) -> None:
    d = _copy(keyset, tmp_path / "mixed")
    shutil.copy(other.db_crt, d / "db.crt")
    with pytest.raises(KilnError, match=r"db\.crt does not match .*db\.key"):
        keys.load(d)

    d = _copy(keyset, tmp_path / "swapped")
    shutil.copy(keyset.key("KEK"), d / "PK.key")
    with pytest.raises(KilnError, match=r"PK\.crt does not match"):
        keys.load(d)

    d = _copy(keyset, tmp_path / "garbage")
    (d / "KEK.crt").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(KilnError, match=r"KEK\.crt is not a PEM certificate"):
        keys.load(d)

    d = _copy(keyset, tmp_path / "small-boot")
    shutil.copy(keyset.db_key, d / "boot.key")  # a 2048-bit key where the 3072-bit one belongs
    with pytest.raises(KilnError, match=r"boot\.key is not an RSA-3072 key"):
        keys.load(d)

    d = _copy(keyset, tmp_path / "unreadable")
    (d / "db.key").unlink()
    (d / "db.key").mkdir()  # unreadable as a file even for root
    with pytest.raises(KilnError, match=r"cannot read .*db\.key"):
        keys.load(d)

    for bad in ({"version": 2}, {"version": 1, "owner_guid": "X", "created": 1},
                {"version": 1, "owner_guid": keyset.owner_guid, "created": "today"}, []):
        d = _copy(keyset, tmp_path / f"manifest-{len(list(tmp_path.iterdir()))}")
        (d / keys.MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(KilnError, match=keys.MANIFEST):
            keys.load(d)


# ------------------------------------------------------------------------------- signed PE


def test_sign_pe_verifies_and_is_deterministic(keyset: keys.KeySet, other: keys.KeySet, efi: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    before = efi.read_bytes()
    first, second = tmp_path / "a.efi", tmp_path / "b.efi"
    pe.sign_pe(keyset, efi, first)
    time.sleep(1.1)  # sbsign's own clock would tick over into the PKCS#7 signingTime here
    pe.sign_pe(keyset, efi, second)
    assert efi.read_bytes() == before, "the source is not modified"
    assert first.read_bytes() == second.read_bytes()
    assert len(first.read_bytes()) > len(before)
    assert pe.verify_pe(keyset.db_crt, first)
    assert not pe.verify_pe(keyset.db_crt, efi), "unsigned"
    assert not pe.verify_pe(other.db_crt, first), "signed by another key set"
    assert not pe.verify_pe(keyset.cert("KEK"), first), "the KEK does not sign binaries"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.efi", "b.efi"], "no temporary file left"

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = tmp_path / "dated.efi"
    pe.sign_pe(keyset, efi, dated)
    assert dated.read_bytes() != first.read_bytes(), "the signing time is inside the signature"
    assert pe.verify_pe(keyset.db_crt, dated)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    with pytest.raises(KilnError, match="SOURCE_DATE_EPOCH"):
        pe.sign_pe(keyset, efi, tmp_path / "never.efi")


def _text_section(data: bytes) -> tuple[int, int]:
    """(file offset, size) of the first section's raw data: code the signature covers."""
    pe_at = struct.unpack_from("<I", data, 0x3C)[0]
    count, opt_size = struct.unpack_from("<H", data, pe_at + 6)[0], struct.unpack_from("<H", data, pe_at + 20)[0]
    first = pe_at + 24 + opt_size
    assert count > 0
    size, offset = struct.unpack_from("<II", data, first + 16)
    return offset, size


def test_verify_pe_refuses_any_tampered_byte(keyset: keys.KeySet, efi: Path, tmp_path: Path) -> None:
    signed = tmp_path / "signed.efi"
    pe.sign_pe(keyset, efi, signed)
    data = bytearray(signed.read_bytes())
    offset, size = _text_section(bytes(data))
    for where in (offset, offset + size // 2, len(efi.read_bytes()) - 1):
        tampered = bytearray(data)
        tampered[where] ^= 0x01
        bad = tmp_path / f"tampered-{where}.efi"
        bad.write_bytes(tampered)
        assert not pe.verify_pe(keyset.db_crt, bad), f"byte {where} changed, still verified"
    with pytest.raises(KilnError, match="no such file"):
        pe.verify_pe(keyset.db_crt, tmp_path / "missing.efi")
    with pytest.raises(KilnError, match="no such file"):
        pe.sign_pe(keyset, tmp_path / "missing.efi", tmp_path / "out.efi")


# ------------------------------------------------------------------------------- variables


def test_make_vars_enrolls_the_keys_with_secure_boot_on(keyset: keys.KeySet, other: keys.KeySet,
                                                        tmp_path: Path) -> None:
    out = tmp_path / varstore.VARS_NAME
    varstore.make_vars(keyset, out)
    assert out.stat().st_size == varstore.VARS_TEMPLATE.stat().st_size == 540672  # the 4 MiB build's store
    got = varstore.read_vars(out)
    for name, enrolled in (("PK", got.pk), ("KEK", got.kek), ("db", got.db)):
        cert = x509.load_pem_x509_certificate(keyset.cert(name).read_bytes())
        assert [(e.kind, e.owner, e.subject, e.sha256) for e in enrolled] == \
            [("x509", keyset.owner_guid, f"CN=Kiln {name}", cert.fingerprint(hashes.SHA256()).hex())]
    assert got.secure_boot_enable and not got.custom_mode and got.user_mode
    assert [e.kind for e in got.dbx] == ["sha256"]  # virt-fw-vars' placeholder: edk2 wants a dbx
    assert got.enrolls(keyset) and not got.enrolls(other)
    # virt-firmware's own reader sees the same variables.
    listing = run([*varstore._virt_fw_vars(), "-i", out, "-p"]).stdout.decode()
    assert {n.split("-")[0] for n in got.names} == {
        line.split(":")[0].strip() for line in listing.splitlines() if ":" in line and not line.startswith("INFO")}
    assert [p.name for p in tmp_path.iterdir()] == [varstore.VARS_NAME], "no temporary file left"


def test_make_vars_is_deterministic(keyset: keys.KeySet, tmp_path: Path) -> None:
    varstore.make_vars(keyset, tmp_path / "a.fd")
    time.sleep(1.1)
    varstore.make_vars(keyset, tmp_path / "b.fd")
    assert hashlib.sha256((tmp_path / "a.fd").read_bytes()).digest() == \
        hashlib.sha256((tmp_path / "b.fd").read_bytes()).digest()


def test_read_vars_of_debian_stores() -> None:
    empty = varstore.read_vars(varstore.VARS_TEMPLATE)
    assert (empty.pk, empty.kek, empty.db, empty.secure_boot_enable, empty.user_mode) == ((), (), (), False, False)
    ms = varstore.read_vars(Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"))
    assert ms.secure_boot_enable and ms.user_mode
    assert any("Microsoft Corporation KEK CA" in (e.subject or "") for e in ms.kek)
    assert any("Microsoft Windows Production PCA" in (e.subject or "") for e in ms.db)


def test_read_vars_refuses_what_is_not_a_store(tmp_path: Path, keyset: keys.KeySet) -> None:
    junk = tmp_path / "junk.fd"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(KilnError, match="not an OVMF variables file"):
        varstore.read_vars(junk)
    with pytest.raises(KilnError, match="cannot read"):
        varstore.read_vars(tmp_path / "missing.fd")
    good = tmp_path / "good.fd"
    varstore.make_vars(keyset, good)
    data = bytearray(good.read_bytes())
    struct.pack_into("<L", data, 72 + 16, 10**8)  # the variable store claims to run past the volume
    junk.write_bytes(data)
    with pytest.raises(KilnError, match="not an OVMF variables file"):
        varstore.read_vars(junk)


# ------------------------------------------------------------------------------- kiln run --secure-boot


def test_run_argv_with_and_without_secure_boot(tmp_path: Path) -> None:
    disk, fd = tmp_path / "disk.img", tmp_path / "OVMF_VARS.fd"
    plain = VmConfig(disk, tmp_path, accel="tcg").argv(disk, fd)
    assert plain[plain.index("-machine") + 1] == "q35" and "-global" not in plain
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}" in plain
    sb = VmConfig(disk, tmp_path, accel="tcg", secure_boot_vars=tmp_path / "sb.fd").argv(disk, fd)
    assert sb[sb.index("-machine") + 1] == "q35,smm=on"
    assert sb[sb.index("-global") + 1] == "driver=cfi.pflash01,property=secure,value=on"
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE_SECBOOT}" in sb
    assert f"if=pflash,format=raw,unit=1,file={fd}" in sb, "QEMU writes the copy, not the given file"
    # Nothing else changes.
    rest = [a for a in sb if a not in ("-global", "driver=cfi.pflash01,property=secure,value=on")]
    assert [a.replace("q35,smm=on", "q35").replace(str(OVMF_CODE_SECBOOT), str(OVMF_CODE)) for a in rest] == plain


def test_run_finds_the_vars_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    assert secure_boot_vars(image, False, None) is None
    with pytest.raises(KilnError, match="kiln build --keys") as e:
        secure_boot_vars(image, True, None)
    assert str(tmp_path / varstore.VARS_NAME) in str(e.value)
    (tmp_path / varstore.VARS_NAME).write_bytes(b"x")
    assert secure_boot_vars(image, True, None) == tmp_path / varstore.VARS_NAME
    given = tmp_path / "mine.fd"
    with pytest.raises(KilnError, match=str(given)):
        secure_boot_vars(image, True, given)
    given.write_bytes(b"y")
    assert secure_boot_vars(image, True, given) == given
    with pytest.raises(KilnError, match="--efi-vars needs --secure-boot"):
        secure_boot_vars(image, False, given)
