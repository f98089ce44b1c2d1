"""Fuzzing the API over its real Unix socket: no request gets a 5xx, kills the server or, when
refused, changes the datastore.

Hypothesis draws a method (the routed ones, other standard ones and made-up tokens), a path
(every route, near misses and random text), a query (the parameters the routes read, and
others) and a body (nothing, random JSON, settings-shaped trees full of near-valid values,
keypair payloads, random bytes). Every answer must be a documented shape: an Error body for
a 4xx, the operation's schema for a 2xx. Raw-socket tests then feed the HTTP layer what no
client library would send.
"""

from __future__ import annotations

import json
import socket
import string
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kiln.host.api.routes import MAX_BODY, ROUTES
from kiln.host.settings.keys import format_key
from tests.test_api import OPENAPI, TIMEOUT, ApiHost, check_schema, raw_exchange, running_api, send, status_of

pytestmark = pytest.mark.timeout(120)
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiHost]:
    with running_api(tmp_path_factory.mktemp("fuzz")) as h:
        yield h
        assert h.alive()


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(OPENAPI.read_text())
    return loaded


# --- strategies ---------------------------------------------------------------------------------------

ROUTE_PATHS = sorted({p for _, p in ROUTES})
ALLOWED = {m for m, _ in ROUTES}
methods = st.one_of(
    st.sampled_from(sorted({m for m, _ in ROUTES})),
    st.sampled_from(["PUT", "HEAD", "OPTIONS", "TRACE", "CONNECT"]),
    st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=12),
)
paths = st.one_of(
    st.sampled_from(ROUTE_PATHS),
    st.sampled_from(ROUTE_PATHS).map(lambda p: p + "/"),
    st.sampled_from(ROUTE_PATHS).map(str.upper),
    st.builds(lambda a, b: a + "/" + b, st.sampled_from(ROUTE_PATHS), st.text(max_size=10)).map(
        lambda p: urllib.parse.quote(p, safe="/")),
    st.text(max_size=40).map(lambda p: "/" + urllib.parse.quote(p, safe="/%?&=")),
)
hostnames = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,5}){0,2}\Z")
names = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,8}\Z") | st.text(max_size=8)
sysctl_names = st.from_regex(r"\A[a-z0-9_][a-z0-9_.\-/]{0,20}\Z") | st.text(max_size=10)
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(
    max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=10), inner, max_size=4), max_leaves=20)
pem = st.builds(lambda k, b: f"-----BEGIN {k}-----\n{b}\n-----END {k}-----\n",
                st.sampled_from(["CERTIFICATE", "PRIVATE KEY", "X"]), st.text(max_size=20))
urls = st.builds(lambda s, h: f"{s}://{h}/", st.sampled_from(["http", "https", "ftp"]), hostnames)


def leaf(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly near-valid values for the key, sometimes anything at all."""
    return st.one_of(*[valid] * 5, json_values)


LEAVES: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("motd",): leaf(st.text(max_size=50)),
    ("network", "hostname"): leaf(hostnames),
    ("ntp", "time-servers"): leaf(st.lists(hostnames, max_size=4)),
    ("kernel", "lockdown"): leaf(st.sampled_from(["none", "integrity", "confidentiality", "all"])),
    ("updates", "metadata-base-url"): leaf(urls),
    ("updates", "targets-base-url"): leaf(urls),
    ("updates", "seed"): leaf(st.integers(-5, 3000)),
    ("updates", "version-lock"): leaf(st.sampled_from(["latest", "1.2.3", "v2.0.0", "1.2"])),
    ("updates", "ignore-waves"): leaf(st.booleans()),
    ("api", "remote", "enabled"): leaf(st.booleans()),
    ("api", "remote", "port"): leaf(st.integers(-1, 70000)),
    ("api", "remote", "ca"): leaf(pem),
    ("api", "remote", "certificate"): leaf(pem),
    ("api", "remote", "key"): leaf(pem),
}
container_fields = {"source": st.text(max_size=20), "enabled": st.booleans(), "superpowered": st.booleans(),
                    "user-data": st.text(max_size=10), "mode": st.sampled_from(["off", "once", "always", "x"]),
                    "essential": st.booleans()}


@st.composite
def settings_trees(draw: st.DrawFn) -> dict[str, Any]:
    """A tree built from real keys with near-valid values, plus now and then an unknown key."""
    tree: dict[str, Any] = {}

    def put(path: tuple[str, ...], value: Any) -> None:
        node = tree
        for seg in path[:-1]:
            nxt = node.setdefault(seg, {})
            if not isinstance(nxt, dict):
                return
            node = nxt
        node[path[-1]] = value

    for path in draw(st.lists(st.sampled_from(sorted(LEAVES)), max_size=5, unique=True)):
        put(path, draw(LEAVES[path]))
    for _ in range(draw(st.integers(0, 2))):
        put(("kernel", "sysctl", draw(sysctl_names)), draw(leaf(st.text(max_size=5))))
    for group in draw(st.lists(st.sampled_from(["host-containers", "bootstrap-containers"]), max_size=2)):
        name, fld = draw(names), draw(st.sampled_from(sorted(container_fields)))
        put((group, name, fld), draw(leaf(container_fields[fld])))
    if draw(st.sampled_from([False] * 9 + [True])):  # now and then a key the model does not have
        put(tuple(draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3))), draw(json_scalars))
    return {"settings": tree} if draw(st.booleans()) else tree


def _keypair(path: tuple[str, ...], value: str, prefixed: bool) -> str:
    return ("settings." if prefixed else "") + format_key(path) + "=" + value


keypair_bodies = st.builds(
    lambda pairs: {"request_payload": pairs},
    st.lists(st.one_of(
        st.builds(_keypair, st.sampled_from(sorted(LEAVES)), st.one_of(
            st.text(max_size=20), json_values.map(json.dumps)), st.booleans()),
        st.builds(lambda n, v: format_key(("kernel", "sysctl", n)) + "=" + v, sysctl_names, st.text(max_size=5)),
        st.text(max_size=30),
    ), max_size=5),
)
other_bodies = st.one_of(
    st.none(),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.sampled_from([b"", b"null", b"{", b'{"motd": "\\ud800"}', b"[" * 3000, b'{"settings": {"motd": 1}}']),
)
tree_bodies = settings_trees().map(lambda v: json.dumps(v).encode())
pair_bodies = keypair_bodies.map(lambda v: json.dumps(v).encode())


def bodies_for(method: str, path: str) -> st.SearchStrategy[bytes | None]:
    """Mostly the body the route reads, sometimes anything."""
    if (method, path) == ("PATCH", "/settings"):
        return st.one_of(tree_bodies, tree_bodies, tree_bodies, pair_bodies, other_bodies)
    if (method, path) == ("PATCH", "/settings/keypair"):
        return st.one_of(pair_bodies, pair_bodies, pair_bodies, tree_bodies, other_bodies)
    return st.one_of(st.none(), st.none(), other_bodies, tree_bodies)


# A routed method and path three times in four (the writes weighted up); otherwise any method on any path.
WRITES = [("PATCH", "/settings")] * 6 + [("PATCH", "/settings/keypair")] * 3 + [
    ("POST", "/tx/commit"), ("POST", "/tx/commit_and_apply"), ("POST", "/tx/commit_and_apply")]
endpoints = st.one_of(*[st.sampled_from(sorted(ROUTES) + WRITES)] * 3, st.tuples(methods, paths))
query_names = st.sampled_from(["keys", "prefix", "tx", "names", "x", ""])
query_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["default", "default", "alpha", "kiln-launch", "settings", "motd", 'kernel.sysctl."a.b"', "",
                     "a b", "../x", "motd,hostname", "ntp", "api-remote,hosts"]),
    st.lists(st.sampled_from([format_key(("settings", *p)) for p in LEAVES]), max_size=3).map(",".join),
)
queries = st.just("") | st.lists(st.tuples(query_names, query_values), min_size=1, max_size=3).map(
    lambda pairs: "?" + urllib.parse.urlencode(pairs))


# --- the fuzz run --------------------------------------------------------------------------------------


@FUZZ
@given(endpoint=endpoints, query=queries, data=st.data())
def test_fuzz_requests(host: ApiHost, doc: dict[str, Any], endpoint: tuple[str, str], query: str,
                       data: st.DataObject) -> None:
    method, path = endpoint
    body = data.draw(bodies_for(method, path), label="body")
    target = path + query
    before = host.state()
    headers = {"Content-Type": "application/json"}
    if body is None and method in ("POST", "PATCH", "PUT"):
        headers["Content-Length"] = "0"
    status, answer = send(host.socket, method, target, body, headers)
    event(f"{method if method in ALLOWED else 'other'} {status}")
    assert status < 500, (method, target, body, answer)
    if method == "HEAD":
        assert answer is None
    elif status >= 400:
        assert host.state() == before, f"refused {method} {target} ({status}) changed the datastore"
        check_schema(doc, method, target, status, answer)
    else:
        check_schema(doc, method, target, status, answer)
    if len(host.state()) > 200:  # too many pending transactions: start over from the launch state
        host.reset()


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(patches=st.lists(st.one_of(tree_bodies, pair_bodies), min_size=1, max_size=3),
       tx=st.sampled_from(["default", "alpha"]), via=st.sampled_from(["commit_and_apply", "commit", "apply"]))
def test_fuzz_patch_commit_apply(host: ApiHost, doc: dict[str, Any], patches: list[bytes], tx: str,
                                 via: str) -> None:
    """Settings-shaped patches, then commit and render them: whatever got in must render or be reported."""
    for body in patches:
        target = "/settings/keypair" if body.startswith(b'{"request_payload"') else "/settings"
        before = host.state()
        status, answer = send(host.socket, "PATCH", f"{target}?tx={tx}", body, {"Content-Type": "application/json"})
        event(f"PATCH {status}")
        assert status in (204, 400), answer
        if status == 400:
            check_schema(doc, "PATCH", target, status, answer)
            assert host.state() == before
    steps = {"commit_and_apply": ["/tx/commit_and_apply"], "commit": ["/tx/commit"],
             "apply": ["/tx/commit", "/tx/apply"]}[via]
    for step in steps:
        status, answer = send(host.socket, "POST", f"{step}?tx={tx}", None, {"Content-Length": "0"})
        event(f"POST {step} {status}")
        assert status in (200, 409), answer
        check_schema(doc, "POST", step, status, answer)
        if status == 200 and "apply" in step:
            report = answer.get("apply", answer)
            assert report["errors"] == [], report
    host.reset()


def test_fuzz_left_the_server_serving(host: ApiHost) -> None:
    assert host.alive()
    assert set(host.client().request("GET", "/settings")) >= {"motd", "kernel"}


# --- raw bytes at the HTTP layer ----------------------------------------------------------------------------


GARBAGE = [
    b"",
    b"\r\n\r\n",
    b"garbage\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /settings\r\n\r\n",  # HTTP/0.9
    b"GET /settings HTTP/9.9\r\n\r\n",
    b"GET /settings HTTP/1.1 extra\r\n\r\n",
    b"GET /settings FTP/1.0\r\n\r\n",
    b"GET http://[::1/settings HTTP/1.1\r\n\r\n",
    b"GET //settings HTTP/1.1\r\n\r\n",
    b"GET settings HTTP/1.1\r\n\r\n",
    b"GET /settings HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /settings HTTP/1.1\r\n: empty name\r\n\r\n",
    b"GET /settings HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"GET /\x00\x01\x02 HTTP/1.1\r\n\r\n",
    b"GET /settings?keys=%ff%fe%00 HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS ClientHello
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 preface
    b"GET /settings HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n",  # too many headers
    b"GET /settings HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",  # header line too long
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",  # request line too long
    b"PATCH /settings HTTP/1.1\r\nContent-Length: 50\r\n\r\n{}",  # truncated body
    b'PATCH /settings HTTP/1.1\r\nContent-Length: 14\r\n\r\n{"motd": "ok"}',  # whole, after all the rest
    b"PATCH /settings HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"PATCH /settings HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    "PATCH /settings HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n{}".encode(),  # a digit to isdigit(), not to int()
    "PATCH /settings HTTP/1.1\r\nContent-Length: \u0662\r\n\r\n{}".encode(),  # Arabic-Indic two
    b"PATCH /settings HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"PATCH /settings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /tx/commit HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /settings HTTP/1.1\r\n\r\nBOGUS\r\n\r\n",  # pipelined
]


@pytest.mark.parametrize("data", GARBAGE, ids=range(len(GARBAGE)))
def test_raw_garbage_never_kills_the_server(host: ApiHost, data: bytes) -> None:
    host.reset()
    before = host.state()
    answer = raw_exchange(host.socket, data)
    if answer.startswith(b"HTTP/"):
        first = status_of(answer)
        assert first < 500, answer[:300]
        if first >= 400:
            assert b'"error"' in answer, answer[:300]
    if b'{"motd": "ok"}' not in data:
        pending = host.client().request("GET", "/tx/list")
        assert pending == [] and host.state() == before, (pending, data[:100])
    assert host.alive()


@settings(max_examples=100, deadline=None, database=None)
@given(data=st.binary(max_size=300) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace")))
def test_random_bytes_never_kill_the_server(host: ApiHost, data: bytes) -> None:
    answer = raw_exchange(host.socket, data)
    if answer.startswith(b"HTTP/1."):
        assert status_of(answer) < 500, answer[:300]
    assert host.alive()


def test_clients_that_hang_up_or_stall_cost_nothing_to_others(host: ApiHost) -> None:
    stalled = []
    try:
        for data in (b"", b"GET /settings HTTP/1.1\r\n", b"PATCH /settings HTTP/1.1\r\nContent-Length: 10\r\n\r\n{"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(host.socket))
            s.sendall(data)
            stalled.append(s)
        # Ask for a large answer and hang up before reading it.
        for _ in range(20):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(host.socket))
                s.sendall(b"GET /openapi.json HTTP/1.1\r\n\r\n")
        # While those are stuck, everyone else is served.
        results: list[int] = []

        def get() -> None:
            results.append(send(host.socket, "GET", "/settings?keys=motd")[0])

        threads = [threading.Thread(target=get) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert results == [200] * 32
    finally:
        for s in stalled:
            s.close()
    assert host.alive()


def test_many_connections_at_once(host: ApiHost) -> None:
    socks = []
    try:
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(TIMEOUT)
            s.connect(str(host.socket))
            socks.append(s)
        for s in socks:
            s.sendall(b"GET /tx/list HTTP/1.1\r\nConnection: close\r\n\r\n")
        for s in socks:
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            assert status_of(data) == 200
    finally:
        for s in socks:
            s.close()


def test_oversize_body_is_refused_without_reading_it(host: ApiHost, tmp_path: Path) -> None:
    before = host.state()
    head = f"PATCH /settings HTTP/1.1\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    answer = raw_exchange(host.socket, head + b"x" * 1000)
    assert status_of(answer) == 413
    assert host.state() == before and host.alive()
