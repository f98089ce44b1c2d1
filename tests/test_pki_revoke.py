"""Revocation: `kiln pki revoke` and its CRL (checked by openssl), the node's listener following
the CRL without a restart, the workstation refusing a revoked node, and refusals of bad input."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import tomllib
from pathlib import Path

import pytest

from kiln import pki
from kiln.cli.main import main
from kiln.core.errors import KilnError
from kiln.host.api.tls import check_crl, server_context
from kiln.host.settings.model import InvalidSettings, validate
from kiln.pki.fleet import serial_text
from kiln.pki.revoke import parse_serial
from tests.test_pki import handshake, openssl, tree

pytestmark = pytest.mark.timeout(120)


def fleet(base: Path, name: str = "fleet") -> Path:
    d = base / name
    pki.init(d)
    pki.node_for_user_data(d)  # nodes/localhost
    pki.issue_client(d, "eve", "admin")
    return d


def material(d: Path, node: str = "localhost") -> tuple[str, str, str]:
    return ((d / "ca.crt").read_text(), (d / "nodes" / f"{node}.crt").read_text(),
            (d / "nodes" / f"{node}.key").read_text())


def serial_of(cert: Path) -> str:
    return openssl("x509", "-noout", "-serial", "-in", cert).stdout.strip().removeprefix("serial=")


def crl_text(d: Path) -> str:
    out = openssl("crl", "-in", d / "crl.pem", "-CAfile", d / "ca.crt", "-noout", "-text")
    assert out.returncode == 0 and "verify OK" in out.stderr, out.stderr
    return out.stdout


# --- kiln pki revoke ------------------------------------------------------------------------


def test_revoke_a_client_by_name_writes_a_signed_crl_and_frees_the_name(tmp_path: Path) -> None:
    d = fleet(tmp_path)
    serial = serial_of(d / "clients/eve.crt")
    done = pki.revoke(d, "eve")
    assert (done.target.kind, done.target.name, serial_text(done.target.serial)) == ("client", "eve", serial)
    assert not done.already and done.count == 1
    text = crl_text(d)
    assert f"Serial Number: {serial}\n" in text and "X509v3 CRL Number: \n                2\n" in text
    assert [p.name for p in done.moved] == [f"{serial}.crt", f"{serial}.key"]
    assert not (d / "clients/eve.crt").exists() and (d / "revoked" / f"{serial}.key").stat().st_mode & 0o777 == 0o600
    # Again: nothing changes (by name, by kind and name, by serial).
    crl = (d / "crl.pem").read_bytes()
    for target in ("eve", "client:eve", serial, f"0x{serial.lower()}"):
        again = pki.revoke(d, target)
        assert again.already and again.moved == () and (d / "crl.pem").read_bytes() == crl, target
    # The name is free again, with a new serial that is not revoked.
    new = pki.issue_client(d, "eve", "admin")
    assert serial_text(new.serial) != serial


def test_revoke_nodes_by_kind_and_serial_and_the_legacy_shared_certificate(tmp_path: Path) -> None:
    d = fleet(tmp_path)
    pki.issue_node(d, "eve", ["10.0.0.9"])  # a node named like a client
    with pytest.raises(KilnError, match="both a client and a node are named 'eve'") as e:
        pki.revoke(d, "eve")
    assert e.value.hint == "say which: client:eve or node:eve"
    assert pki.revoke(d, "node:eve").target.kind == "node" and (d / "clients/eve.crt").exists()
    # Directories from before per-node certificates: the shared node.crt, revoked by its serial.
    legacy = pki.issue_node(d, "kiln-node")
    os.replace(legacy.cert, d / "node.crt")
    os.replace(legacy.key, d / "node.key")
    done = pki.revoke(d, serial_text(legacy.serial))
    assert (done.target.kind, done.target.name) == ("node", "kiln-node") and not (d / "node.crt").exists()
    assert done.count == 2 and "X509v3 CRL Number: \n                3\n" in crl_text(d)


@pytest.mark.parametrize(
    ("target", "message", "hint"),
    [
        ("nobody", "no client or node named 'nobody' in .*, and it is not a serial number", "SERIAL"),
        ("client:nobody", "no client named 'nobody'", "clients: admin, eve"),
        ("node:nobody", "no node named 'nobody'", "nodes: localhost"),
        ("node:bad_name", "node name 'bad_name' is not a DNS name", None),
        ("client:../ca", "invalid client name", None),
        ("ABCDEF", "no certificate with serial ABCDEF in", "--force"),
        ("0x" + "f" * 41, "not a serial number", None),
        ("0", "not a serial number", None),
    ],
)
def test_revoke_refuses_bad_targets_and_writes_nothing(tmp_path: Path, target: str, message: str,
                                                       hint: str | None) -> None:
    d = fleet(tmp_path)
    before = tree(d)
    with pytest.raises(KilnError, match=message) as e:
        pki.revoke(d, target)
    if hint is not None:
        assert e.value.hint is not None and hint in e.value.hint
    assert tree(d) == before


def test_revoke_needs_the_ca_and_force_takes_an_unknown_serial(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match=r"ca\.crt does not exist: no fleet CA") as e:
        pki.revoke(tmp_path, "eve")
    assert e.value.hint is not None and "kiln pki init" in e.value.hint
    d = fleet(tmp_path)
    done = pki.revoke(d, "ab:cd:ef", force=True)
    assert (done.target.kind, done.target.serial, done.moved) == ("certificate", 0xABCDEF, ())
    assert "Serial Number: ABCDEF\n" in crl_text(d)
    assert parse_serial("0x00AB") == 0xAB and parse_serial("admin") is None and parse_serial("") is None


def test_crl_toml_feeds_settings_and_refuses_a_foreign_crl(tmp_path: Path) -> None:
    d, other = fleet(tmp_path), fleet(tmp_path, "other")
    pki.revoke(d, "eve")
    remote = tomllib.loads(pki.crl_toml(d))["settings"]["api"]["remote"]
    assert remote == {"crl": (d / "crl.pem").read_text()}
    shutil.copy(other / "crl.pem", d / "crl.pem")
    with pytest.raises(KilnError, match="not signed by the fleet CA beside it"):
        pki.crl_toml(d)
    (d / "crl.pem").unlink()  # a directory from before revocation
    with pytest.raises(KilnError, match=r"crl\.pem does not exist") as e:
        pki.crl_toml(d)
    assert e.value.hint is not None and "kiln pki revoke" in e.value.hint


def test_user_data_refuses_a_revoked_node_certificate(tmp_path: Path) -> None:
    d = fleet(tmp_path)
    cert, key = (d / "nodes/localhost.crt").read_bytes(), (d / "nodes/localhost.key").read_bytes()
    pki.revoke(d, "node:localhost")
    (d / "nodes/localhost.crt").write_bytes(cert)  # put back by hand
    (d / "nodes/localhost.key").write_bytes(key)
    with pytest.raises(KilnError, match=r"the certificate of node 'localhost' \(.*\) is revoked"):
        pki.user_data(d)


def test_cli_revoke_and_crl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = fleet(tmp_path)
    serial = serial_of(d / "clients/eve.crt")
    assert main(["pki", "revoke", str(d), "eve"]) == 0
    out = capsys.readouterr().out
    assert f"revoked client eve (serial {serial}): {d / 'crl.pem'} lists 1\n" in out
    assert f"moved to {d / 'revoked' / serial}.crt\n" in out and f"kiln pki crl {d} | kiln --endpoint" in out
    assert main(["pki", "revoke", str(d), "client:eve", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["already_revoked"] is True
    assert main(["pki", "crl", str(d)]) == 0
    assert tomllib.loads(capsys.readouterr().out)["settings"]["api"]["remote"]["crl"] == (d / "crl.pem").read_text()
    assert main(["pki", "revoke", str(d), "nobody"]) == 1
    assert "no client or node named 'nobody'" in capsys.readouterr().err


# --- the node's listener: a CRL it follows ------------------------------------------------------


def test_listener_follows_the_crl_file_without_a_new_context(tmp_path: Path) -> None:
    d, other = fleet(tmp_path), fleet(tmp_path, "other")
    crl_file = tmp_path / "api-remote-crl.pem"
    ctx = server_context(*material(d), crl_file=crl_file)  # no file yet: no revocation check
    assert handshake(ctx, pki.client_context(d, "eve")).server == ("eve", "admin")
    pki.revoke(d, "eve")
    eve = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    eve.load_verify_locations(cafile=d / "ca.crt")
    serial = next((d / "revoked").glob("*.crt")).stem
    eve.load_cert_chain(d / "revoked" / f"{serial}.crt", d / "revoked" / f"{serial}.key")

    shutil.copy(d / "crl.pem", crl_file)
    out = handshake(ctx, eve)
    assert isinstance(out.server, ssl.SSLCertVerificationError) and "certificate revoked" in str(out.server)
    assert handshake(ctx, pki.client_context(d)).server == ("admin", "admin")  # the others still pass

    # A CRL the listener cannot use (another fleet's): the last good one holds.
    shutil.copy(other / "crl.pem", crl_file)
    assert not handshake(ctx, eve).accepted
    assert handshake(ctx, pki.client_context(d)).accepted
    # The setting unset (file removed): no revocation check.
    crl_file.unlink()
    assert handshake(ctx, eve).server == ("eve", "admin")


def test_listener_starting_with_an_unusable_crl_refuses_everyone(tmp_path: Path) -> None:
    d, other = fleet(tmp_path), fleet(tmp_path, "other")
    crl_file = tmp_path / "api-remote-crl.pem"
    shutil.copy(other / "crl.pem", crl_file)
    ctx = server_context(*material(d), crl_file=crl_file)
    out = handshake(ctx, pki.client_context(d))
    assert isinstance(out.server, ssl.SSLCertVerificationError) and "unable to get certificate CRL" in str(out.server)
    shutil.copy(d / "crl.pem", crl_file)  # fixed: served again, same context
    assert handshake(ctx, pki.client_context(d)).server == ("admin", "admin")


@pytest.mark.parametrize("which", ["another CA's", "garbage", "with a certificate", "a certificate"])
def test_a_crl_that_would_lock_everyone_out_is_refused(tmp_path: Path, which: str) -> None:
    d, other = fleet(tmp_path), fleet(tmp_path, "other")
    crl = {
        "another CA's": (other / "crl.pem").read_text(),
        "garbage": "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        "with a certificate": (d / "crl.pem").read_text() + (other / "ca.crt").read_text(),
        "a certificate": (other / "ca.crt").read_text(),
    }[which]
    with pytest.raises(KilnError, match="CRL"):
        check_crl(crl, *material(d))
    with pytest.raises(InvalidSettings) as e:
        validate({"api": {"remote": dict(zip(("ca", "certificate", "key"), material(d), strict=True), crl=crl)}})
    assert e.value.path.startswith("settings.api.remote") and "CRL" in e.value.detail


def test_a_crl_revoking_the_node_itself_is_still_a_good_crl(tmp_path: Path) -> None:
    d = fleet(tmp_path)
    mine = material(d)
    pki.revoke(d, "node:localhost")
    check_crl((d / "crl.pem").read_text(), *mine)
    validate({"api": {"remote": {"ca": mine[0], "certificate": mine[1], "key": mine[2],
                                 "crl": (d / "crl.pem").read_text()}}})


# --- the workstation: revoked nodes are refused ---------------------------------------------------


def test_the_workstation_refuses_a_revoked_node(tmp_path: Path) -> None:
    d = fleet(tmp_path)
    node = server_context(*material(d))
    assert handshake(node, pki.client_context(d)).accepted
    pki.revoke(d, "node:localhost")
    out = handshake(node, pki.client_context(d))
    assert isinstance(out.client, ssl.SSLCertVerificationError) and "certificate revoked" in str(out.client)
    (d / "crl.pem").unlink()  # a directory from before revocation: no CRL, no check
    assert handshake(node, pki.client_context(d)).accepted
