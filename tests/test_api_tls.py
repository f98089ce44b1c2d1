"""The remote API: the real RemoteServer on 127.0.0.1 with `kiln pki` material, clients with and
without the right certificates, and the workstation CLI (`kiln --endpoint ... --pki ...`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import socket
import ssl
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from kiln import pki
from kiln.cli.main import main as kiln_main
from kiln.host.api import server as server_mod
from kiln.host.api.client import ApiRefused, ApiUnreachable, Client
from kiln.host.api.server import RemoteServer
from kiln.host.api.tls import server_context
from kiln.pki import certs
from kiln.pki.fleet import Layout, load_ca
from tests.test_api import TIMEOUT, ApiHost, running_api

pytestmark = pytest.mark.timeout(120)


@dataclass
class Remote:
    host: ApiHost
    server: RemoteServer
    port: int
    fleet: Path  # node localhost (the server's); clients: admin, rita (reader), old (expired admin),
    #              norole (no O=kiln:<role>)
    other: Path  # another fleet: its own CA, admin and node localhost

    def client(self, ctx: ssl.SSLContext) -> Client:
        return Client.remote("127.0.0.1", self.port, ctx, timeout=TIMEOUT)

    def as_(self, name: str) -> Client:
        return self.client(pki.client_context(self.fleet, name))


def _no_role_client(fleet: Path) -> None:
    """A client certificate from the fleet CA whose subject has no `O=kiln:<role>`."""
    ca = load_ca(Layout(fleet))
    now = certs.now()
    cert, key = certs.make_leaf(ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "norole")]),
                                certs.CLIENT_AUTH, now - certs.CLOCK_SKEW, now + dt.timedelta(days=1))
    (fleet / "clients/norole.key").write_bytes(certs.key_pem(key))
    (fleet / "clients/norole.crt").write_bytes(certs.cert_pem(cert))


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    base = tmp_path_factory.mktemp("tls")
    fleet, other = base / "fleet", base / "other"
    pki.init(fleet)
    pki.issue_client(fleet, "rita", "reader")
    now = dt.datetime.now(dt.UTC)
    pki.issue_client(fleet, "old", "admin", not_before=now - dt.timedelta(days=30),
                     not_after=now - dt.timedelta(days=1))
    _no_role_client(fleet)
    pki.init(other)
    pki.node_for_user_data(other)
    with running_api(base / "host", serve=False) as host:
        # As the mTLS listener does: the CRL rendered beside api-remote.json is followed.
        ctx = _node_context(fleet, host.render_root / "etc/kiln/api-remote-crl.pem")
        server = RemoteServer(host.api, ctx, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield Remote(host, server, server.server_address[1], fleet, other)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(TIMEOUT)
            assert not thread.is_alive()


def _node_context(fleet: Path, crl_file: Path, node: str | None = None, addresses: list[str] | None = None
                  ) -> ssl.SSLContext:
    remote = tomllib.loads(pki.user_data(fleet, node, addresses))["settings"]["api"]["remote"]
    return server_context(remote["ca"], remote["certificate"], remote["key"], crl_file=crl_file)


@pytest.fixture
def r(remote: Remote) -> Remote:
    remote.host.reset()
    return remote


def test_admin_reads_and_writes(r: Remote) -> None:
    admin = r.as_("admin")
    assert admin.request("GET", "/settings?keys=motd") == {"motd": "Welcome to Kiln!"}
    admin.request("PATCH", "/settings", {"motd": "over TLS"})
    assert admin.request("POST", "/tx/commit") == ["settings.motd"]
    assert r.as_("admin").request("GET", "/settings?keys=motd") == {"motd": "over TLS"}


def test_reader_reads_with_secrets_redacted_and_cannot_write(r: Remote) -> None:
    material = tomllib.loads(pki.user_data(r.fleet))["settings"]
    result = r.as_("admin").request("PATCH", "/settings", material)
    assert result is None
    applied = r.as_("admin").request("POST", "/tx/commit_and_apply")
    assert "settings.api.remote.key" in applied["changed"]
    rendered = r.host.render_root / "etc/kiln/api-remote.json"
    assert rendered.stat().st_mode & 0o777 == 0o600 and "BEGIN PRIVATE KEY" in rendered.read_text()

    reader = r.as_("rita")
    seen = reader.request("GET", "/settings?prefix=api")["api"]["remote"]
    assert seen["key"] == "<redacted>"
    assert seen["ca"] == (r.fleet / "ca.crt").read_text() and seen["port"] == 50000
    assert r.as_("admin").request("GET", "/settings?prefix=api")["api"]["remote"]["key"] == (
        r.fleet / "nodes/localhost.key").read_text()
    assert reader.request("GET", "/os?prefix=version") == {"version_id": "1.0.0"}

    before = r.host.state()
    for method, target, body in [("PATCH", "/settings", {"motd": "no"}),
                                 ("PATCH", "/settings/keypair", {"request_payload": ["motd=no"]}),
                                 ("POST", "/tx/commit", None), ("DELETE", "/tx", None),
                                 ("POST", "/tx/apply", None), ("POST", "/actions/reboot", None)]:
        with pytest.raises(ApiRefused) as e:
            reader.request(method, target, body)
        assert e.value.status == 403 and "role 'reader' may only read" in e.value.body["detail"], (method, target)
    assert r.host.state() == before and r.host.reboots == []


def test_certificate_without_a_role_is_403(r: Remote) -> None:
    with pytest.raises(ApiRefused) as e:
        r.as_("norole").request("GET", "/settings")
    assert e.value.status == 403 and "no Kiln role" in e.value.body["detail"]


def _ctx(trust: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=trust)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


@pytest.mark.parametrize("who", ["no certificate", "another CA", "expired", "wrong server CA", "plain HTTP"])
def test_refused_clients_get_no_answer(r: Remote, who: str) -> None:
    before = r.host.state()
    if who == "plain HTTP":
        conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=TIMEOUT)
        with pytest.raises((http.client.HTTPException, OSError)):
            conn.request("PATCH", "/settings", body=b'{"motd": "plain"}')
            conn.getresponse().read()
        conn.close()
    else:
        ctx = {
            "no certificate": lambda: _ctx(r.fleet / "ca.crt"),
            "another CA": lambda: _ctx(r.fleet / "ca.crt", r.other / "clients/admin.crt",
                                       r.other / "clients/admin.key"),
            "expired": lambda: pki.client_context(r.fleet, "old"),
            "wrong server CA": lambda: pki.client_context(r.other, "admin"),
        }[who]()
        with pytest.raises(ApiUnreachable):
            r.client(ctx).request("PATCH", "/settings", {"motd": who})
    assert r.host.state() == before
    assert r.as_("admin").request("GET", "/tx/list") == []  # and the listener still serves


# --- the workstation CLI ----------------------------------------------------------------------------------


def cli(r: Remote, *args: str) -> list[str]:
    return ["--endpoint", f"127.0.0.1:{r.port}", "--pki", str(r.fleet), *args]


def test_workstation_cli_get_and_set(r: Remote, capsys: pytest.CaptureFixture[str]) -> None:
    assert kiln_main(cli(r, "settings", "get", "--json")) == 0
    assert json.loads(capsys.readouterr().out) == r.as_("admin").request("GET", "/settings")
    assert kiln_main(cli(r, "settings", "set", "network.hostname=x")) == 0
    out = capsys.readouterr().out
    assert "changed: settings.network.hostname" in out and "written: /etc/hostname, /etc/hosts" in out
    assert (r.host.render_root / "etc/hostname").read_text() == "x\n"
    assert kiln_main(cli(r, "settings", "get", "network.hostname")) == 0
    assert capsys.readouterr().out == 'settings.network.hostname = "x"\n'


def test_workstation_cli_reader_cannot_set(r: Remote, capsys: pytest.CaptureFixture[str]) -> None:
    before = r.host.state()
    assert kiln_main(cli(r, "--client", "rita", "settings", "set", "network.hostname=y")) == 1
    err = capsys.readouterr().err
    assert "API refused (403)" in err and "role 'reader' may only read" in err
    assert r.host.state() == before
    assert kiln_main(cli(r, "--client", "rita", "settings", "get", "motd")) == 0
    assert capsys.readouterr().out == 'settings.motd = "Welcome to Kiln!"\n'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--client", "old"], "TLS with https://127.0.0.1"),
        (["--client", "nobody"], "nobody.crt does not exist"),
    ],
)
def test_workstation_cli_refusals_are_clear(r: Remote, capsys: pytest.CaptureFixture[str], args: list[str],
                                            message: str) -> None:
    assert kiln_main(cli(r, *args, "settings", "get")) == 1
    assert message in capsys.readouterr().err


def test_workstation_cli_needs_pki_and_a_port(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert kiln_main(["--endpoint", "127.0.0.1:1", "settings", "get"]) == 1
    assert "--endpoint needs --pki DIR" in capsys.readouterr().err
    assert kiln_main(["--endpoint", "nohost", "--pki", str(tmp_path), "settings", "get"]) == 1
    assert "must be HOST:PORT" in capsys.readouterr().err


# --- per-node identity and revocation ------------------------------------------------------------------


@contextlib.contextmanager
def _serving(api: Any, ctx: ssl.SSLContext) -> Iterator[int]:
    """Another RemoteServer over the same API on 127.0.0.1, for as long as the block runs: its port."""
    server = RemoteServer(api, ctx, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


def test_node_a_certificate_is_refused_at_node_b_address(r: Remote, capsys: pytest.CaptureFixture[str]) -> None:
    """A listener on node B's address (127.0.0.1) presenting node A's certificate and key, as
    whoever stole them would: the workstation refuses it unless it asked for node A by name."""
    pki.issue_node(r.fleet, "node-b", ["127.0.0.1"])
    crl = r.host.render_root / "etc/kiln/api-remote-crl.pem"
    with _serving(r.host.api, _node_context(r.fleet, crl, "node-a", ["10.0.0.1"])) as port:
        endpoint = ["--endpoint", f"127.0.0.1:{port}", "--pki", str(r.fleet)]
        assert kiln_main([*endpoint, "settings", "get", "motd"]) == 1
        err = capsys.readouterr().err
        assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in err, err
        assert "hint: the node's certificate does not name 127.0.0.1" in err and "--node-name" in err
        assert kiln_main([*endpoint, "--node-name", "node-b", "settings", "get", "motd"]) == 1
        assert "Hostname mismatch, certificate is not valid for 'node-b'" in capsys.readouterr().err
        # Asked for by its own name, node A is who it says it is.
        assert kiln_main([*endpoint, "--node-name", "node-a", "settings", "get", "motd"]) == 0
        assert capsys.readouterr().out == 'settings.motd = "Welcome to Kiln!"\n'
        with pytest.raises(ApiUnreachable, match=r"https://127.0.0.1:\d+ \(as node-b\) failed: Hostname mismatch"):
            Client.remote("127.0.0.1", port, pki.client_context(r.fleet), TIMEOUT, "node-b").request("GET", "/os")
    # Node B's own certificate passes at its address.
    with _serving(r.host.api, _node_context(r.fleet, crl, "node-b")) as port:
        assert Client.remote("127.0.0.1", port, pki.client_context(r.fleet), TIMEOUT).request("GET", "/tx/list") == []


def test_a_revoked_admin_is_refused_without_restarting_anything(r: Remote) -> None:
    """Revoke, push the CRL through the API as an admin, and the revoked admin's next
    connection is refused by the same listener; the CRL alone restarts no service."""
    pki.issue_client(r.fleet, "eve", "admin")
    eve = r.as_("eve")  # its context holds the certificate: revoking moves the files away
    admin = r.as_("admin")
    remote = tomllib.loads(pki.user_data(r.fleet))["settings"]["api"]["remote"]
    admin.request("PATCH", "/settings", {"api": {"remote": {k: v for k, v in remote.items() if k != "crl"}}})
    admin.request("POST", "/tx/commit_and_apply")
    assert eve.request("GET", "/settings?keys=motd") == {"motd": "Welcome to Kiln!"}
    listening = r.server.socket

    pki.revoke(r.fleet, "eve")
    eve.request("PATCH", "/settings", tomllib.loads(pki.crl_toml(r.fleet))["settings"])  # eve, before it is told
    applied = admin.request("POST", "/tx/commit_and_apply")
    assert applied["changed"] == ["settings.api.remote.crl"]
    assert applied["apply"]["services"] == ["api-remote-crl"]  # not api-remote: no restart command runs
    assert applied["apply"]["written"] == ["/etc/kiln/api-remote-crl.pem"]
    assert (r.host.render_root / "etc/kiln/api-remote-crl.pem").read_text() == (r.fleet / "crl.pem").read_text()

    # TLS 1.3: the client's handshake ends before the server has checked it, so the refusal
    # arrives as the server's "revoked" alert, or as the connection closed or reset.
    with pytest.raises(ApiUnreachable, match=r"https://127\.0\.0\.1:\d+( failed: (the node says this client's "
                                             r"certificate is revoked|EOF occurred)|: \[Errno 104\])"):
        eve.request("GET", "/settings?keys=motd")
    assert admin.request("GET", "/settings?keys=motd") == {"motd": "Welcome to Kiln!"}
    assert r.server.socket is listening and listening.fileno() != -1  # the same listener, never restarted


def test_the_apiserver_process_follows_the_crl_beside_its_config(tmp_path: Path) -> None:
    """`python3 -m kiln.host.api.server --remote` itself: a CRL written beside api-remote.json holds at the next
    connection, in the same process."""
    from tests.test_api_abuse import _server_process

    with _server_process(tmp_path) as (proc, port, fleet):
        pki.issue_client(fleet, "eve", "admin")
        eve = Client.remote("127.0.0.1", port, pki.client_context(fleet, "eve"), timeout=TIMEOUT)
        assert eve.request("GET", "/tx/list") == []
        pki.revoke(fleet, "eve")
        (tmp_path / "api-remote-crl.pem").write_bytes((fleet / "crl.pem").read_bytes())
        with pytest.raises(ApiUnreachable):
            eve.request("GET", "/tx/list")
        admin = Client.remote("127.0.0.1", port, pki.client_context(fleet, "admin"), timeout=TIMEOUT)
        assert admin.request("GET", "/tx/list") == [] and proc.poll() is None


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes `sock` (EOF or reset) within `within` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_stalled_handshake_is_cut_at_the_deadline(remote: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer without a certificate that trickles bytes cannot keep a thread for ever."""
    monkeypatch.setattr(server_mod, "HANDSHAKE_DEADLINE", 1.0)
    with socket.create_connection(("127.0.0.1", remote.port), timeout=5) as s:
        s.sendall(b"\x16")  # the first byte of a TLS record, then nothing more
        # Closed ~1 s later by the deadline; without it the thread would wait for ever, so
        # a minute tells them apart and leaves room for a busy machine.
        assert _closed_by_server(s, within=60)
    assert remote.as_("admin").request("GET", "/settings?keys=motd") == {"motd": "Welcome to Kiln!"}


def test_node_tls_material_that_does_not_load_is_refused(remote: Remote) -> None:
    """A mismatched key would stop the remote listener for good: refuse it before it is stored."""
    admin = remote.as_("admin")
    good = {n: (remote.fleet / f).read_text() for n, f in
            (("ca", "ca.crt"), ("certificate", "nodes/localhost.crt"), ("key", "nodes/localhost.key"))}
    wrong_key = (remote.other / "nodes/localhost.key").read_text()
    with pytest.raises(ApiRefused) as refused:
        admin.request("PATCH", "/settings?tx=tls", {"api": {"remote": {**good, "key": wrong_key}}})
    assert refused.value.status == 400
    assert refused.value.body["path"] == "settings.api.remote"
    assert "do not load" in refused.value.body["detail"]
    assert admin.request("GET", "/tx?tx=tls") == {}
    admin.request("PATCH", "/settings?tx=tls", {"api": {"remote": good}})
    admin.request("DELETE", "/tx?tx=tls")
