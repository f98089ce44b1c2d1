"""The API against its document: requests generated from docs/api.openapi.json, for every operation.

For each operation (path and method) Hypothesis draws requests from the document alone: its
parameters' schemas (query and header), its request body's schema, their examples and
defaults (tests/openapi_strategies.py). Each is sent as an admin over the real Unix socket
and as a reader through `Api.handle` (the remote listener's role), after a few documented
patches have made some state. Then:

- a request the document calls valid gets the success status, or a 4xx whose reason the
  document gives and the state confirms (what `expected()` computes, from the document's
  words and the state read back through the API: 404 for a container that is not declared,
  409 for updates on a host without them, 400 for a patch whose result the Settings schema
  refuses, 403 for a reader);
- a request that breaks the document once (a parameter outside its pattern, a body one
  mutation away from valid, a missing required part, a body that is not JSON) gets a
  documented 4xx, and the datastore is left as it was;
- every answer's status is documented for the operation, and its body fits the schema
  documented for that status.

The settings schemas themselves are compared with the model (write) and with the reader's
allow-list (read), and each parameter grammar with the code that parses it.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from kiln.host.api import grammar
from kiln.host.api.routes import Api, Request
from kiln.host.datastore import REMOVABLE
from tests.openapi_schema import resolve, validator
from tests.openapi_strategies import Schemas
from tests.test_api import OPENAPI, TIMEOUT, ApiHost, running_api

pytestmark = pytest.mark.timeout(300)
DOC: dict[str, Any] = json.loads(OPENAPI.read_text())
SCHEMAS = Schemas(DOC)
SETTINGS = {"$ref": "#/components/schemas/Settings"}
EXAMPLES = settings(max_examples=8, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])
ADMIN_ONLY = {"getTransaction", "listTransactions", "containerLogs"}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    spec: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.spec["operationId"])

    @property
    def params(self) -> list[dict[str, Any]]:
        return [dict(resolve(DOC, p["$ref"])) if "$ref" in p else p for p in self.spec.get("parameters", [])]

    @property
    def body(self) -> dict[str, Any] | None:
        rb = self.spec.get("requestBody")
        return None if rb is None else dict(rb["content"]["application/json"]["schema"])

    @property
    def success(self) -> int:
        return min(int(s) for s in self.spec["responses"] if s.startswith(("1", "2")))


OPERATIONS = [Operation(m.upper(), p, op) for p, item in DOC["paths"].items() for m, op in item.items()]


@dataclass
class Call:
    """One generated request, with the values it was made from (for the oracle)."""

    method: str
    path: str
    role: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None

    @property
    def target(self) -> str:
        q = urllib.parse.urlencode(self.query, quote_via=urllib.parse.quote)
        return self.path + ("?" + q if q else "")

    def value(self) -> Any:
        return None if self.body is None else json.loads(self.body)


# --- drawing requests from the document ------------------------------------------------------------


def _text(value: Any) -> str:
    """A parameter value as it travels in a query or header (the document's types are simple)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _coerce(schema: dict[str, Any], text: str) -> Any:
    """A query string as the schema's type reads it (an integer is a decimal numeral)."""
    if SCHEMAS.deref(schema).get("type") == "integer" and re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    return text


_FIELD = re.compile(r"[\t\x20-\x7e]*")  # what HTTP lets a header field's value hold (RFC 9110 5.5)


def _param_values(p: dict[str, Any]) -> st.SearchStrategy[str]:
    values = SCHEMAS.values(p["schema"]).map(_text)
    documented = [p["example"]] if "example" in p else [e["value"] for e in p.get("examples", {}).values()]
    if documented:
        values = st.one_of(values, st.sampled_from([_text(v) for v in documented]))
    if p["in"] == "header":
        values = values.filter(_FIELD.fullmatch)
    return values


def _param_violations(p: dict[str, Any]) -> st.SearchStrategy[str] | None:
    """Strings outside the parameter's schema, or None when every string fits it."""
    s = SCHEMAS.deref(p["schema"])
    if not ({"pattern", "enum", "const", "minLength", "maxLength"} & set(s) or s.get("type") == "integer"):
        return None
    candidates = SCHEMAS.text_violations(p["schema"], lambda t: _coerce(p["schema"], t))
    return candidates.filter(_FIELD.fullmatch) if p["in"] == "header" else candidates


NOT_JSON = [b"{", b"NaN", b'{"motd": Infinity}', b'{"motd": "a", "motd": "b"}', b"\xff\xfe{\x00}\x00",
            b"[" * 513 + b"]" * 513, b'"\\ud800"']


@st.composite
def calls(draw: st.DrawFn, op: Operation, role: str, broken: bool) -> Call:
    """A request for `op`: valid by the document, or (broken) invalid in exactly one part."""
    call = Call(op.method, op.path, role)
    parts: list[str] = []
    if broken:
        parts = [p["name"] for p in op.params if p.get("required") or _param_violations(p) is not None]
        if op.body is not None:
            parts.append("body")
        assume(parts)
    wrong = draw(st.sampled_from(parts)) if parts else None
    for p in op.params:
        where = call.query if p["in"] == "query" else call.headers
        if p["name"] == wrong:
            bad = _param_violations(p)
            if bad is None or (p.get("required") and draw(st.booleans())):
                continue  # left out (it is required)
            where[p["name"]] = draw(bad)
        elif p.get("required") or draw(st.booleans()):
            where[p["name"]] = draw(_param_values(p))
    if op.body is not None:
        if wrong == "body":
            how = draw(st.sampled_from(["schema", "schema", "not json", "none"]))
            if how == "schema":
                call.body = json.dumps(draw(SCHEMAS.violations(op.body))).encode()
            elif how == "not json":
                call.body = draw(st.sampled_from(NOT_JSON))
        else:
            call.body = json.dumps(draw(SCHEMAS.values(op.body))).encode()
    return call


# --- sending them ---------------------------------------------------------------------------------


def over_socket(sock: Path, call: Call) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("localhost", timeout=TIMEOUT)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(str(sock))
    conn.sock = s
    headers = dict(call.headers)
    if call.body is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(call.method, call.target, body=call.body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def in_process(api: Api, call: Call) -> tuple[int, bytes]:
    upgrade = grammar.upgrade_protocol(call.headers.get("Connection"), call.headers.get("Upgrade"))
    resp = api.handle(Request.from_target(call.method, call.target, call.body or b"", call.role, upgrade))
    if resp.encoded is not None:
        return resp.status, resp.encoded
    return resp.status, b"" if resp.body is None else json.dumps(resp.body).encode()


def perform(host: ApiHost, call: Call) -> tuple[int, Any]:
    status, raw = over_socket(host.socket, call) if call.role == "admin" else in_process(host.api, call)
    return status, json.loads(raw) if raw else None


def admin_get(host: ApiHost, target: str) -> Any:
    resp = host.api.handle(Request.from_target("GET", target))
    assert resp.status == 200, resp.body
    return json.loads(json.dumps(resp.body))


def check_answer(op: Operation, status: int, body: Any) -> None:
    """The status is documented for the operation and the body fits what it documents for it."""
    assert str(status) in op.spec["responses"], f"{op.method} {op.path}: {status} is not documented ({body})"
    response = op.spec["responses"][str(status)]
    if "$ref" in response:
        response = resolve(DOC, response["$ref"])
    content = response.get("content")
    if content is None:
        assert body is None, (op.id, status, body)
        return
    errors = [e.message for e in validator(DOC, content["application/json"]["schema"]).iter_errors(body)]
    assert not errors, f"{op.method} {op.path} {status}: {errors[:3]} in {json.dumps(body)[:500]}"


# --- what the document says the answer must be --------------------------------------------------------


def doc_json(text: str) -> Any:
    """JSON as the document's introduction defines it (NaN is not JSON; 42.0 is the integer 42)."""

    def constant(name: str) -> Any:
        raise ValueError(name)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            raise ValueError("duplicate member")
        return dict(items)

    def number(t: str) -> int | float:
        f = float(t)
        return int(f) if f.is_integer() else f

    return json.loads(text, parse_constant=constant, object_pairs_hook=pairs, parse_float=number)


_ITEM = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\[\s\S])*")+')
_SEGMENT = re.compile(r'"((?:[^"\\]|\\[\s\S])+)"|([^."]+)')


def doc_key(text: str) -> tuple[str, ...]:
    """A key the KeyList pattern accepts, split into segments as its description says."""
    parts = tuple(re.sub(r"\\([\s\S])", r"\1", q) if q else p for q, p in _SEGMENT.findall(text.strip(" \t")))
    return parts[1:] if parts[:1] == ("settings",) else parts


def doc_keys(raw: str) -> list[tuple[str, ...]]:
    return [doc_key(item) for item in _ITEM.findall(raw)]


def doc_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """"Tables merge key by key, any other value replaces" (PATCH /settings)."""
    out = dict(base)
    for k, v in patch.items():
        out[k] = doc_merge(out[k] if isinstance(out.get(k), dict) else {}, v) if isinstance(v, dict) else v
    return out


def put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for seg in path[:-1]:
        if not isinstance(tree.get(seg), dict):
            tree[seg] = {}
        tree = tree[seg]
    tree[path[-1]] = value


def keypair_patch(pairs: list[str]) -> dict[str, Any] | None:
    """The patch the pairs make, by the operation's description (None: a pair names no setting)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        path = doc_key(key)
        if not path:
            return None

        def fits(value: Any, path: tuple[str, ...] = path) -> bool:
            probe: dict[str, Any] = {}
            put(probe, path, value)
            return SCHEMAS.valid(SETTINGS, probe)

        value: Any = raw
        try:
            typed = doc_json(raw)
        except (ValueError, RecursionError):
            pass
        else:
            if fits(typed) or not fits(raw):
                value = typed
        put(tree, path, value)
    return tree


def patch_outcome(host: ApiHost, patch: Any, tx: str) -> set[int]:
    """204 when the patch and live + pending + patch fit Settings; 400 when either does not,
    or when it brings TLS material that must load together (random PEM text never does)."""
    if not SCHEMAS.valid(SETTINGS, patch):
        return {400}
    result = doc_merge(admin_get(host, "/settings"), doc_merge(admin_get(host, f"/tx?tx={tx}"), patch))
    if not SCHEMAS.valid(SETTINGS, result):
        return {400}
    remote = patch.get("api", {}).get("remote")
    if remote is not None:
        merged = result["api"]["remote"]
        if "crl" in remote or all(k in merged for k in ("ca", "certificate", "key")):
            return {400}
    return {204}


def declared(host: ApiHost, name: str, kinds: tuple[str, ...]) -> bool:
    live = admin_get(host, "/settings")
    return any(name in live.get(group, {}) for group in kinds)


KIND_GROUP = {"host": "host-containers", "bootstrap": "bootstrap-containers", "workload": "containers"}


def expected(host: ApiHost, op: Operation, call: Call) -> set[int]:
    """The statuses the document allows for a valid `call`, in the host's present state."""
    if call.role != "admin" and (op.method != "GET" or op.id in ADMIN_ONLY):
        return {403}
    q = call.query
    tx = q.get("tx", "default")
    if op.id == "patchSettings":
        body = call.value()
        return patch_outcome(host, body["settings"] if set(body) == {"settings"} else body, tx)
    if op.id == "patchSettingsKeypair":
        patch = keypair_patch(call.value()["request_payload"])
        return {400} if patch is None else patch_outcome(host, patch, tx)
    if op.id == "removeSettings":
        keys = doc_keys(q["keys"])
        if not all(k[:-1] in REMOVABLE for k in keys):
            return {400}
        live = admin_get(host, "/settings")
        return {200} if all(_has(live, k) for k in keys) else {404}
    if op.id in ("deleteTransaction", "commitTransaction", "commitAndApply"):
        pending = tx in admin_get(host, "/tx/list")
        return {op.success} if pending else {404 if op.method == "DELETE" else 409}
    if op.id in ("getServices", "getConfigurationFiles") and "names" in q:
        return {200} if set(q["names"].split(",")) <= set(admin_get(host, op.path)) else {404}
    if op.id == "containerLogs":
        kinds = (KIND_GROUP[q["kind"]],) if "kind" in q else tuple(KIND_GROUP.values())
        if not declared(host, q["name"], kinds):
            return {404}
        return {200, 400} if "cursor" in q else {200}  # an unknown cursor: 400, as documented
    if op.id == "exec":
        body = call.value()
        kinds = (KIND_GROUP[body["kind"]],) if "kind" in body else ("host-containers", "containers")
        return {409} if declared(host, body["target"], kinds) else {404}  # nothing runs on the test host
    if "updates" in op.spec.get("tags", []):
        return {409}  # this host has no update agent: documented for each update operation
    return {op.success}


def _has(tree: dict[str, Any], path: tuple[str, ...]) -> bool:
    for seg in path:
        if not isinstance(tree, dict) or seg not in tree:
            return False
        tree = tree[seg]
    return True


# --- the run -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiHost]:
    with running_api(tmp_path_factory.mktemp("contract")) as h:
        h.api.containers_state = h.base / "containers"  # nothing runs here: /exec answers 409, never 101
        yield h
        assert h.alive()


BY_ID = {op.id: op for op in OPERATIONS}


def run_valid(host: ApiHost, op: Operation, call: Call) -> int:
    want = expected(host, op, call)
    before = host.state()
    status, body = perform(host, call)
    if currently_in_test_context():
        event(f"{call.role} valid {status}")
    check_answer(op, status, body)
    assert status in want, f"{call.role} {call.method} {call.target} {call.body!r:.400}: {status} {body}, " \
                           f"the document says {sorted(want)}"
    if status >= 400:
        assert host.state() == before, f"refused {call.method} {call.target} changed the datastore"
    return status


def run_broken(host: ApiHost, op: Operation, call: Call) -> None:
    before = host.state()
    status, body = perform(host, call)
    if currently_in_test_context():
        event(f"{call.role} broken {status}")
    check_answer(op, status, body)
    assert 400 <= status < 500, f"{call.role} {call.method} {call.target} {call.body!r:.400}: {status} {body}"
    assert host.state() == before, f"refused {call.method} {call.target} changed the datastore"


@pytest.mark.parametrize("op", OPERATIONS, ids=[op.id for op in OPERATIONS])
@EXAMPLES
@given(data=st.data())
def test_every_operation_answers_as_documented(host: ApiHost, op: Operation, data: st.DataObject) -> None:
    host.reset()
    for _ in range(data.draw(st.integers(0, 1), label="a patch first")):  # some state: pending, then live
        run_valid(host, BY_ID["patchSettings"], data.draw(calls(BY_ID["patchSettings"], "admin", False)))
    if data.draw(st.booleans(), label="commit them"):
        run_valid(host, BY_ID["commitTransaction"], Call("POST", "/tx/commit", "admin"))
    run_valid(host, op, data.draw(calls(op, "admin", False), label="admin"))
    run_valid(host, op, data.draw(calls(op, "reader", False), label="reader"))
    breakable = any(p.get("required") or p["in"] == "header" or "pattern" in SCHEMAS.deref(p["schema"])
                    or "enum" in SCHEMAS.deref(p["schema"]) or SCHEMAS.deref(p["schema"]).get("type") == "integer"
                    for p in op.params) or op.body is not None
    if breakable:
        role = data.draw(st.sampled_from(["admin", "reader"]), label="role of the broken one")
        run_broken(host, op, data.draw(calls(op, role, True), label="broken"))


def test_every_documented_example_succeeds(host: ApiHost) -> None:
    """Each example body and parameter of the document, on a host that took the Settings example:
    DELETE /settings's examples remove what is there (no example that can only fail)."""
    host.reset()
    for example in DOC["components"]["schemas"]["Settings"]["examples"]:
        assert run_valid(host, BY_ID["patchSettings"], Call("PATCH", "/settings", "admin",
                                                            body=json.dumps(example).encode())) == 204
    assert run_valid(host, BY_ID["commitTransaction"], Call("POST", "/tx/commit", "admin")) == 200
    tried = 0
    for op in OPERATIONS:
        bodies = [None] if op.body is None else _examples(SCHEMAS.deref(op.body))
        for p in op.params:
            values = [p["example"]] if "example" in p else [e["value"] for e in p.get("examples", {}).values()]
            for value in values:
                for body in bodies:
                    call = Call(op.method, op.path, "admin", {p["name"]: _text(value)} if p["in"] == "query" else {},
                                {p["name"]: _text(value)} if p["in"] == "header" else {},
                                None if body is None else json.dumps(body).encode())
                    for other in op.params:  # the other required parameters, by their examples
                        if other is not p and other.get("required") and "example" in other:
                            (call.query if other["in"] == "query" else call.headers)[other["name"]] = other["example"]
                    status = run_valid(host, op, call)
                    assert status < 400 or op.id in ("exec",), (op.id, call.target, status)
                    tried += 1
    removed = admin_get(host, "/settings")
    assert "web" not in removed.get("containers", {}), "DELETE /settings?keys=containers.web removed nothing"
    assert tried >= 5


def _examples(schema: dict[str, Any]) -> list[Any]:
    found = list(schema.get("examples", []))
    for name, sub in schema.get("properties", {}).items():
        found += [{name: v} for v in sub.get("examples", [])]
    for branch in schema.get("oneOf", []):
        found += _examples(SCHEMAS.deref(branch))
    return found
