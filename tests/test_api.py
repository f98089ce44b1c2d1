"""The settings API end to end: a real LocalServer on a temporary Unix socket, driven through `Client`.

The store is bootstrapped the way the image does it (the variant's defaults through storewolf,
then the launch commit), restored before every test, and compared byte for byte after every
refused request. Every answer is also checked against the OpenAPI document's schema for its
status. Restart commands of the real defaults would touch this machine's systemd, so those run
with restart=False; restarts are tested with definitions whose commands only touch a file.

Other API test modules (fuzz, TLS, CLI) start their servers with `running_api` from here.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import shutil
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate as validate_openapi

from kiln.build.settings import merge_defaults
from kiln.host.api import routes
from kiln.host.api.client import ApiRefused, ApiUnreachable, Client
from kiln.host.api.routes import MAX_BODY, ROUTES, Api, Request
from kiln.host.api.server import LocalServer
from kiln.host.boot import storewolf
from kiln.host.datastore import Datastore
from kiln.host.render.templates import Templates
from kiln.host.secureboot import SecureBootStatus
from kiln.host.settings.keys import get_path, parse_key, set_path
from tests.openapi_schema import validator
from tests.test_settings_model import VALID as VALID_SETTINGS

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[1]
DEFAULTS = REPO / "variants/settings/defaults.toml"
TEMPLATES = REPO / "variants/settings/templates"
OPENAPI = Path(routes.__file__).with_name("openapi.json")
OPENAPI_DOCS = REPO / "docs/api.openapi.json"
OS_RELEASE = 'NAME="Kiln"\nID=kiln\nVERSION_ID=1.0.0\nVARIANT_ID=container-host\nPRETTY_NAME="Kiln 1.0.0"\n'
TIMEOUT = 10.0


# --- a running API host (shared with the other API test modules) ---------------------------


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes, every link's target and every directory under `root`."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = p.read_bytes()
    return out


@dataclass
class ApiHost:
    """A bootstrapped datastore, an Api over it and a LocalServer serving it from a thread."""

    base: Path
    store: Datastore
    api: Api
    server: LocalServer
    socket: Path
    render_root: Path
    baseline: Path
    reboots: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def client(self, timeout: float = TIMEOUT) -> Client:
        return Client.local(self.socket, timeout=timeout)

    def state(self) -> dict[str, bytes | str]:
        return snapshot(self.store.root)

    def reset(self) -> None:
        """Back to the launch state: live defaults, nothing pending, nothing rendered."""
        shutil.rmtree(self.store.root)
        shutil.copytree(self.baseline, self.store.root, symlinks=True)
        shutil.rmtree(self.render_root, ignore_errors=True)
        self.render_root.mkdir()
        self.reboots.clear()

    def alive(self) -> bool:
        try:
            self.client(timeout=5).request("GET", "/tx/list")
        except ApiUnreachable:
            return False
        return True


def bootstrap(base: Path, defaults: dict[str, Any]) -> Datastore:
    """storewolf + the launch commit, as the image's boot does."""
    doc = base / "defaults.json"
    doc.write_text(json.dumps(defaults))
    store = storewolf.run(base / "datastore", doc, "1.0.0")
    store.commit("kiln-launch")
    return store


def variant_defaults() -> dict[str, Any]:
    return merge_defaults((DEFAULTS,))


# What GET /os reports of the boot chain in these tests (tests/test_secureboot_status.py reads real trees).
BOOT_CHAIN = SecureBootStatus(uefi=True, enabled=True, setup_mode=False, boot_files_verified=True,
                              lockdown="integrity", root_verified=True)


@contextlib.contextmanager
def running_api(
    base: Path,
    *,
    defaults: dict[str, Any] | None = None,
    templates: Path = TEMPLATES,
    restart: bool = False,
    serve: bool = True,
) -> Iterator[ApiHost]:
    """An ApiHost under `base`; the server is shut down (in-flight requests finished) on exit."""
    base.mkdir(parents=True, exist_ok=True)
    store = bootstrap(base, variant_defaults() if defaults is None else defaults)
    baseline = base / "baseline"
    shutil.copytree(store.root, baseline, symlinks=True)
    (base / "os-release").write_text(OS_RELEASE)
    render_root = base / "root"
    render_root.mkdir()
    reboots: list[str] = []
    api = Api(
        store,
        templates=Templates(templates, compiled=None),
        render_root=render_root,
        os_release_path=base / "os-release",
        reboot=lambda: reboots.append("reboot"),
        restart=restart,
        secure_boot=lambda: BOOT_CHAIN,
    )
    sock = base / "api.sock"
    server = LocalServer(api, sock)
    host = ApiHost(base, store, api, server, sock, render_root, baseline, reboots)
    if serve:
        host.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        host.thread.start()
    try:
        yield host
    finally:
        if host.thread is not None:
            server.shutdown()
        server.server_close()
        if host.thread is not None:
            host.thread.join(TIMEOUT)
            assert not host.thread.is_alive(), "the API server did not stop"


def send(sock: Path, method: str, target: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request with a body of our choosing (Client always sends valid JSON): status and JSON answer."""
    conn = http.client.HTTPConnection("localhost", timeout=TIMEOUT)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(str(sock))
    conn.sock = s
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(raw) if raw else None


def raw_exchange(sock: Path, data: bytes, *, half_close: bool = True) -> bytes:
    """Send raw bytes, optionally close our sending side, and read until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(str(sock))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        if half_close:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1."), response[:200]
    return int(response.split(b" ", 2)[1])


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiHost]:
    with running_api(tmp_path_factory.mktemp("api")) as host:
        yield host


@pytest.fixture
def host(running: ApiHost) -> Iterator[ApiHost]:
    running.reset()
    yield running
    assert running.alive(), "the server died during the test"


@pytest.fixture
def c(host: ApiHost) -> Client:
    return host.client()


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(OPENAPI.read_text())
    return loaded


# --- checks against the OpenAPI document ------------------------------------------------------


def _deref(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node and len(node) == 1:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def check_schema(doc: dict[str, Any], method: str, target: str, status: int, body: Any) -> None:
    """`body` is what the document promises for `status` on this operation (or an Error if unrouted)."""
    path = urllib.parse.urlsplit(target).path
    op = doc["paths"].get(path, {}).get(method.lower())
    if op is None:
        assert status in (404, 405), (method, target, status)
        schema: dict[str, Any] = {"$ref": "#/components/schemas/Error"}
    else:
        assert str(status) in op["responses"], f"{method} {path}: status {status} is not documented"
        resp = _deref(doc, op["responses"][str(status)])
        if "content" not in resp:
            assert body is None, (method, target, body)
            return
        schema = resp["content"]["application/json"]["schema"]
    validator(doc, schema).validate(body)


@dataclass
class Caller:
    """Client calls that check the answer against the document and, when refused, the store."""

    host: ApiHost
    doc: dict[str, Any]

    def ok(self, method: str, target: str, body: Any = None) -> Any:
        value = self.host.client().request(method, target, body)
        op = self.doc["paths"][urllib.parse.urlsplit(target).path][method.lower()]
        status = next(int(s) for s in op["responses"] if s.startswith("2"))
        check_schema(self.doc, method, target, status, value)
        return value

    def refused(self, method: str, target: str, body: Any = None, *, status: int, path: str | None = None,
                detail: str | None = None) -> dict[str, Any]:
        before = self.host.state()
        with pytest.raises(ApiRefused) as e:
            self.host.client().request(method, target, body)
        assert e.value.status == status, e.value.body
        check_schema(self.doc, method, target, status, e.value.body)
        assert self.host.state() == before, f"{method} {target} was refused but changed the datastore"
        got: dict[str, Any] = e.value.body
        if path is not None:
            assert got["path"] == path, got
        if detail is not None:
            assert detail in got["detail"], got
        return got


@pytest.fixture
def call(host: ApiHost, doc: dict[str, Any]) -> Caller:
    return Caller(host, doc)


# --- the OpenAPI document -----------------------------------------------------------------------


def test_openapi_document_is_valid_and_kept_in_docs(doc: dict[str, Any]) -> None:
    validate_openapi(doc)
    assert doc["openapi"].startswith("3.1")
    assert OPENAPI_DOCS.read_bytes() == OPENAPI.read_bytes(), "docs/api.openapi.json differs from the served one"


def test_openapi_document_and_routes_agree(doc: dict[str, Any]) -> None:
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m in methods}
    assert documented == set(ROUTES)
    for (method, path), _ in ROUTES.items():
        op = doc["paths"][path][method.lower()]
        assert "500" in op["responses"] and "400" in op["responses"], (method, path)
        if method != "GET":
            assert "403" in op["responses"], f"{method} {path}: readers are refused, document 403"


@pytest.mark.parametrize("tree", VALID_SETTINGS, ids=range(len(VALID_SETTINGS)))
def test_openapi_settings_schema_accepts_what_the_model_accepts(doc: dict[str, Any], tree: dict[str, Any]) -> None:
    """The document is written by hand: every tree the model accepts must fit it too."""
    validator(doc, {"$ref": "#/components/schemas/Settings"}).validate(tree)


def test_openapi_json_is_served(call: Caller, doc: dict[str, Any]) -> None:
    assert call.ok("GET", "/openapi.json") == doc


# --- GET /settings --------------------------------------------------------------------------------


def test_get_settings_is_the_variant_defaults(call: Caller) -> None:
    assert call.ok("GET", "/settings") == variant_defaults()["settings"]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ("motd", {"motd": "Welcome to Kiln!"}),
        ("settings.motd,settings.kernel.lockdown", {"motd": "Welcome to Kiln!", "kernel": {"lockdown": "none"}}),
        ('kernel.sysctl."net.ipv4.ip_forward"', {"kernel": {"sysctl": {"net.ipv4.ip_forward": "1"}}}),
        ('settings.kernel.sysctl."net.ipv4.ip_forward", motd',
         {"kernel": {"sysctl": {"net.ipv4.ip_forward": "1"}}, "motd": "Welcome to Kiln!"}),
        ('kernel.sysctl."a,b",motd', {"motd": "Welcome to Kiln!"}),  # a quoted comma does not split
        ("ntp", {"ntp": {"time-servers": ["0.debian.pool.ntp.org", "1.debian.pool.ntp.org"]}}),
        ("network.hostname,updates.seed", {}),  # not set: left out
        ("\tmotd ", {"motd": "Welcome to Kiln!"}),  # spaces and tabs around a key are dropped
    ],
)
def test_get_settings_by_keys(call: Caller, keys: str, expected: dict[str, Any]) -> None:
    assert call.ok("GET", "/settings?keys=" + urllib.parse.quote(keys)) == expected


def test_get_settings_keys_settings_alone_is_everything(call: Caller) -> None:
    assert call.ok("GET", "/settings?keys=settings") == call.ok("GET", "/settings")


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("settings.ker", {"kernel"}),
        ("kernel.sysctl", {"kernel"}),
        ("settings.", {"host-containers", "kernel", "motd", "ntp", "updates"}),
        ("settings.nothing", set()),
        ("settingsmotd", set()),  # only a whole leading `settings` segment is dropped
        ("settings", {"host-containers", "kernel", "motd", "ntp", "updates"}),
    ],
)
def test_get_settings_by_prefix(call: Caller, prefix: str, expected: set[str]) -> None:
    got = call.ok("GET", "/settings?prefix=" + urllib.parse.quote(prefix))
    assert set(got) == expected
    if prefix == "kernel.sysctl":
        assert got == {"kernel": {"sysctl": {"net.ipv4.conf.all.rp_filter": "1", "net.ipv4.ip_forward": "1"}}}


def test_keys_split_on_commas_outside_quotes_only(call: Caller) -> None:
    # Split anywhere inside the quotes, these would be malformed keys (400).
    got = call.ok("GET", "/settings?keys=" + urllib.parse.quote('kernel.sysctl."a\\"b,c",kernel.sysctl."d,e",motd'))
    assert got == {"motd": "Welcome to Kiln!"}


def test_keys_win_over_prefix(call: Caller) -> None:
    assert call.ok("GET", "/settings?keys=motd&prefix=kernel") == {"motd": "Welcome to Kiln!"}


@pytest.mark.parametrize("keys", ['motd."open', "a..b", 'kernel."x"y', ".", "", " ", "motd,,ntp", "motd,", "motd. "])
def test_malformed_keys_are_400(call: Caller, keys: str) -> None:
    for target in ("/settings", "/metadata/affected-services", "/metadata/templates"):
        call.refused("GET", f"{target}?keys={urllib.parse.quote(keys)}", status=400, path="keys")
    call.refused("POST", f"/tx/apply?keys={urllib.parse.quote(keys)}", status=400, path="keys")


# --- PATCH, transactions, commit ---------------------------------------------------------------------


def test_patch_is_pending_until_commit(call: Caller, host: ApiHost) -> None:
    live = call.ok("GET", "/settings")
    assert call.ok("PATCH", "/settings", {"motd": "hi", "network": {"hostname": "node-1"}}) is None
    assert call.ok("GET", "/settings") == live, "a pending change leaked into the live settings"
    assert call.ok("GET", "/tx") == {"motd": "hi", "network": {"hostname": "node-1"}}
    assert call.ok("GET", "/tx/list") == ["default"]
    # Later patches merge into the same transaction; a value replaces, a table merges.
    call.ok("PATCH", "/settings", {"settings": {"motd": "hello", "ntp": {"time-servers": ["a.example"]}}})
    assert call.ok("GET", "/tx") == {"motd": "hello", "network": {"hostname": "node-1"},
                                     "ntp": {"time-servers": ["a.example"]}}
    assert call.ok("POST", "/tx/commit") == ["settings.motd", "settings.network.hostname",
                                             "settings.ntp.time-servers"]
    now = call.ok("GET", "/settings")
    assert now["motd"] == "hello" and now["network"] == {"hostname": "node-1"} and now["kernel"] == live["kernel"]
    assert call.ok("GET", "/tx") == {} and call.ok("GET", "/tx/list") == []
    assert not any(host.render_root.rglob("*")), "a commit alone rendered files"


def test_transactions_are_isolated(call: Caller) -> None:
    call.ok("PATCH", "/settings?tx=alpha", {"motd": "from alpha"})
    call.ok("PATCH", "/settings?tx=beta", {"network": {"hostname": "beta-host"}})
    assert call.ok("GET", "/tx?tx=alpha") == {"motd": "from alpha"}
    assert call.ok("GET", "/tx?tx=beta") == {"network": {"hostname": "beta-host"}}
    assert call.ok("GET", "/tx") == {}  # the default transaction saw neither
    assert call.ok("GET", "/tx/list") == ["alpha", "beta"]
    assert call.ok("POST", "/tx/commit?tx=alpha") == ["settings.motd"]
    assert call.ok("GET", "/tx?tx=beta") == {"network": {"hostname": "beta-host"}}
    assert "network" not in call.ok("GET", "/settings")
    call.ok("DELETE", "/tx?tx=beta")
    assert call.ok("GET", "/tx/list") == []
    assert call.ok("GET", "/settings?keys=motd,network") == {"motd": "from alpha"}


def test_commit_of_equal_values_changes_nothing(call: Caller) -> None:
    call.ok("PATCH", "/settings", {"motd": "Welcome to Kiln!"})
    assert call.ok("POST", "/tx/commit") == []
    assert call.ok("GET", "/tx/list") == []


def test_commit_with_nothing_pending_is_409(call: Caller) -> None:
    call.refused("POST", "/tx/commit", status=409, path="tx", detail="nothing pending")
    call.refused("POST", "/tx/commit?tx=never-used", status=409, path="tx")
    call.refused("POST", "/tx/commit_and_apply?tx=never-used", status=409, path="tx")


def test_delete_tx(call: Caller) -> None:
    call.ok("PATCH", "/settings?tx=t1", {"motd": "x"})
    assert call.ok("DELETE", "/tx?tx=t1") is None
    assert call.ok("GET", "/tx?tx=t1") == {}
    call.refused("DELETE", "/tx?tx=t1", status=404, path="tx")
    call.refused("DELETE", "/tx", status=404, path="tx", detail="'default' has nothing pending")


@pytest.mark.parametrize("tx", ["a b", "../x", "x/y", "é", "a" * 65, ".hidden", "tx.json"])
def test_invalid_transaction_names_are_400_everywhere(call: Caller, tx: str) -> None:
    q = "?tx=" + urllib.parse.quote(tx)
    call.refused("PATCH", "/settings" + q, {"motd": "x"}, status=400, path="tx")
    call.refused("PATCH", "/settings/keypair" + q, {"request_payload": ["motd=x"]}, status=400, path="tx")
    call.refused("GET", "/tx" + q, status=400, path="tx")
    call.refused("DELETE", "/tx" + q, status=400, path="tx")
    call.refused("POST", "/tx/commit" + q, status=400, path="tx")
    call.refused("POST", "/tx/commit_and_apply" + q, status=400, path="tx")


@pytest.mark.parametrize(
    ("body", "path", "detail"),
    [
        ({"network": {"hostname": 5}}, "settings.network.hostname", "expected str, got int"),
        ({"network": {"hostname": "-bad-"}}, "settings.network.hostname", "hostname"),
        ({"motd": "x", "nonsense": 1}, "settings.nonsense", "unknown setting"),
        ({"updates": {"seed": 4096}}, "settings.updates.seed", "<= 2047"),
        ({"ntp": {"time-servers": ["ok", 7]}}, "settings.ntp.time-servers[1]", "expected str"),
        ({"kernel": {"sysctl": {"Bad Key": "1"}}}, 'settings.kernel.sysctl."Bad Key"', "invalid name"),
        ({"host-containers": {"admin": {"enabled": "yes"}}}, "settings.host-containers.admin.enabled", "bool"),
        ({"settings": {"motd": 1}}, "settings.motd", "expected str"),
        ([1, 2], "settings", "expected a table"),
        ("motd", "settings", "expected a table"),
        (None, "settings", "expected a table"),
        ({"settings": 5}, "settings", "expected a table"),
    ],
)
def test_invalid_patches_are_400_with_the_key(call: Caller, body: Any, path: str, detail: str) -> None:
    call.refused("PATCH", "/settings", body, status=400, path=path, detail=detail)
    assert call.ok("GET", "/tx/list") == []


def test_a_refused_patch_leaves_the_pending_transaction_as_it_was(call: Caller) -> None:
    call.ok("PATCH", "/settings", {"motd": "kept"})
    call.refused("PATCH", "/settings", {"motd": "lost", "network": {"hostname": 1}}, status=400)
    assert call.ok("GET", "/tx") == {"motd": "kept"}


# --- PATCH /settings/keypair -------------------------------------------------------------------


def test_keypair_values_take_the_type_the_model_wants(call: Caller) -> None:
    pairs = [
        "updates.seed=42",
        "network.hostname=42",
        "settings.motd=hello = world",
        'ntp.time-servers=["a.example", "b.example"]',
        "updates.ignore-waves=true",
        'kernel.sysctl."net.ipv4.tcp_syncookies"=1',
        "updates.version-lock=1.2.3",
        "host-containers.admin.enabled=false",
    ]
    assert call.ok("PATCH", "/settings/keypair", {"request_payload": pairs}) is None
    pending = call.ok("GET", "/tx")
    assert pending == {
        "updates": {"seed": 42, "ignore-waves": True, "version-lock": "1.2.3"},
        "network": {"hostname": "42"},
        "motd": "hello = world",
        "ntp": {"time-servers": ["a.example", "b.example"]},
        "kernel": {"sysctl": {"net.ipv4.tcp_syncookies": "1"}},
        "host-containers": {"admin": {"enabled": False}},
    }
    assert isinstance(pending["updates"]["seed"], int) and isinstance(pending["network"]["hostname"], str)


@pytest.mark.parametrize(
    ("body", "path", "detail"),
    [
        ({"request_payload": ["motd"]}, "request_payload", "is not KEY=VALUE"),
        ({"request_payload": ["settings=x"]}, "request_payload", "names no setting"),
        ({"request_payload": ['motd."x=1']}, "request_payload", "unterminated quote"),
        ({"request_payload": ["=1"]}, "request_payload", "empty segment"),
        ({"request_payload": "motd=x"}, "request_payload", "expected"),
        ({"request_payload": [1]}, "request_payload", "expected"),
        ({"pairs": ["motd=x"]}, "request_payload", "expected"),
        ([], "request_payload", "expected"),
        ({"request_payload": ["updates.seed=5000"]}, "settings.updates.seed", "<= 2047"),
        ({"request_payload": ["network.hostname=not a host"]}, "settings.network.hostname", "hostname"),
        ({"request_payload": ["motd=ok", "nothing.here=1"]}, "settings.nothing", "unknown setting"),
    ],
)
def test_bad_keypairs_are_400(call: Caller, body: Any, path: str, detail: str) -> None:
    call.refused("PATCH", "/settings/keypair", body, status=400, path=path, detail=detail)


# --- apply ---------------------------------------------------------------------------------------------


def test_commit_and_apply_renders_under_render_root(call: Caller, host: ApiHost) -> None:
    call.ok("PATCH", "/settings/keypair", {"request_payload": ["motd=Hello from the API", "network.hostname=node-7"]})
    result = call.ok("POST", "/tx/commit_and_apply")
    assert result["changed"] == ["settings.motd", "settings.network.hostname"]
    report = result["apply"]
    assert report["services"] == ["hostname", "motd"]
    assert sorted(report["written"]) == ["/etc/hostname", "/etc/hosts", "/etc/motd"]
    assert report["errors"] == [] and report["restarted"] == []  # restart=False
    root = host.render_root
    assert (root / "etc/motd").read_text() == "Hello from the API\n"
    assert (root / "etc/hostname").read_text() == "node-7\n"
    assert "127.0.1.1 node-7" in (root / "etc/hosts").read_text()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "etc/hostname", "etc/hosts", "etc/motd"]
    assert call.ok("GET", "/tx/list") == []


def test_apply_everything_and_by_keys(call: Caller, host: ApiHost) -> None:
    everything = call.ok("POST", "/tx/apply")
    assert everything["services"] == [
        "api-remote", "api-remote-crl", "containers", "host-containers", "hostname", "lockdown", "motd", "ntp",
        "sysctl", "updater"]
    assert "/etc/hostname" not in everything["written"]  # requires network.hostname, which is unset
    assert (host.render_root / "etc/systemd/timesyncd.conf.d/80-kiln.conf").read_text().endswith(
        "NTP=0.debian.pool.ntp.org 1.debian.pool.ntp.org\n")
    sysctl = (host.render_root / "etc/sysctl.d/80-kiln.conf").read_text()
    assert "net.ipv4.ip_forward = 1\n" in sysctl
    assert (host.render_root / "etc/kiln/api-remote.json").read_text().strip() == ""  # no TLS material
    assert (host.render_root / "etc/kiln/updater").read_text().strip() == ""  # strategy manual: no daemon
    call.ok("PATCH", "/settings?tx=u", {"updates": {"strategy": "fleet-lock"}})
    call.ok("POST", "/tx/commit_and_apply?tx=u")
    assert (host.render_root / "etc/kiln/updater").read_text().strip() == "fleet-lock"
    (host.render_root / "etc/motd").unlink()
    one = call.ok("POST", "/tx/apply?keys=" + urllib.parse.quote('settings.kernel.sysctl."net.ipv4.ip_forward",motd'))
    assert one["services"] == ["motd", "sysctl"]
    assert sorted(one["written"]) == ["/etc/motd", "/etc/sysctl.d/80-kiln.conf"]
    call.refused("POST", "/tx/apply?keys=", status=400, path="keys")  # no key: refused, not "apply nothing"


def test_apply_while_another_runs_is_423(call: Caller, host: ApiHost) -> None:
    call.ok("PATCH", "/settings", {"motd": "waiting"})
    host.api.apply_wait = 0.3  # an apply waits this long for the running one, then 423
    try:
        with host.api.apply_lock:
            call.refused("POST", "/tx/apply", status=423, detail="another apply is running")
            # commit_and_apply is refused before it commits: the transaction is still pending.
            call.refused("POST", "/tx/commit_and_apply", status=423)
    finally:
        host.api.apply_wait = 10.0
    assert call.ok("GET", "/tx") == {"motd": "waiting"}
    assert not any(host.render_root.rglob("*"))
    assert call.ok("POST", "/tx/commit_and_apply")["changed"] == ["settings.motd"]


def test_apply_waits_for_the_running_one(call: Caller, host: ApiHost) -> None:
    call.ok("PATCH", "/settings", {"motd": "queued"})
    host.api.apply_lock.acquire()
    threading.Timer(0.5, host.api.apply_lock.release).start()
    assert call.ok("POST", "/tx/commit_and_apply")["changed"] == ["settings.motd"]


RESTART_DEFAULTS: dict[str, Any] = {
    "settings": {"motd": "one", "network": {"hostname": "h1"}},
    "metadata": {"settings": {"motd": {"affected-services": ["motd"]},
                              "network": {"hostname": {"affected-services": ["broken"]}}}},
    "services": {
        "motd": {"configuration-files": ["motd"], "restart-commands": ["RESTART_MOTD"]},
        "broken": {"configuration-files": ["hostname"], "restart-commands": ["/bin/false"]},
    },
    "configuration-files": {"motd": {"path": "/etc/motd", "template-path": "motd"},
                            "hostname": {"path": "/etc/hostname", "template-path": "hostname"}},
}


def test_apply_runs_restart_commands_and_reports_failures(tmp_path: Path) -> None:
    marker = tmp_path / "restarted"
    defaults = json.loads(json.dumps(RESTART_DEFAULTS).replace("RESTART_MOTD", f"/usr/bin/touch {marker}"))
    with running_api(tmp_path / "host", defaults=defaults, restart=True) as host:
        c = host.client()
        c.request("PATCH", "/settings", {"motd": "two"})
        result = c.request("POST", "/tx/commit_and_apply")
        assert result["apply"] == {"services": ["motd"], "written": ["/etc/motd"], "removed": [],
                                   "restarted": ["motd"], "errors": [], "failed_restarts": []}
        assert marker.exists()
        report = c.request("POST", "/tx/apply")
        assert report["restarted"] == ["motd"] and len(report["failed_restarts"]) == 1 and not report["errors"]
        assert "service 'broken'" in report["failed_restarts"][0]
        assert (host.render_root / "etc/hostname").read_text() == "h1\n"


# --- read-only views ------------------------------------------------------------------------------------


def test_os(call: Caller) -> None:
    chain = {"uefi": True, "enabled": True, "setup_mode": False, "boot_files_verified": True,
             "lockdown": "integrity", "root_verified": True}
    assert call.ok("GET", "/os") == {"name": "Kiln", "id": "kiln", "version_id": "1.0.0",
                                     "variant_id": "container-host", "pretty_name": "Kiln 1.0.0",
                                     "secure_boot": chain}
    assert call.ok("GET", "/os?prefix=v") == {"version_id": "1.0.0", "variant_id": "container-host"}
    assert call.ok("GET", "/os?prefix=secure") == {"secure_boot": chain}
    assert call.ok("GET", "/os?prefix=nothing") == {}


def test_metadata(call: Caller) -> None:
    affected = call.ok("GET", "/metadata/affected-services")
    assert affected["settings.motd"] == ["motd"] and affected["settings.kernel.sysctl"] == ["sysctl"]
    by_key = call.ok("GET", "/metadata/affected-services?keys=" + urllib.parse.quote(
        'motd,settings.network,kernel.sysctl."net.ipv4.ip_forward",updates'))
    assert by_key == {"settings.motd": ["motd"], "settings.network": ["hostname"],
                      'settings.kernel.sysctl."net.ipv4.ip_forward"': ["sysctl"], "settings.updates": ["updater"]}
    generators = call.ok("GET", "/metadata/setting-generators")
    assert set(generators) == {"settings.network.hostname", "settings.updates.seed"}
    assert "/dev/urandom" in generators["settings.updates.seed"]
    templates = call.ok("GET", "/metadata/templates")
    assert templates == {n: n for n in ("api-remote", "api-remote-crl", "hostname", "hosts", "lockdown", "motd",
                                        "sysctl", "timesyncd", "updater")}
    assert call.ok("GET", "/metadata/templates?keys=network.hostname,ntp") == {
        "settings.network.hostname": ["hostname", "hosts"], "settings.ntp": ["timesyncd"]}


def test_services_and_configuration_files(call: Caller) -> None:
    services = call.ok("GET", "/services")
    assert set(services) == {
        "api-remote", "api-remote-crl", "containers", "host-containers", "hostname", "lockdown", "motd", "ntp",
        "sysctl", "updater"}
    assert services["hostname"]["configuration-files"] == ["hostname", "hosts"]
    assert call.ok("GET", "/services?names=motd") == {"motd": {"configuration-files": ["motd"],
                                                                "restart-commands": []}}
    assert set(call.ok("GET", "/services?names=motd,ntp")) == {"motd", "ntp"}
    for names in ("motd,ntp,", "", ",motd"):  # an empty name is refused, never skipped
        call.refused("GET", f"/services?names={names}", status=400, path="names")
    call.refused("GET", "/services?names=motd,nope,gone", status=404, path="names", detail="nope, gone")
    files = call.ok("GET", "/configuration-files")
    assert files["motd"] == {"path": "/etc/motd", "template-path": "motd"}
    assert call.ok("GET", "/configuration-files?names=hosts") == {
        "hosts": {"path": "/etc/hosts", "template-path": "hosts"}}
    call.refused("GET", "/configuration-files?names=nope", status=404, path="names")


# --- actions -------------------------------------------------------------------------------------------


def test_reboot_is_accepted_then_runs(call: Caller, host: ApiHost) -> None:
    status, body = send(host.socket, "POST", "/actions/reboot")
    assert (status, body) == (202, {"rebooting": True})
    wait_for(lambda: host.reboots == ["reboot"])  # the callback runs once the answer is sent
    assert call.ok("POST", "/actions/reboot") == {"rebooting": True}
    wait_for(lambda: host.reboots == ["reboot", "reboot"])


def test_reboot_without_a_callback_is_409(call: Caller, host: ApiHost, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host.api, "reboot", None)
    call.refused("POST", "/actions/reboot", status=409, detail="not available")


# --- routing, methods, roles ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [("PUT", "/settings"), ("POST", "/settings"), ("GET", "/tx/commit"),
     ("PATCH", "/tx"), ("GET", "/actions/reboot"), ("POST", "/openapi.json"), ("HEAD", "/settings"),
     ("OPTIONS", "/os"), ("PROPFIND", "/services")],
)
def test_wrong_method_is_405(call: Caller, host: ApiHost, method: str, target: str) -> None:
    if method == "HEAD":  # no body to read on HEAD: check the status line
        assert send(host.socket, method, target)[0] == 405
        return
    call.refused(method, target, status=405, detail=f"{method} is not allowed")


def test_405_names_the_allowed_methods(host: ApiHost) -> None:
    """RFC 9110 15.5.6: a 405 carries Allow."""
    answer = raw_exchange(host.socket, b"PUT /settings HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    head = answer.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 405") and "\r\nAllow: DELETE, GET, PATCH\r\n" in head, head
    answer = raw_exchange(host.socket, b"GET /actions/reboot HTTP/1.1\r\n\r\n")
    assert b"\r\nAllow: POST\r\n" in answer


@pytest.mark.parametrize("name", ["evil%0A", "evil%0D", "%0Aevil", "a%00b"])
def test_a_tx_name_with_a_line_break_is_refused(call: Caller, host: ApiHost, name: str) -> None:
    call.refused("PATCH", f"/settings?tx={name}", {"motd": "x"}, status=400)
    assert not any("\n" in p.name or "\r" in p.name for p in host.base.rglob("*"))


@pytest.mark.parametrize(("method", "target"), [("DELETE", "/tx?tx="), ("GET", "/tx?tx="), ("PATCH", "/settings?tx="),
                                                 ("POST", "/tx/commit?tx="), ("POST", "/tx/commit_and_apply?tx=")])
def test_an_empty_tx_name_is_refused_not_the_default(call: Caller, host: ApiHost, method: str, target: str) -> None:
    call.ok("PATCH", "/settings", {"motd": "pending in default"})
    call.refused(method, target, {"motd": "x"} if method == "PATCH" else None, status=400, path="tx",
                 detail="names no transaction")
    assert call.ok("GET", "/tx") == {"motd": "pending in default"}  # still there


@pytest.mark.parametrize("target", ["/", "/nope", "/settings/", "/Settings", "/settings/motd", "/tx/list/x",
                                    "/actions/shutdown", "/../settings", "/settings%2F"])
def test_unknown_path_is_404(call: Caller, target: str) -> None:
    call.refused("GET", target, status=404)
    call.refused("POST", target, {"x": 1}, status=404)


def test_reader_may_only_read_and_sees_no_secrets(host: ApiHost) -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n"
    host.client().request("PATCH", "/settings", {"api": {"remote": {"key": pem, "port": 50001}}})
    host.client().request("POST", "/tx/commit")
    as_reader = host.api.handle(Request.from_target("GET", "/settings?prefix=api", role="reader"))
    assert as_reader.body == {"api": {"remote": {"key": "<redacted>", "port": 50001}}}
    assert host.api.handle(Request.from_target("GET", "/settings?prefix=api")).body["api"]["remote"]["key"] == pem
    before = host.state()
    for method, target in [("PATCH", "/settings"), ("POST", "/tx/commit"), ("DELETE", "/tx"),
                           ("POST", "/actions/reboot"), ("POST", "/tx/apply")]:
        resp = host.api.handle(Request.from_target(method, target, b'{"motd": "x"}', role="reader"))
        assert resp.status == 403 and "may only read" in resp.body["detail"], (method, target)
    assert host.state() == before and host.reboots == []


# Every secret-bearing setting, with a value found nowhere else in the host's answers.
SECRETS: dict[str, Any] = {
    "containers.web.env.TOKEN": "secret-env-value",
    "containers.web.command": ["/bin/app", "--password=secret-in-command"],
    "host-containers.admin.user-data": base64.b64encode(b"secret-host-user-data").decode(),
    "bootstrap-containers.prep.user-data": base64.b64encode(b"secret-bootstrap-user-data").decode(),
    "container-registry.credentials.\"reg.example\".password": "secret-registry-password",
    "api.remote.key": "-----BEGIN PRIVATE KEY-----\nsecret-node-key\n-----END PRIVATE KEY-----\n",
}
SHOWN = {  # what an auditor sees beside them
    "containers.web.image": "reg.example/web:1", "containers.web.memory-limit": "64Mi",
    "host-containers.admin.source": "reg.example/admin:1", "bootstrap-containers.prep.mode": "once",
    "container-registry.credentials.\"reg.example\".username": "robot", "network.hostname": "audited",
}


def _tree(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        set_path(tree, parse_key(key), value)
    return tree


def _secret_strings() -> list[str]:
    """A piece of each secret value, as it would appear in JSON."""
    return ["secret-env-value", "secret-in-command", SECRETS["host-containers.admin.user-data"],
            SECRETS["bootstrap-containers.prep.user-data"], "secret-registry-password", "secret-node-key"]


def test_reader_view_is_an_allow_list() -> None:
    from kiln.host.api.redact import REDACTED, reader_view

    tree = _tree(SECRETS | SHOWN) | {"some-future-setting": {"token": "x"}}
    seen = reader_view(tree)
    for key in SECRETS:
        assert get_path(seen, parse_key(key)[:3]) is not None  # the entries' names stay visible
    assert seen["containers"]["web"] == {"image": "reg.example/web:1", "memory-limit": "64Mi", "env": REDACTED,
                                         "command": REDACTED}
    assert seen["host-containers"]["admin"]["user-data"] == REDACTED
    assert seen["container-registry"]["credentials"] == {"reg.example": {"username": "robot", "password": REDACTED}}
    assert seen["api"]["remote"]["key"] == REDACTED and seen["network"] == {"hostname": "audited"}
    assert seen["some-future-setting"] == REDACTED  # not on the list: not shown
    assert tree["containers"]["web"]["env"] == {"TOKEN": "secret-env-value"}  # the tree itself untouched


def test_no_read_path_shows_a_reader_a_secret(host: ApiHost) -> None:
    """Every GET route, with and without the query parameters that select settings, as a
    reader: no secret value anywhere in any answer; pending transactions and journals are
    admins' only."""
    admin = host.client()
    admin.request("PATCH", "/settings", _tree(SECRETS | SHOWN))
    admin.request("POST", "/tx/commit")
    admin.request("PATCH", "/settings?tx=draft", {"containers": {"web": {"env": {"TOKEN": "secret-env-value"}}}})
    secrets = _secret_strings()
    targets = {path for method, path in routes.ROUTES if method == "GET"}
    queries = ["", "?keys=settings", "?prefix=containers", "?prefix=host-containers", "?tx=draft", "?name=web",
               "?names=web", *(f"?keys={urllib.parse.quote(k)}" for k in SECRETS)]
    seen_any = False
    for target in sorted(targets):
        for query in queries:
            resp = host.api.handle(Request.from_target("GET", target + query, role="reader"))
            text = json.dumps(resp.body) if resp.encoded is None else resp.encoded.decode()
            leaked = [s for s in secrets if s in text]
            assert not leaked, (target + query, leaked)
            seen_any |= resp.status == 200 and "<redacted>" in text
    assert seen_any
    for target in ["/tx?tx=draft", "/tx/list", "/containers/logs?name=web"]:
        resp = host.api.handle(Request.from_target("GET", target, role="reader"))
        assert resp.status == 403 and "admins only" in resp.body["detail"], target
    # an admin still sees everything
    assert host.api.handle(Request.from_target("GET", "/tx?tx=draft")).body["containers"]["web"]["env"] == {
        "TOKEN": "secret-env-value"}
    full = json.dumps(host.api.handle(Request.from_target("GET", "/settings")).body)
    assert all(s in full for s in secrets)


# --- bodies and framing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"{bad", "not JSON"),
        (b'{"motd": "x"', "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b'{"motd": "\\ud800"}', "not valid Unicode"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
        (b'{"request_payload": ["motd=' + b"[" * 50_000 + b'"]}', None),
    ],
)
def test_bad_bodies_are_400(host: ApiHost, doc: dict[str, Any], body: bytes, detail: str | None) -> None:
    before = host.state()
    for target in ("/settings", "/settings/keypair"):
        status, answer = send(host.socket, "PATCH", target, body, {"Content-Type": "application/json"})
        assert status == 400, answer
        check_schema(doc, "PATCH", target, status, answer)
        if detail is not None and target == "/settings":
            assert detail in answer["detail"] and answer["path"] == "body", answer
    assert host.state() == before


def test_body_over_the_limit_is_413(host: ApiHost) -> None:
    before = host.state()
    head = f"PATCH /settings HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    answer = raw_exchange(host.socket, head)
    assert status_of(answer) == 413 and b'"error": "Request Entity Too Large"' in answer
    # The whole body sent anyway: still refused (the client may see the reset before the answer).
    big = {"motd": "x" * (MAX_BODY + 10)}
    with pytest.raises((ApiRefused, ApiUnreachable)) as e:
        host.client().request("PATCH", "/settings", big)
    if isinstance(e.value, ApiRefused):
        assert e.value.status == 413
    assert host.state() == before


def test_chunked_bodies_are_411_and_bad_lengths_400(host: ApiHost) -> None:
    before = host.state()
    chunked = b'PATCH /settings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nd\r\n{"motd":"x"}\r\n0\r\n\r\n'
    assert status_of(raw_exchange(host.socket, chunked)) == 411
    for length in (b"abc", b"-5", b"1e3"):
        answer = raw_exchange(host.socket, b"PATCH /settings HTTP/1.1\r\nContent-Length: " + length + b"\r\n\r\n{}")
        assert status_of(answer) == 400, answer
    assert host.state() == before


def test_a_truncated_body_is_never_acted_on(host: ApiHost) -> None:
    """The client promises 100 bytes, sends a complete JSON document of 16 and hangs up."""
    before = host.state()
    answer = raw_exchange(host.socket, b'PATCH /settings HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"motd":"trunc"}')
    assert status_of(answer) == 400 and b"body ended after 16 of 100 bytes" in answer
    assert host.state() == before


def test_keep_alive_serves_several_requests_on_one_connection(host: ApiHost) -> None:
    conn = http.client.HTTPConnection("localhost", timeout=TIMEOUT)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(str(host.socket))
    try:
        for target in ("/settings?keys=motd", "/os?prefix=id", "/tx/list"):
            conn.request("GET", target)
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Type") == "application/json"
            resp.read()
    finally:
        conn.close()


# --- concurrency ----------------------------------------------------------------------------------------------


def test_concurrent_writers_and_readers_see_consistent_states(host: ApiHost) -> None:
    n = 16
    errors: list[BaseException] = []
    seen: list[Any] = []

    def writer(i: int) -> None:
        try:
            c = host.client()
            c.request("PATCH", f"/settings?tx=w{i}", {"kernel": {"sysctl": {f"kiln.test{i}": str(i)}}})
            c.request("POST", f"/tx/commit?tx=w{i}")
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(10):
                seen.append(host.client().request("GET", "/settings?keys=kernel.sysctl"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    threads += [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert not errors, errors
    final = host.client().request("GET", "/settings?keys=kernel.sysctl")["kernel"]["sysctl"]
    assert {f"kiln.test{i}": str(i) for i in range(n)}.items() <= final.items()
    assert final["net.ipv4.ip_forward"] == "1"
    for view in seen:  # every read is a state some sequence of commits produced: defaults always there
        assert view["kernel"]["sysctl"]["net.ipv4.ip_forward"] == "1"
    assert host.client().request("GET", "/tx/list") == []


def test_api_handle_never_raises_on_a_bug(host: ApiHost, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    def broken(api: Api, req: Request) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setitem(ROUTES, ("GET", "/os"), broken)
    with pytest.raises(ApiRefused) as e:
        host.client().request("GET", "/os")
    assert e.value.status == 500 and e.value.body["detail"] == "internal error: RuntimeError"
    assert "internal error on GET /os" in caplog.text
    assert host.alive()

