"""The fleet PKI: certificates checked by openssl, files and refusals, and real mutual-TLS handshakes."""

from __future__ import annotations

import datetime as dt
import json
import re
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
from kiln.host.api.tls import check_crl, peer_identity, server_context
from kiln.pki import certs

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 10.0


@dataclass(frozen=True)
class Fleets:
    main: Path  # nodes: localhost (the default), node1 (10.0.0.5, node1.example.com);
    #             clients: admin, rita (reader), old (expired admin)
    other: Path  # an unrelated fleet: another CA, its node localhost


@pytest.fixture(scope="module")
def fleets(tmp_path_factory: pytest.TempPathFactory) -> Fleets:
    base = tmp_path_factory.mktemp("pki")
    main_dir, other = base / "fleet", base / "other"
    pki.init(main_dir)
    pki.node_for_user_data(main_dir)
    pki.issue_node(main_dir, "node1", ["10.0.0.5", "node1.example.com"])
    pki.issue_client(main_dir, "rita", "reader")
    now = dt.datetime.now(dt.UTC)
    pki.issue_client(
        main_dir, "old", "admin", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    pki.init(other)
    pki.node_for_user_data(other)
    return Fleets(main_dir, other)


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)


def x509_text(cert: Path) -> str:
    out = openssl("x509", "-noout", "-text", "-in", cert)
    assert out.returncode == 0, out.stderr
    return out.stdout


def node_server(d: Path, node: str = "localhost") -> ssl.SSLContext:
    cert, key = (d / "nodes" / f"{node}{ext}" for ext in (".crt", ".key"))
    return server_context((d / "ca.crt").read_text(), cert.read_text(), key.read_text())


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --- certificates, checked by openssl -------------------------------------------------


def test_every_certificate_verifies_against_the_ca_for_its_purpose(fleets: Fleets) -> None:
    d = fleets.main
    for node in ("localhost", "node1"):
        server = openssl("verify", "-CAfile", d / "ca.crt", "-purpose", "sslserver", d / "nodes" / f"{node}.crt")
        assert server.returncode == 0 and server.stdout.strip().endswith("OK"), server.stdout + server.stderr
    for name in ("admin", "rita"):
        client = openssl("verify", "-CAfile", d / "ca.crt", "-purpose", "sslclient", d / "clients" / f"{name}.crt")
        assert client.returncode == 0 and client.stdout.strip().endswith("OK"), client.stdout + client.stderr
    # Certificates are bound to their purpose: a node certificate is no client certificate.
    wrong = openssl("verify", "-CAfile", d / "ca.crt", "-purpose", "sslclient", d / "nodes/localhost.crt")
    assert wrong.returncode != 0
    # And to their fleet.
    foreign = openssl("verify", "-CAfile", fleets.other / "ca.crt", d / "nodes/localhost.crt")
    assert foreign.returncode != 0


def test_ca_is_a_ten_year_p256_signing_ca(fleets: Fleets) -> None:
    ca = fleets.main / "ca.crt"
    text = x509_text(ca)
    assert "Basic Constraints: critical\n                CA:TRUE" in text
    assert "Key Usage: critical\n                Certificate Sign, CRL Sign" in text
    assert "ASN1 OID: prime256v1" in text and "Signature Algorithm: ecdsa-with-SHA256" in text
    assert openssl("x509", "-noout", "-in", ca, "-checkend", str(9 * 366 * 86400)).returncode == 0
    assert openssl("x509", "-noout", "-in", ca, "-checkend", str(11 * 365 * 86400)).returncode != 0


def test_node_certificates_name_one_node_each(fleets: Fleets) -> None:
    local = x509_text(fleets.main / "nodes/localhost.crt")
    assert "Subject: CN = localhost\n" in local
    assert "DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1\n" in local
    node = fleets.main / "nodes/node1.crt"
    text = x509_text(node)
    assert "Subject: CN = node1\n" in text
    assert "DNS:node1, IP Address:10.0.0.5, DNS:node1.example.com\n" in text  # nothing shared: no localhost
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
    assert {p.name: p.stat().st_mode & 0o777 for p in (d, d / "clients", d / "nodes")} == {
        d.name: 0o700, "clients": 0o700, "nodes": 0o700}
    pairs = [(d / "ca.crt", d / "ca.key")]
    pairs += [(d / "nodes" / f"{n}.crt", d / "nodes" / f"{n}.key") for n in ("localhost", "node1")]
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


def test_init_writes_a_ca_an_empty_crl_and_an_admin(tmp_path: Path) -> None:
    result = pki.init(tmp_path / "p")
    assert [p.name for p in result.files] == ["ca.crt", "ca.key", "crl.pem", "admin.crt", "admin.key"]
    crl = openssl("crl", "-in", result.crl, "-CAfile", result.ca.cert, "-noout", "-text")
    assert crl.returncode == 0 and "verify OK" in crl.stderr, crl.stderr
    assert "No Revoked Certificates." in crl.stdout and "X509v3 CRL Number: \n                1\n" in crl.stdout
    assert not (tmp_path / "p" / "nodes").exists()  # node certificates are issued per node, later


def test_issue_node_options_and_san_parsing(tmp_path: Path) -> None:
    pki.init(tmp_path / "p")
    node = pki.issue_node(tmp_path / "p", "Node-7.Example.com", ["fd00::7", "*.nodes.example", "node-7.example.com"])
    assert node.sans == ("node-7.example.com", "fd00::7", "*.nodes.example")
    assert node.cert == tmp_path / "p/nodes/node-7.example.com.crt"
    text = x509_text(node.cert)
    assert "Subject: CN = node-7.example.com\n" in text
    assert "DNS:node-7.example.com, IP Address:FD00:0:0:0:0:0:0:7, DNS:*.nodes.example\n" in text
    assert "Extended Key Usage: \n                TLS Web Server Authentication\n" in text
    assert pki.issue_node(tmp_path / "p", "10.1.2.3").sans == ("10.1.2.3",)  # an address as the name: an IP SAN


# --- refusals --------------------------------------------------------------------------


def test_init_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    d = tmp_path / "p"
    pki.init(d)
    before = tree(d)
    with pytest.raises(KilnError, match=r"ca\.crt already exists"):
        pki.init(d, days=7)
    assert tree(d) == before
    (d / "ca.crt").unlink()  # a half-removed CA is still refused, by the file that is left
    with pytest.raises(KilnError, match=r"ca\.key already exists"):
        pki.init(d)


def test_init_rejects_bad_days_before_writing(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match="at least 1"):
        pki.init(tmp_path / "p", days=0)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("name", "addresses", "message"),
    [
        ("n", ["not a name!"], "neither an IP address nor a DNS name"),
        ("n", ["-bad.example"], "neither an IP address nor a DNS name"),
        ("under_score", [], "is not a DNS name"),
        ("*.wild", [], "is not a DNS name"),
        ("../ca", [], "is not a DNS name"),
        ("node1", [], r"node1\.crt already exists: node 'node1' was issued before"),
    ],
)
def test_issue_node_rejects_bad_arguments_before_writing(
    fleets: Fleets, name: str, addresses: list[str], message: str
) -> None:
    before = tree(fleets.main)
    with pytest.raises(KilnError, match=message):
        pki.issue_node(fleets.main, name, addresses)
    assert tree(fleets.main) == before


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
        "certificate": (d / "nodes/localhost.crt").read_text(),
        "key": (d / "nodes/localhost.key").read_text(),
        "crl": (d / "crl.pem").read_text(),
    }
    assert "ca.key" not in text and (d / "ca.key").read_text() not in text
    # What the node gets is enough to serve, and its CRL passes the node's own check.
    assert isinstance(server_context(remote["ca"], remote["certificate"], remote["key"]), ssl.SSLContext)
    check_crl(remote["crl"], remote["ca"], remote["certificate"], remote["key"])


def test_user_data_gives_each_node_its_own_key(tmp_path: Path) -> None:
    """One stolen node key must not be every node's: each node gets its own certificate and key."""
    d = tmp_path / "fleet"
    pki.init(d)
    a = tomllib.loads(pki.user_data(d, "node-a", ["10.0.0.1"]))["settings"]["api"]["remote"]
    b = tomllib.loads(pki.user_data(d, "node-b", ["10.0.0.2", "b.lan"], port=50001))["settings"]["api"]["remote"]
    assert a["key"] != b["key"] and a["certificate"] != b["certificate"] and b["port"] == 50001
    assert a["key"] == (d / "nodes/node-a.key").read_text()
    assert "DNS:node-b, IP Address:10.0.0.2, DNS:b.lan\n" in x509_text(d / "nodes/node-b.crt")
    assert "localhost" not in x509_text(d / "nodes/node-a.crt")
    # Asked again, the same node gets the same material (re-provisioning); by name alone too.
    assert pki.user_data(d, "node-a", ["10.0.0.1"]) == pki.user_data(d, "node-a")
    before = tree(d)
    issued = re.escape("node 'node-a' was issued for node-a, 10.0.0.1, not node-a, 10.0.0.9")
    with pytest.raises(KilnError, match=issued) as e:
        pki.user_data(d, "node-a", ["10.0.0.9"])
    assert e.value.hint is not None and "kiln pki revoke" in e.value.hint and "node:node-a" in e.value.hint
    assert tree(d) == before


def test_user_data_without_a_name_is_the_local_node(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    pki.init(d)
    pki.user_data(d)
    assert pki.node_for_user_data(d).sans == ("localhost", "127.0.0.1", "::1")
    with pytest.raises(KilnError, match=re.escape("was issued for localhost, 127.0.0.1, ::1, not")):
        pki.user_data(d, addresses=["10.0.2.15"])


def test_user_data_needs_the_node_material(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match=r"ca\.crt does not exist"):
        pki.user_data(tmp_path)
    (tmp_path / "ca.crt").write_bytes(b"")
    with pytest.raises(KilnError, match=r"ca\.key does not exist: no fleet CA") as e:
        pki.user_data(tmp_path, "n1")  # a node to issue needs the CA's key
    assert e.value.hint is not None and "kiln pki init" in e.value.hint
    assert not (tmp_path / "nodes").exists()


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
    ca, cert, key = ((d / n).read_text() for n in ("ca.crt", "nodes/localhost.crt", "nodes/localhost.key"))
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


@pytest.mark.parametrize(("node", "hostname"), [("localhost", "localhost"), ("localhost", "127.0.0.1"),
                                              ("localhost", "::1"), ("node1", "node1"), ("node1", "10.0.0.5"),
                                              ("node1", "node1.example.com")])
def test_admin_client_is_accepted_with_its_role(fleets: Fleets, node: str, hostname: str) -> None:
    out = handshake(node_server(fleets.main, node), pki.client_context(fleets.main), hostname)
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
    out = handshake(node_server(d), custom_client(d / "ca.crt", d / "nodes/node1.crt", d / "nodes/node1.key"))
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


@pytest.mark.parametrize(("hostname", "message"), [("node1", "Hostname mismatch"), ("10.0.0.5", "IP address mismatch"),
                                                   ("node1.example.com", "Hostname mismatch")])
def test_one_nodes_certificate_does_not_pass_for_another_node(fleets: Fleets, hostname: str, message: str) -> None:
    """Node localhost's key (say, stolen) presented to a client that expects node1: refused."""
    out = handshake(node_server(fleets.main, "localhost"), pki.client_context(fleets.main), hostname)
    assert isinstance(out.client, ssl.SSLCertVerificationError) and message in str(out.client), out.client
    assert not out.accepted


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
    assert main(["pki", "init", str(d), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["clients"][0]["role"] == "admin" and made["crl"] == str(d / "crl.pem")
    assert all(Path(f).is_file() for f in made["files"]) and len(made["files"]) == 5

    assert main(["pki", "issue-client", str(d), "--name", "ci", "--role", "reader", "--days", "7", "--json"]) == 0
    ci = json.loads(capsys.readouterr().out)
    assert (ci["name"], ci["role"], ci["cert"]) == ("ci", "reader", str(d / "clients" / "ci.crt"))
    left = dt.datetime.fromisoformat(ci["not_after"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=6) < left <= dt.timedelta(days=7)
    serial = openssl("x509", "-noout", "-serial", "-in", d / "clients/ci.crt").stdout.strip()
    assert serial == f"serial={ci['serial']}"

    assert main(["pki", "issue-client", str(d), "--name", "ops", "--role", "admin"]) == 0
    human = capsys.readouterr().out
    assert f"wrote {d / 'clients' / 'ops.crt'}\nwrote {d / 'clients' / 'ops.key'}\n" in human
    assert "role admin" in human

    assert main(["pki", "issue-node", str(d), "--name", "n1", "--address", "10.1.2.3", "--address", "n1.lan",
                 "--json"]) == 0
    n1 = json.loads(capsys.readouterr().out)
    assert (n1["name"], n1["sans"], n1["cert"]) == ("n1", ["n1", "10.1.2.3", "n1.lan"], str(d / "nodes/n1.crt"))

    assert main(["pki", "user-data", str(d)]) == 0
    out, err = capsys.readouterr()
    remote = tomllib.loads(out)["settings"]["api"]["remote"]
    assert remote["certificate"] == (d / "nodes/localhost.crt").read_text()
    assert f"issued node localhost (localhost, 127.0.0.1, ::1): {d / 'nodes/localhost.crt'}" in err
    assert main(["pki", "user-data", str(d), "--name", "n1", "--port", "50001"]) == 0
    out, err = capsys.readouterr()
    remote = tomllib.loads(out)["settings"]["api"]["remote"]
    assert remote["key"] == (d / "nodes/n1.key").read_text() and remote["port"] == 50001 and err == ""


def test_cli_human_output_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "fleet"
    assert main(["pki", "init", str(d)]) == 0
    out = capsys.readouterr().out
    for f in ("ca.crt", "ca.key", "crl.pem", "clients/admin.crt", "clients/admin.key"):
        assert f"wrote {d / f}\n" in out
    assert "kiln pki user-data" in out

    assert main(["pki", "init", str(d)]) == 1
    assert f"kiln: error: {d / 'ca.crt'} already exists" in capsys.readouterr().err
    assert main(["pki", "issue-client", str(d), "--name", "x", "--role", "root"]) == 1
    assert "unknown role 'root'" in capsys.readouterr().err
    assert main(["pki", "issue-client", str(d), "--name", "Bad_Name", "--role", "reader"]) == 1
    assert "invalid client name" in capsys.readouterr().err
    assert main(["pki", "user-data", str(d), "--name", "bad_name"]) == 1
    assert "node name 'bad_name' is not a DNS name" in capsys.readouterr().err
    assert main(["pki", "issue-node", str(tmp_path / "nowhere"), "--name", "n"]) == 1
    assert "no fleet CA" in capsys.readouterr().err
