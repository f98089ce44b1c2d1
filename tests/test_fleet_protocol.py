"""`kiln fleet serve` speaks FleetLock v1 exactly (zincati's protocol document), over real etcd.

Every test uses its own group, so they share one 3-member cluster (the `etcd` fixture).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kiln.fleet.config import FleetConfig, GroupConfig
from kiln.fleet.etcd import Etcd
from kiln.fleet.locks import FleetLocks, key
from kiln.fleet.server import KINDS, FleetLockService, FleetServer
from kiln.host.api.limits import Budget
from tests.etcd_cluster import EtcdCluster
from tests.fleet_helpers import fleet_server_thread

pytestmark = pytest.mark.timeout(120)
_groups = itertools.count()


@pytest.fixture
def group() -> str:
    return f"proto-{next(_groups)}"


@pytest.fixture
def server(etcd: EtcdCluster) -> Iterator[str]:
    config = FleetConfig(GroupConfig(1), {f"proto-{n}": GroupConfig(2) for n in range(1000) if n % 10 == 9})
    with fleet_server_thread(etcd.endpoints, config) as url:
        yield url


def call(url: str, method: str, path: str, body: Any = None, *, header: str | None = "true",
         raw: bytes | None = None, extra: dict[str, str] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": "application/json", **(extra or {})}
    if header is not None:
        headers["fleet-lock-protocol"] = header
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    text = r.read()
    conn.close()
    doc = json.loads(text) if r.getheader("Content-Type", "").startswith("application/json") else {"text": text}
    return r.status, doc, {k.lower(): v for k, v in r.getheaders()}


def params(host: str, group: str, key_name: str = "id") -> dict[str, Any]:
    return {"client_params": {key_name: host, "group": group}}


def lock(url: str, host: str, group: str) -> tuple[int, dict[str, Any]]:
    status, doc, _ = call(url, "POST", "/v1/pre-reboot", params(host, group))
    return status, doc


def unlock(url: str, host: str, group: str) -> tuple[int, dict[str, Any]]:
    status, doc, _ = call(url, "POST", "/v1/steady-state", params(host, group))
    return status, doc


def stored(etcd: EtcdCluster, group: str) -> dict[str, Any] | None:
    entry = Etcd(etcd.endpoints).get(key(group))
    return json.loads(entry.value) if entry.mod_revision else None


def holders(etcd: EtcdCluster, group: str) -> list[str]:
    doc = stored(etcd, group)
    return [h["id"] for h in doc["holders"]] if doc else []


# --- the lock: owned, recursive, counted ------------------------------------------------


def test_pre_reboot_takes_the_slot_and_steady_state_gives_it_back(server: str, etcd: EtcdCluster, group: str) -> None:
    assert lock(server, "a", group) == (200, {"kind": "granted", "value": f"group {group}: slot held by a"})
    assert holders(etcd, group) == ["a"]
    assert unlock(server, "a", group)[0] == 200
    assert holders(etcd, group) == []


def test_locks_are_recursive(server: str, etcd: EtcdCluster, group: str) -> None:
    assert lock(server, "a", group)[1]["kind"] == "granted"
    assert lock(server, "a", group) == (200, {"kind": "retained", "value": f"group {group}: slot held by a"})
    assert holders(etcd, group) == ["a"]


def test_locks_are_owned_a_second_host_is_refused(server: str, etcd: EtcdCluster, group: str) -> None:
    lock(server, "a", group)
    status, doc = lock(server, "b", group)
    assert status == 423
    assert doc == {"kind": "failed_lock_semaphore_full", "value": f"group {group}: all 1 slots held (by a)"}
    # b cannot release a's slot: steady-state only gives back what the caller holds
    assert unlock(server, "b", group) == (200, {"kind": "not-held", "value": f"group {group}: b holds no slot"})
    assert holders(etcd, group) == ["a"]
    unlock(server, "a", group)
    assert lock(server, "b", group)[0] == 200


def test_a_group_with_more_slots_counts_them(server: str, etcd: EtcdCluster) -> None:
    group = "proto-999"  # configured with 2 slots
    assert [lock(server, h, group)[0] for h in ("a", "b", "c")] == [200, 200, 423]
    assert holders(etcd, group) == ["a", "b"]


def test_steady_state_without_a_slot_succeeds(server: str, etcd: EtcdCluster, group: str) -> None:
    assert unlock(server, "nobody", group)[0] == 200
    assert stored(etcd, group) is None or holders(etcd, group) == []


def test_the_older_node_uuid_spelling_is_accepted(server: str, etcd: EtcdCluster, group: str) -> None:
    status, _, _ = call(server, "POST", "/v1/pre-reboot", params("old-client", group, "node_uuid"))
    assert status == 200
    assert holders(etcd, group) == ["old-client"]
    status, _, _ = call(server, "POST", "/v1/steady-state", params("old-client", group, "node_uuid"))
    assert status == 200 and holders(etcd, group) == []


def test_unknown_members_are_ignored_as_zincati_sends_them(server: str, etcd: EtcdCluster, group: str) -> None:
    body = {"client_params": {"id": "z", "group": group, "extra": 1}, "future": True}
    assert call(server, "POST", "/v1/pre-reboot", body)[0] == 200


# --- refusals: the documented error and no state change ---------------------------------


BAD = [
    ("no header", {"header": None}, 400, "missing_header"),
    ("header false", {"header": "false"}, 400, "missing_header"),
    ("not JSON", {"raw": b"{nope"}, 400, "failed_decoding_request"),
    ("not an object", {"raw": b"[1]"}, 400, "failed_decoding_request"),
    ("no client_params", {"body": {"id": "a"}}, 400, "failed_decoding_request"),
    ("client_params a string", {"body": {"client_params": "a"}}, 400, "failed_decoding_request"),
    ("no id", {"body": {"client_params": {"group": "G"}}}, 400, "invalid_client_identity"),
    ("empty id", {"body": {"client_params": {"id": "", "group": "G"}}}, 400, "invalid_client_identity"),
    ("id a number", {"body": {"client_params": {"id": 7, "group": "G"}}}, 400, "invalid_client_identity"),
    ("id with a newline", {"body": {"client_params": {"id": "a\n", "group": "G"}}}, 400, "invalid_client_identity"),
    ("id too long", {"body": {"client_params": {"id": "a" * 257, "group": "G"}}}, 400, "invalid_client_identity"),
    ("no group", {"body": {"client_params": {"id": "a"}}}, 400, "invalid_group"),
    ("empty group", {"body": {"client_params": {"id": "a", "group": ""}}}, 400, "invalid_group"),
    ("group with a slash", {"body": {"client_params": {"id": "a", "group": "G/x"}}}, 400, "invalid_group"),
    ("group with a space", {"body": {"client_params": {"id": "a", "group": "G x"}}}, 400, "invalid_group"),
]


@pytest.mark.parametrize("endpoint", ["/v1/pre-reboot", "/v1/steady-state"])
@pytest.mark.parametrize(("what", "req", "status", "kind"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_the_documented_error_and_change_nothing(
    server: str, etcd: EtcdCluster, group: str, endpoint: str, what: str, req: dict[str, Any], status: int, kind: str
) -> None:
    lock(server, "holder", group)
    before = Etcd(etcd.endpoints).get(key(group))
    body = req.get("body", params("intruder", group))
    if isinstance(body, dict) and isinstance(body.get("client_params"), dict):
        body = json.loads(json.dumps(body).replace('"G"', json.dumps(group)))
    got_status, doc, headers = call(server, "POST", endpoint, body, header=req.get("header", "true"),
                                    raw=req.get("raw"))
    assert (got_status, doc["kind"]) == (status, kind), doc
    assert headers["content-type"] == "application/json"
    assert set(doc) == {"kind", "value"} and doc["value"]
    assert Etcd(etcd.endpoints).get(key(group)) == before


def test_wrong_methods_and_paths(server: str) -> None:
    status, doc, headers = call(server, "GET", "/v1/pre-reboot")
    assert (status, doc["kind"], headers["allow"]) == (405, "method_not_allowed", "POST")
    status, doc, headers = call(server, "POST", "/v1/status", {})
    assert (status, doc["kind"], headers["allow"]) == (405, "method_not_allowed", "GET")
    status, doc, _ = call(server, "POST", "/v2/pre-reboot", {})
    assert (status, doc["kind"]) == (404, "not_found")
    status, doc, _ = call(server, "DELETE", "/v1/steady-state")
    assert (status, doc["kind"]) == (405, "method_not_allowed")


def test_oversized_and_malformed_lengths(server: str) -> None:
    status, doc, _ = call(server, "POST", "/v1/pre-reboot", raw=b"{}", extra={"Content-Length": str(10**9)})
    assert (status, doc["kind"]) == (413, "request_too_large")
    status, doc, _ = call(server, "POST", "/v1/pre-reboot", raw=b"{}", extra={"Content-Length": "²"})
    assert (status, doc["kind"]) == (400, "failed_decoding_request")


def test_every_error_kind_is_from_the_bounded_set() -> None:
    assert len(KINDS) == len(set(KINDS)) and all(k.islower() for k in KINDS)


def test_etcd_unreachable_is_503_and_nothing_is_granted() -> None:
    from kiln.vm.qemu import free_port

    dead = [f"http://127.0.0.1:{free_port()}"]
    with fleet_server_thread(dead) as url:
        status, doc = lock(url, "a", "default")
    assert (status, doc["kind"]) == (503, "etcd_unavailable")


# --- Kiln's extensions ----------------------------------------------------------------------


def test_a_failure_report_halts_the_group_in_status(server: str, group: str) -> None:
    lock(server, "a", group)
    body = {**params("a", group), "kiln": {"version": "2.0.0", "failure": "health gate failed: web.service is failed"}}
    status, doc, _ = call(server, "POST", "/v1/report", body)
    assert (status, doc["held"]) == (200, True)
    _, st, _ = call(server, "GET", "/v1/status")
    (g,) = [g for g in st["groups"] if g["group"] == group]
    assert g["halted"] and g["slots"] == 1 and g["free"] == 0
    (h,) = g["holders"]
    assert (h["id"], h["version"], h["failure"]) == ("a", "2.0.0", "health gate failed: web.service is failed")
    assert [e["event"] for e in g["events"]] == ["failed"]
    # a report from a host that holds nothing is answered, and changes nothing
    status, doc, _ = call(server, "POST", "/v1/report", {**params("b", group), "kiln": {"failure": "x"}})
    assert (status, doc["held"]) == (200, False)


def test_an_operator_release_frees_the_slot_and_is_kept_as_an_event(server: str, etcd: EtcdCluster,
                                                                    group: str) -> None:
    lock(server, "dead-host", group)
    status, doc, _ = call(server, "POST", "/v1/release", params("dead-host", group))
    assert (status, doc["kind"]) == (200, "released")
    assert holders(etcd, group) == []
    doc_ = stored(etcd, group)
    assert doc_ is not None
    assert [(e["event"], e["id"], e["by"]) for e in doc_["events"]] == [("released", "dead-host", "operator")]


def test_metrics_are_prometheus_text(server: str, group: str) -> None:
    lock(server, "a", group)
    lock(server, "b", group)
    unlock(server, "a", group)
    lock(server, "b", group)
    _, doc, headers = call(server, "GET", "/metrics")
    text = doc["text"].decode()
    assert headers["content-type"].startswith("text/plain")
    assert 'kiln_fleet_requests_total{endpoint="pre-reboot",kind="failed_lock_semaphore_full"}' in text
    assert f'kiln_fleet_holders{{group="{group}"}} 1' in text
    assert f'kiln_fleet_slots{{group="{group}"}} 1' in text
    assert "kiln_fleet_lock_wait_seconds_count" in text
    for line in text.splitlines():  # every sample line: name{labels} number
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_a_silent_holder_expires_only_with_stale_after(etcd: EtcdCluster, group: str) -> None:
    clock = [datetime(2026, 12, 1, tzinfo=UTC)]
    cfg = FleetConfig(GroupConfig(1), {group: GroupConfig(1, timedelta(minutes=30))})
    locks = FleetLocks(Etcd(etcd.endpoints), cfg, now=lambda: clock[0])
    with fleet_server_thread(etcd.endpoints, locks=locks) as url:
        assert lock(url, "silent", group)[0] == 200
        clock[0] += timedelta(minutes=29)
        assert lock(url, "other", group)[0] == 423
        call(url, "POST", "/v1/report", {**params("silent", group), "kiln": {"version": "1.0.0"}})  # heard from
        clock[0] += timedelta(minutes=29)
        assert lock(url, "other", group)[0] == 423
        clock[0] += timedelta(minutes=1)
        assert lock(url, "other", group)[0] == 200
        _, st, _ = call(url, "GET", "/v1/status")
    (g,) = [g for g in st["groups"] if g["group"] == group]
    assert [h["id"] for h in g["holders"]] == ["other"]
    assert [(e["event"], e["id"]) for e in g["events"]] == [("expired", "silent")]
    # without stale-after, an hour of silence keeps the slot
    other = f"{group}-nostale"
    locks2 = FleetLocks(Etcd(etcd.endpoints), FleetConfig(GroupConfig(1)), now=lambda: clock[0])
    with fleet_server_thread(etcd.endpoints, locks=locks2) as url:
        lock(url, "silent", other)
        clock[0] += timedelta(days=30)
        assert lock(url, "other", other)[0] == 423


def test_a_corrupt_semaphore_in_etcd_is_an_internal_error_and_is_left_alone(server: str, etcd: EtcdCluster,
                                                                            group: str) -> None:
    Etcd(etcd.endpoints).put(key(group), b"{not json")
    status, doc = lock(server, "a", group)
    assert (status, doc["kind"]) == (500, "internal_error")
    assert Etcd(etcd.endpoints).get(key(group)).value == b"{not json"
    status, st, _ = call(server, "GET", "/v1/status")  # the other groups are still shown
    assert status == 200 and {"group": group, "error": f"the semaphore in etcd ({key(group)}) is unreadable: "
                                                       "JSONDecodeError"} in st["groups"]
    assert call(server, "GET", "/metrics")[0] == 200


def test_lost_races_give_up_with_contended(server: str, group: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.fleet import locks

    monkeypatch.setattr(locks, "MAX_RACES", 0)  # as if every compare-and-swap had lost
    status, doc = lock(server, "a", group)
    assert (status, doc["kind"]) == (503, "contended")


def test_https_with_the_fleet_pki(etcd: EtcdCluster, group: str, tmp_path: Path) -> None:
    """The fleet's own CA (kiln pki): hosts check the server with settings.updates.fleet-lock.ca;
    with --client-ca, only holders of a client certificate from it get an answer."""
    import subprocess
    import sys

    from kiln import pki
    from kiln.fleet.server import tls_context
    from kiln.host.update.fleetlock import FleetLockClient, LockUnreachable

    d = tmp_path / "pki"
    pki.init(d)
    server = pki.issue_node(d, "fleet", ["127.0.0.1"])
    ca = (d / "ca.crt").read_text()
    with fleet_server_thread(etcd.endpoints, tls=tls_context(str(server.cert), str(server.key))) as url:
        assert url.startswith("https://")
        assert FleetLockClient(url, "a", group, ca=ca).pre_reboot()["kind"] == "granted"
        with pytest.raises(LockUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            FleetLockClient(url, "b", group).pre_reboot()  # the system's CAs do not know the fleet's
        with pytest.raises(LockUnreachable):
            FleetLockClient(url.replace("https", "http"), "b", group).pre_reboot()
    mutual = tls_context(str(server.cert), str(server.key), str(d / "ca.crt"))
    with fleet_server_thread(etcd.endpoints, tls=mutual) as url:
        with pytest.raises(LockUnreachable):
            FleetLockClient(url, "b", group, ca=ca).pre_reboot()  # no client certificate
        cert, key_ = d / "clients" / "admin.crt", d / "clients" / "admin.key"
        cli = [sys.executable, "-m", "kiln.cli.main", "fleet", "status", "--server", url, "--ca", str(d / "ca.crt")]
        ok = subprocess.run([*cli, "--cert", str(cert), "--key", str(key_), "--json"], capture_output=True, text=True,
                            timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert any(g["group"] == group for g in json.loads(ok.stdout)["groups"])
        refused = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "cannot reach the fleet server" in refused.stderr


def etcd_member_cert(d: Path) -> tuple[Path, Path]:
    """A certificate from the fleet CA for an etcd member: server *and* client auth (etcd's
    own gRPC gateway dials the member with it when client certificates are required)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from kiln.pki import certs
    from kiln.pki.fleet import Layout, load_ca

    ca = load_ca(Layout(d))
    key = certs.new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "etcd")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    (d / "etcd.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "etcd.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return d / "etcd.crt", d / "etcd.key"


def test_etcd_over_tls_with_client_certificates(tmp_path: Path) -> None:
    """`--etcd-ca/--etcd-cert/--etcd-key`: a member that requires client certificates (made
    with `kiln pki`) is reached with them, and refuses a client without."""
    import subprocess
    import time

    from kiln import pki
    from kiln.core.run import which
    from kiln.fleet.etcd import EtcdUnavailable, Tls
    from kiln.vm.qemu import free_port

    d = tmp_path / "pki"
    pki.init(d)
    member_cert, member_key = etcd_member_cert(d)
    client, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{client}"
    proc = subprocess.Popen([
        which("etcd"), "--name", "tls", "--data-dir", str(tmp_path / "data"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
        "--cert-file", str(member_cert), "--key-file", str(member_key),
        "--client-cert-auth", "--trusted-ca-file", str(d / "ca.crt"),
        "--logger", "zap", "--log-outputs", str(tmp_path / "etcd.log"),
    ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tls = Tls(str(d / "ca.crt"), str(d / "clients" / "admin.crt"), str(d / "clients" / "admin.key"))
        etcd = Etcd([url], tls=tls)
        deadline = time.monotonic() + 30
        while True:
            try:
                etcd.revision()
                break
            except EtcdUnavailable:
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "etcd.log").read_text()[-2000:]
                time.sleep(0.2)
        locks = FleetLocks(etcd, FleetConfig())
        assert locks.lock("tls", "a")[0].value == "granted"
        with pytest.raises(EtcdUnavailable):
            Etcd([url], tls=Tls(str(d / "ca.crt"))).get(key("tls"))  # no client certificate
        with pytest.raises(EtcdUnavailable):
            Etcd([url]).get(key("tls"))  # the system's CAs do not know the fleet's
    finally:
        proc.kill()
        proc.wait()


# --- a server facing many hosts: what one client can make it hold -------------------------------


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def test_request_heads_are_capped(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    fat = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000) for i in range(8))
    answer = _raw(port, b"POST /v1/pre-reboot HTTP/1.1\r\nHost: x\r\n" + fat + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["kind"] == "request_too_large"
    assert call(server, "GET", "/v1/status")[0] == 200


def test_connections_beyond_the_cap_are_closed_on_arrival(etcd: EtcdCluster) -> None:
    locks = FleetLocks(Etcd(etcd.endpoints), FleetConfig())
    srv = FleetServer(("127.0.0.1", 0), FleetLockService(locks))
    srv._slots = Budget(2)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    port = srv.server_address[1]
    try:
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            for s in held:  # each served once and kept open (HTTP/1.1 keep-alive)
                s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            assert _raw(port, b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n") == b"", "a third is closed unanswered"
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 10
        while not _raw(port, b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
            assert time.monotonic() < deadline, "the slots never came back"
            time.sleep(0.1)
    finally:
        srv.shutdown()
        srv.server_close()
