"""The remote API under abuse: hostile sockets, oversized heads, a reader's bodies.

The connection limits are tested on the in-process RemoteServer of test_api_tls; the memory
bound on the real `python3 -m kiln.host.api.server --remote` process, whose peak RSS (VmHWM) the kernel keeps.
Hostile peers connect from 127.0.0.2 (all of 127/8 is loopback on Linux), admins from
127.0.0.1, so the per-source limit can tell them apart as it would on a network.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln import pki
from kiln.host.api import limits
from kiln.host.api import server as server_mod
from kiln.host.api.client import ApiUnreachable, Client
from tests.test_api import TIMEOUT, bootstrap, raw_exchange, running_api, variant_defaults
from tests.test_api_tls import Remote, _closed_by_server, remote  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(180)
HOSTILE = "127.0.0.2"


@pytest.fixture
def r(remote: Remote) -> Remote:  # noqa: F811 (the imported fixture)
    remote.host.reset()
    return remote


def _hostile_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.bind((HOSTILE, 0))
    s.connect(("127.0.0.1", port))
    return s


def _motd(r: Remote) -> object:
    return r.as_("admin").request("GET", "/settings?keys=motd")


def _until_served(r: Remote, within: float = 15) -> None:
    """Wait until the admin is served again (the test's hostile sockets have been let go)."""
    deadline = time.monotonic() + within
    while True:
        try:
            _motd(r)
            return
        except ApiUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_one_source_gets_a_few_handshakes_and_others_still_get_in(r: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_mod, "HANDSHAKE_DEADLINE", 30.0)
    stalled = [_hostile_socket(r.port) for _ in range(limits.HANDSHAKES_PER_SOURCE)]
    try:
        time.sleep(0.5)  # let the server accept them
        with _hostile_socket(r.port) as extra:
            assert _closed_by_server(extra, within=5), "one more from the same address must be refused"
        for s in stalled:
            assert not _closed_by_server(s, within=0.2), "the first ones are still in their handshake"
        assert _motd(r) == {"motd": "Welcome to Kiln!"}  # another address is served meanwhile
    finally:
        for s in stalled:
            s.close()
    _until_served(r)


def _held(r: Remote, name: str) -> http.client.HTTPSConnection:
    """A connection that has been served once and stays open (keep-alive), holding its slot."""
    conn = http.client.HTTPSConnection("127.0.0.1", r.port, context=pki.client_context(r.fleet, name),
                                       timeout=TIMEOUT)
    conn.request("GET", "/os")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    return conn


def test_served_connections_beyond_the_limit_are_closed(r: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the handshake a connection holds a served slot; the limit counts only those."""
    monkeypatch.setattr(r.server, "max_connections", 3)
    held = [_held(r, "admin") for _ in range(3)]
    try:
        with pytest.raises(ApiUnreachable):
            r.as_("admin").request("GET", "/settings?keys=motd")
    finally:
        for c in held:
            c.close()
    _until_served(r)


def test_one_identity_holds_at_most_its_share(r: Remote) -> None:
    held = [_held(r, "rita") for _ in range(limits.PER_IDENTITY)]
    try:
        with pytest.raises(ApiUnreachable):
            r.as_("rita").request("GET", "/os")
        assert _motd(r) == {"motd": "Welcome to Kiln!"}  # another identity is not affected
    finally:
        for c in held:
            c.close()
    _until_served(r)


def test_an_admin_gets_in_while_64_hostile_sockets_reopen(r: Remote) -> None:
    """The attack of the report: 64 sockets with no certificate, reopened as soon as closed."""
    stop = threading.Event()
    opened = [0]

    def attacker() -> None:
        for _ in range(10_000):  # bounded; the test stops it long before
            if stop.is_set():
                return
            try:
                s = _hostile_socket(r.port)
            except OSError:
                time.sleep(0.01)
                continue
            opened[0] += 1
            with s:
                _closed_by_server(s, within=0.5)

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(64)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # the attack is under way
        for _ in range(5):
            start = time.monotonic()
            assert _motd(r) == {"motd": "Welcome to Kiln!"}
            assert time.monotonic() - start < TIMEOUT
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert opened[0] > 64, "the attackers kept reopening"
    _until_served(r)


def test_a_readers_write_is_refused_before_its_body(r: Remote) -> None:
    """403 at once, without waiting for (or holding) the megabyte the reader announced."""
    ctx = pki.client_context(r.fleet, "rita")
    with socket.create_connection(("127.0.0.1", r.port), timeout=TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"POST /tx/commit HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        start = time.monotonic()
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        assert b"may only read" in answer
        assert time.monotonic() - start < 5


def test_the_local_socket_caps_the_request_head(tmp_path: Path) -> None:
    with running_api(tmp_path) as host:
        fat = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000) for i in range(8))
        answer = raw_exchange(host.socket, b"GET /os HTTP/1.1\r\nHost: x\r\n" + fat + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"over 16384 bytes" in answer
        long_line = raw_exchange(host.socket, b"GET /os?" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")
        assert long_line.startswith(b"HTTP/1.1 431 "), long_line[:200]
        just_under = b"X-Pad: " + b"a" * 15000 + b"\r\n"
        ok = raw_exchange(host.socket, b"GET /os HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + just_under + b"\r\n")
        assert ok.startswith(b"HTTP/1.1 200 "), ok[:200]


# --- the real server process: memory under attack -----------------------------------------------

# Peak RSS (VmHWM) the server may reach during the attack. It starts at ~24 MiB and stays under
# 30 here; with the head cap and the identity share lifted it reached 176 MiB (and grows with
# the attacker's threads: past 1 GiB in the report).
RSS_BOUND = 64 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server_process(tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    fleet = tmp / "fleet"
    pki.init(fleet)
    node = pki.node_for_user_data(fleet)  # localhost, 127.0.0.1
    pki.issue_client(fleet, "rita", "reader")
    store = bootstrap(tmp, variant_defaults())
    port = _free_port()
    cfg = tmp / "api-remote.json"  # the CRL, if any, goes beside it: api-remote-crl.pem
    cfg.write_text(json.dumps({"ca": (fleet / "ca.crt").read_text(), "certificate": node.cert.read_text(),
                               "key": node.key.read_text(), "port": port}))
    log = tmp / "server.log"  # a file, not a pipe: nobody reads a pipe during the attack
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kiln.host.api.server", "--remote", "--remote-config",
                                 str(cfg), "--datastore", str(store.root), "--address", "127.0.0.1"],
                                stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "listening on port" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield proc, port, fleet
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def _attack(port: int, ctx: ssl.SSLContext, head: bytes, chunks: list[bytes]) -> bytes:
    """One request from the hostile address, retried until served (the limits turn most away
    at first): the server's answer, b"cut" when it closed the connection while the request
    was still being sent (past what it accepts), or b"" when it was never served."""
    for _ in range(400):  # bounded: each try ends in a refusal, an answer, a cut or a timeout
        sent = 0
        try:
            with socket.socket() as raw:
                raw.settimeout(TIMEOUT)
                raw.bind((HOSTILE, 0))
                raw.connect(("127.0.0.1", port))
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    for c in [head, *chunks]:
                        s.sendall(c)
                        sent += len(c)
                    answer = s.recv(4096)
        except OSError:  # refused in or right after the handshake, or cut while sending
            answer = b"cut" if sent > 0 else b""
        if answer:
            return answer
        time.sleep(0.05)
    return b""


# 100 header lines of almost 64 KiB each: what the stdlib alone would accept.
FAT_HEAD = (b"GET /os HTTP/1.1\r\nHost: x\r\n", [b"X-Pad: " + b"a" * 65000 + b"\r\n"] * 100)
# A reader's megabyte body on a write.
FAT_BODY = (b"PATCH /settings HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n", [b"a" * (1 << 20)])


def test_a_readers_attack_keeps_the_server_under_its_memory_bound(tmp_path: Path) -> None:
    with _server_process(tmp_path) as (proc, port, fleet):
        admin = Client.remote("127.0.0.1", port, pki.client_context(fleet, "admin"), timeout=TIMEOUT)
        assert admin.request("GET", "/settings?keys=motd") == {"motd": "Welcome to Kiln!"}
        before = _hwm(proc.pid)
        ctx = pki.client_context(fleet, "rita")
        answers: list[bytes] = []

        def attack(request: tuple[bytes, list[bytes]]) -> None:
            for _ in range(2):
                answers.append(_attack(port, ctx, *request))

        threads = [threading.Thread(target=attack, args=(req,)) for req in [FAT_HEAD] * 64 + [FAT_BODY] * 64]
        for t in threads:
            t.start()
        served = admin.request("GET", "/settings?keys=motd")
        for t in threads:
            t.join(120)
        peak = _hwm(proc.pid)
        assert served == {"motd": "Welcome to Kiln!"}
        assert admin.request("GET", "/settings?keys=motd") == {"motd": "Welcome to Kiln!"}
        print(f"server VmHWM {before >> 20} MiB before, {peak >> 20} MiB after {len(answers)} attacks:",
              {k: sum(a.startswith(k) for a in answers) for k in (b"HTTP/1.1 431", b"HTTP/1.1 403", b"cut")})
        assert peak < RSS_BOUND, f"peak RSS {peak >> 20} MiB"
        assert any(a.startswith(b"HTTP/1.1 403 ") for a in answers)
        assert len(answers) == 256
        # Heads are cut at the cap (the 431 is usually lost in the reset of a peer still sending).
        assert all(a.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 403 ", b"cut")) for a in answers), answers[:3]
