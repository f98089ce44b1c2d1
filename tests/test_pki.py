"""The fleet PKI: certificates checked by openssl, files and refusals, and real mutual-TLS handshakes."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from kiln import pki
from kiln.cli.main import main
from kiln.core.errors import KilnError
from kiln.host.api.tls import peer_identity, server_context
from kiln.pki import certs

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 10.0


@dataclass(frozen=True)
class Fleets:
    main: Path  # init'd with extra SANs, plus clients: rita (reader), old (expired admin)
    other: Path  # an unrelated fleet: another CA


@pytest.fixture(scope="module")
def fleets(tmp_path_factory: pytest.TempPathFactory) -> Fleets:
    base = tmp_path_factory.mktemp("pki")
    main_dir, other = base / "fleet", base / "other"
    pki.init(main_dir, sans=["10.0.0.5", "node1.example.com"])
    pki.issue_client(main_dir, "rita", "reader")
    now = dt.datetime.now(dt.UTC)
    pki.issue_client(
        main_dir, "old", "admin", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    pki.init(other)
    return Fleets(main_dir, other)


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)


def x509_text(cert: Path) -> str:
    out = openssl("x509", "-noout", "-text", "-in", cert)
    assert out.returncode == 0, out.stderr
    return out.stdout


def node_server(d: Path) -> ssl.SSLContext:
    return server_context((d / "ca.crt").read_text(), (d / "node.crt").read_text(), (d / "node.key").read_text())


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --- certificates, checked by openssl -------------------------------------------------


def test_every_certificate_verifies_against_the_ca_for_its_purpose(fleets: Fleets) -> None:
    d = fleets.main
    server = openssl("verify", "-CAfile", d / "ca.crt", "-purpose", "sslserver", d / "node.crt")
    assert server.returncode == 0 and server.stdout.strip().endswith("OK"), server.stdout + server.stderr
    for name in ("admin", "rita"):
        client = openssl("verify", "-CAfile", d / "ca.crt", "-purpose", "sslclient", d / "clients" / f"{name}.crt")
        assert client.returncode == 0 and client.stdout.strip().endswith("OK"), client.stdout + client.stderr
    # Certificates are bound to their purpose: a node certificate is no client certificate.
    wrong = openssl("verify", "-CAfile", d / "ca.crt", "-purpose", "sslclient", d / "node.crt")
    assert wrong.returncode != 0
    # And to their fleet.
    foreign = openssl("verify", "-CAfile", fleets.other / "ca.crt", d / "node.crt")
    assert foreign.returncode != 0


def test_ca_is_a_ten_year_p256_signing_ca(fleets: Fleets) -> None:
    ca = fleets.main / "ca.crt"
    text = x509_text(ca)
    assert "Basic Constraints: critical\n                CA:TRUE" in text
    assert "Key Usage: critical\n                Certificate Sign, CRL Sign" in text
    assert "ASN1 OID: prime256v1" in text and "Signature Algorithm: ecdsa-with-SHA256" in text
    assert openssl("x509", "-noout", "-in", ca, "-checkend", str(9 * 366 * 86400)).returncode == 0
    assert openssl("x509", "-noout", "-in", ca, "-checkend", str(11 * 365 * 86400)).returncode != 0


def test_node_certificate_names_eku_and_validity(fleets: Fleets) -> None:
    node = fleets.main / "node.crt"
    text = x509_text(node)
    assert "Subject: CN = kiln-node\n" in text
    assert (
        "DNS:kiln-node, DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, "
        "IP Address:10.0.0.5, DNS:node1.example.com"
    ) in text
    assert "Extended Key Usage: \n                TLS Web Server Authentication\n" in text
    assert "CA:FALSE" in text and "Signature Algorithm: ecdsa-with-SHA256" in text
    assert openssl("x509", "-noout", "-in", node, "-checkend", str(364 * 86400)).returncode == 0
    assert openssl("x509", "-noout", "-in", node, "-checkend", str(366 * 86400)).returncode != 0


@pytest.mark.parametrize(("name", "role"), [("admin", "admin"), ("rita", "reader")])
def test_client_certificate_carries_name_and_role(fleets: Fleets, name: str, role: str) -> None:
    text = x509_text(fleets.main / "clients" / f"{name}.crt")
    assert f"Subject: O = kiln:{role}, CN = {name}\n" in text
    assert "Extended Key Usage: \n                TLS Web Client Authentication\n" in text
    assert "Subject Alternative Name" not in text


def test_keys_are_private_p256_and_match_their_certificates(fleets: Fleets) -> None:
    d = fleets.main
    assert (d.stat().st_mode & 0o777, (d / "clients").stat().st_mode & 0o777) == (0o700, 0o700)
    pairs = [(d / "ca.crt", d / "ca.key"), (d / "node.crt", d / "node.key")]
    pairs += [(d / "clients" / f"{n}.crt", d / "clients" / f"{n}.key") for n in ("admin", "rita", "old")]
    for cert, key in pairs:
        assert key.stat().st_mode & 0o777 == 0o600, key
        assert cert.stat().st_mode & 0o777 == 0o644, cert
        key_text = openssl("pkey", "-in", key, "-noout", "-text")
        assert key_text.returncode == 0 and "ASN1 OID: prime256v1" in key_text.stdout, key
        from_key = openssl("pkey", "-in", key, "-pubout").stdout
        from_cert = openssl("x509", "-in", cert, "-noout", "-pubkey").stdout
        assert from_key and from_key == from_cert, cert
    assert not [p for p in d.rglob(".*")], "temporary files left behind"


def test_init_options_and_san_parsing(tmp_path: Path) -> None:
    result = pki.init(tmp_path / "p", node_name="Node-7.Example.com", sans=["fd00::7", "*.nodes.example", "localhost"])
    assert result.sans == ("node-7.example.com", "localhost", "127.0.0.1", "::1", "fd00::7", "*.nodes.example")
    text = x509_text(result.node.cert)
    assert "Subject: CN = node-7.example.com\n" in text
    assert "IP Address:FD00:0:0:0:0:0:0:7, DNS:*.nodes.example" in text
    assert [p.name for p in result.files] == ["ca.crt", "ca.key", "node.crt", "node.key", "admin.crt", "admin.key"]


# --- refusals --------------------------------------------------------------------------


def test_init_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    d = tmp_path / "p"
    pki.init(d)
    before = tree(d)
    with pytest.raises(KilnError, match=r"ca\.crt already exists"):
        pki.init(d, node_name="other")
    assert tree(d) == before
    (d / "ca.crt").unlink()  # a half-removed CA is still refused, by the file that is left
    with pytest.raises(KilnError, match=r"ca\.key already exists"):
        pki.init(d)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sans": ["not a name!"]}, "neither an IP address nor a DNS name"),
        ({"sans": ["-bad.example"]}, "neither an IP address nor a DNS name"),
        ({"node_name": "under_score"}, "is not a DNS name"),
        ({"node_name": "127.0.0.1"}, None),  # allowed: all-digit labels are valid DNS labels
        ({"days": 0}, "at least 1"),
    ],
)
def test_init_rejects_bad_arguments_before_writing(
    tmp_path: Path, kwargs: dict[str, object], message: str | None
) -> None:
    d = tmp_path / "p"
    if message is None:
        pki.init(d, **kwargs)  # type: ignore[arg-type]
        return
    with pytest.raises(KilnError, match=message):
        pki.init(d, **kwargs)  # type: ignore[arg-type]
    assert not d.exists()


@pytest.mark.parametrize("name", ["", "-x", "Admin", "a/b", "../x", "a.b", "a b", "a" * 64, "é"])
def test_issue_client_rejects_bad_names(fleets: Fleets, name: str) -> None:
    before = tree(fleets.main)
    with pytest.raises(KilnError, match="invalid client name"):
        pki.issue_client(fleets.main, name, "reader")
    assert tree(fleets.main) == before


def test_issue_client_rejects_bad_roles_and_existing_names(fleets: Fleets, tmp_path: Path) -> None:
    before = tree(fleets.main)
    for role in ("root", "Admin", "", "kiln:admin"):
        with pytest.raises(KilnError, match="unknown role") as e:
            pki.issue_client(fleets.main, "new", role)
        assert e.value.hint == "one of: admin, reader"
    with pytest.raises(KilnError, match=r"rita\.crt already exists"):
        pki.issue_client(fleets.main, "rita", "admin")
    with pytest.raises(KilnError, match=r"expire .* before it starts"):
        now = dt.datetime.now(dt.UTC)
        pki.issue_client(fleets.main, "new", "admin", not_before=now, not_after=now - dt.timedelta(seconds=1))
    with pytest.raises(KilnError, match="outlive the CA"):
        pki.issue_client(fleets.main, "new", "admin", days=20 * 365)
    assert tree(fleets.main) == before
    with pytest.raises(KilnError, match=r"ca\.crt does not exist: no fleet CA") as e:
        pki.issue_client(tmp_path, "new", "admin")
    assert e.value.hint is not None and "kiln pki init" in e.value.hint


def test_issue_client_refuses_a_key_that_is_not_the_cas(tmp_path: Path, fleets: Fleets) -> None:
    d = tmp_path / "p"
    pki.init(d)
    (d / "ca.key").write_bytes((fleets.other / "ca.key").read_bytes())
    with pytest.raises(KilnError, match="does not belong to the CA certificate"):
        pki.issue_client(d, "new", "admin")


def test_client_context_names_missing_files(fleets: Fleets, tmp_path: Path) -> None:
    with pytest.raises(KilnError, match=r"clients/nobody\.crt does not exist"):
        pki.client_context(fleets.main, "nobody")
    with pytest.raises(KilnError, match=r"ca\.crt does not exist"):
        pki.client_context(tmp_path)
    with pytest.raises(KilnError, match="invalid client name"):
        pki.client_context(fleets.main, "../ca")
    ctx = pki.client_context(fleets.main)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


# --- user data -------------------------------------------------------------------------


def test_user_data_round_trips_through_tomllib(fleets: Fleets) -> None:
    d = fleets.main
    text = pki.user_data(d)
    assert text.startswith("[settings.api.remote]\nenabled = true\nport = 50000\n")
    remote = tomllib.loads(text)["settings"]["api"]["remote"]
    assert remote == {
        "enabled": True,
        "port": 50000,
        "ca": (d / "ca.crt").read_text(),
        "certificate": (d / "node.crt").read_text(),
        "key": (d / "node.key").read_text(),
    }
    assert "ca.key" not in text and (d / "ca.key").read_text() not in text
    # What the node gets is enough to serve.
    assert isinstance(server_context(remote["ca"], remote["certificate"], remote["key"]), ssl.SSLContext)


def test_user_data_needs_the_node_material(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match=r"ca\.crt does not exist"):
        pki.user_data(tmp_path)


# --- the node side: server_context --------------------------------------------------------


def test_server_context_settings_and_private_staging(fleets: Fleets) -> None:
    staged = set(Path(tempfile.gettempdir()).glob("kiln-tls-*"))
    ctx = node_server(fleets.main)
    assert set(Path(tempfile.gettempdir()).glob("kiln-tls-*")) == staged
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", _ca_cn(fleets.main)),),)]


def _ca_cn(d: Path) -> str:
    cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_server_context_rejects_bad_material(fleets: Fleets) -> None:
    d = fleets.main
    ca, cert, key = ((d / n).read_text() for n in ("ca.crt", "node.crt", "node.key"))
    with pytest.raises(KilnError, match="holds no PEM certificate"):
        server_context("", cert, key)
    with pytest.raises(KilnError, match="do not load"):
        server_context(ca, cert, (d / "clients" / "admin.key").read_text())  # key of another certificate
    with pytest.raises(KilnError, match="do not load"):
        server_context(ca, cert, "garbage")


def test_tls_module_is_stdlib_only() -> None:
    code = "import json, sys, kiln.host.api.tls; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    loaded = json.loads(out.stdout)
    assert not [m for m in loaded if m.startswith(("cryptography", "kiln.pki"))], loaded


# --- real handshakes on 127.0.0.1 ------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    server: tuple[str, str] | BaseException | None  # peer_identity, or why the server failed
    client: bytes | BaseException  # the server's reply, or why the client failed

    @property
    def accepted(self) -> bool:
        return isinstance(self.client, bytes) and self.client.startswith(b"hello")


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "localhost") -> Outcome:
    """One connection to a one-shot TLS server thread; both ends' results, never hanging."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]
    server_result: list[tuple[str, str] | BaseException | None] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as e:
            server_result.append(e)
            return
        conn.settimeout(TIMEOUT)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                identity = peer_identity(tls)
                server_result.append(identity)
                tls.recv(16)
                tls.sendall(f"hello {identity}".encode())
        except (ssl.SSLError, OSError) as e:
            if not server_result:
                server_result.append(e)
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client: bytes | BaseException
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            try:
                with client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                    tls.sendall(b"ping")
                    client = tls.recv(64)
            except (ssl.SSLError, OSError) as e:
                client = e
    finally:
        thread.join(TIMEOUT)
        listener.close()
    assert not thread.is_alive(), "server thread hung"
    return Outcome(server_result[0], client)


def custom_client(trust: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=trust)
    ctx.load_cert_chain(cert, key)
    return ctx


@pytest.mark.parametrize("hostname", ["localhost", "kiln-node", "127.0.0.1", "node1.example.com"])
def test_admin_client_is_accepted_with_its_role(fleets: Fleets, hostname: str) -> None:
    out = handshake(node_server(fleets.main), pki.client_context(fleets.main), hostname)
    assert out.server == ("admin", "admin")
    assert out.client == b"hello ('admin', 'admin')"


def test_reader_client_gets_the_reader_role(fleets: Fleets) -> None:
    out = handshake(node_server(fleets.main), pki.client_context(fleets.main, "rita"))
    assert out.server == ("rita", "reader") and out.accepted


def test_client_without_a_certificate_is_refused(fleets: Fleets) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=fleets.main / "ca.crt")
    out = handshake(node_server(fleets.main), ctx)
    assert isinstance(out.server, ssl.SSLError) and "did not return a certificate" in str(out.server)
    assert not out.accepted


def test_client_certificate_from_another_ca_is_refused(fleets: Fleets) -> None:
    other = fleets.other / "clients"
    client = custom_client(fleets.main / "ca.crt", other / "admin.crt", other / "admin.key")
    out = handshake(node_server(fleets.main), client)
    assert isinstance(out.server, ssl.SSLCertVerificationError), out.server
    assert "unable to get local issuer certificate" in str(out.server)
    assert not out.accepted


def test_expired_client_certificate_is_refused(fleets: Fleets) -> None:
    out = handshake(node_server(fleets.main), pki.client_context(fleets.main, "old"))
    assert isinstance(out.server, ssl.SSLCertVerificationError) and "certificate has expired" in str(out.server)
    assert not out.accepted


def test_node_certificate_is_refused_as_a_client_certificate(fleets: Fleets) -> None:
    d = fleets.main
    out = handshake(node_server(d), custom_client(d / "ca.crt", d / "node.crt", d / "node.key"))
    assert isinstance(out.server, ssl.SSLCertVerificationError) and "unsuitable certificate purpose" in str(out.server)
    assert not out.accepted


def test_client_rejects_a_server_from_another_ca(fleets: Fleets) -> None:
    out = handshake(node_server(fleets.other), pki.client_context(fleets.main))
    # The server sends its CA along (OpenSSL completes the chain): the client still trusts only its own.
    assert isinstance(out.client, ssl.SSLCertVerificationError)
    assert "self-signed certificate in certificate chain" in str(out.client)
    assert not isinstance(out.server, tuple)


def test_client_checks_the_server_name(fleets: Fleets) -> None:
    out = handshake(node_server(fleets.main), pki.client_context(fleets.main), "elsewhere.example")
    assert isinstance(out.client, ssl.SSLCertVerificationError) and "Hostname mismatch" in str(out.client)


@pytest.mark.parametrize("organization", [None, "kiln:root", "acme"])
def test_fleet_certificate_without_a_known_role_has_no_identity(
    fleets: Fleets, tmp_path: Path, organization: str | None
) -> None:
    d = fleets.main
    issuer = certs.load_issuer((d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes(), "ca")
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, "nobody")]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    now = certs.now()
    start, end = now - certs.CLOCK_SKEW, now + dt.timedelta(days=1)
    cert, key = certs.make_leaf(issuer, x509.Name(attrs), certs.CLIENT_AUTH, start, end)
    (tmp_path / "c.crt").write_bytes(certs.cert_pem(cert))
    (tmp_path / "c.key").write_bytes(certs.key_pem(key))
    out = handshake(node_server(d), custom_client(d / "ca.crt", tmp_path / "c.crt", tmp_path / "c.key"))
    assert out.server is None  # verified by TLS, but no role: the API must deny it


# --- CLI ----------------------------------------------------------------------------------


def test_cli_init_issue_and_user_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "fleet"
    assert main(["pki", "init", str(d), "--node-name", "n1", "--san", "10.1.2.3", "--san", "n1.lan", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["node"]["sans"] == ["n1", "localhost", "127.0.0.1", "::1", "10.1.2.3", "n1.lan"]
    assert made["clients"][0]["role"] == "admin"
    assert all(Path(f).is_file() for f in made["files"]) and len(made["files"]) == 6

    assert main(["pki", "issue-client", str(d), "--name", "ci", "--role", "reader", "--days", "7", "--json"]) == 0
    ci = json.loads(capsys.readouterr().out)
    assert (ci["name"], ci["role"], ci["cert"]) == ("ci", "reader", str(d / "clients" / "ci.crt"))
    left = dt.datetime.fromisoformat(ci["not_after"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=6) < left <= dt.timedelta(days=7)

    assert main(["pki", "issue-client", str(d), "--name", "ops", "--role", "admin"]) == 0
    human = capsys.readouterr().out
    assert f"wrote {d / 'clients' / 'ops.crt'}\nwrote {d / 'clients' / 'ops.key'}\n" in human
    assert "role admin" in human

    assert main(["pki", "user-data", str(d)]) == 0
    remote = tomllib.loads(capsys.readouterr().out)["settings"]["api"]["remote"]
    assert remote["certificate"] == (d / "node.crt").read_text()


def test_cli_human_output_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "fleet"
    assert main(["pki", "init", str(d)]) == 0
    out = capsys.readouterr().out
    for f in ("ca.crt", "ca.key", "node.crt", "node.key", "clients/admin.crt", "clients/admin.key"):
        assert f"wrote {d / f}\n" in out
    assert "kiln pki user-data" in out

    assert main(["pki", "init", str(d)]) == 1
    assert f"kiln: error: {d / 'ca.crt'} already exists" in capsys.readouterr().err
    assert main(["pki", "issue-client", str(d), "--name", "x", "--role", "root"]) == 1
    assert "unknown role 'root'" in capsys.readouterr().err
    assert main(["pki", "issue-client", str(d), "--name", "Bad_Name", "--role", "reader"]) == 1
    assert "invalid client name" in capsys.readouterr().err
