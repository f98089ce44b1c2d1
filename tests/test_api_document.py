"""The API document says exactly what the server accepts: schema by schema, grammar by grammar.

test_api_contract.py sends generated requests; these check the pieces directly, faster and
more thoroughly than requests can: the Settings schema is the model's (msgspec's schema, in
ECMA-262 patterns), SettingsView is what redact.reader_view makes of it, and each parameter
pattern accepts a string exactly when the code that parses it does. Then one regression
test per disagreement found between the two (issue 13, item 5).
"""

from __future__ import annotations

import itertools
import json
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.host.api import grammar
from kiln.host.api.redact import REDACTED
from kiln.host.containers.control import CURSOR
from kiln.host.datastore import _TX
from kiln.host.settings.model import Settings, validate
from kiln.host.update.manifest import ManifestError, Version
from tests.openapi_schema import Untranslatable, ecma_pattern, normal, python_pattern, reader_view, settings_schema
from tests.test_api import OPENAPI, ApiHost, Caller, check_schema, raw_exchange, running_api, send, status_of

DOC: dict[str, Any] = json.loads(OPENAPI.read_text())
COMPONENTS = DOC["components"]


def doc_pattern(*where: str | int) -> re.Pattern[str]:
    node: Any = DOC
    for part in where:
        node = node[part]
    while "$ref" in node:
        node = COMPONENTS["schemas"][node["$ref"].split("/")[-1]]
    return python_pattern(node["pattern"])


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiHost]:
    with running_api(tmp_path_factory.mktemp("document")) as h:
        h.api.containers_state = h.base / "containers"
        yield h


@pytest.fixture
def host(running: ApiHost) -> ApiHost:
    running.reset()
    return running


@pytest.fixture
def call(host: ApiHost) -> Caller:
    return Caller(host, DOC)


# --- schemas -----------------------------------------------------------------------------------------


def _diff(want: Any, got: Any) -> str:
    import difflib

    a = json.dumps(want, indent=1, sort_keys=True, ensure_ascii=False).splitlines()
    b = json.dumps(got, indent=1, sort_keys=True, ensure_ascii=False).splitlines()
    return "\n".join(list(difflib.unified_diff(a, b, "model", "document", lineterm=""))[:60])


def test_the_settings_schema_is_the_models() -> None:
    """Every constraint of the model, and no other, in the document's `Settings` (the write schema)."""
    want = settings_schema()
    got = normal({"$ref": "#/components/schemas/Settings"}, DOC)
    assert got == want, "docs/api.openapi.json's Settings differs from the model:\n" + _diff(want, got)


def test_the_read_schema_is_the_readers_allow_list_of_it() -> None:
    """`SettingsView` (GET /settings) = Settings where redact.py may put `<redacted>`, and nowhere else."""
    want = reader_view(settings_schema())
    got = normal({"$ref": "#/components/schemas/SettingsView"}, DOC)
    assert got == want, "SettingsView differs from what redact.READER_VISIBLE makes of Settings:\n" + _diff(want, got)


def test_redacted_reads_but_never_writes(call: Caller, host: ApiHost) -> None:
    """A reader's answer fits SettingsView; the same value sent back is refused, as Settings says."""
    from kiln.host.api.routes import Request

    call.ok("PATCH", "/settings", {"containers": {"web": {"image": "busybox", "env": {"A": "1"}}}})
    call.ok("POST", "/tx/commit")
    seen = host.api.handle(Request.from_target("GET", "/settings", role="reader")).body
    assert seen["containers"]["web"]["env"] == REDACTED
    check_schema(DOC, "GET", "/settings", 200, seen)
    from tests.openapi_schema import validator

    assert not validator(DOC, {"$ref": "#/components/schemas/Settings"}).is_valid(seen)
    call.refused("PATCH", "/settings", {"containers": seen["containers"]}, status=400,
                 path="settings.containers.web.env")


def test_model_patterns_have_one_meaning_in_both_dialects() -> None:
    """A pattern Python and ECMA-262 would read differently cannot be put in the document."""
    for bad in (r"^a$", r"^\d+\Z", r"\w", r"\bword"):
        with pytest.raises(Untranslatable):
            ecma_pattern(bad)
    assert ecma_pattern(r"^(?=[a-z]{1,3}\Z)a\Z") == "^(?=[a-z]{1,3}$)a$"
    assert python_pattern("^[0-9]+$").search("12\n") is None  # ECMA's $ is the end, not before a newline
    assert python_pattern(r"^\d$").search("\u0661") is None  # ECMA's \d is 0-9
    assert python_pattern(r"^\s$").search("\ufeff") and not python_pattern(r"^\s$").search("\x1c")


# --- parameter grammars: the document's pattern matches exactly what the parser takes ----------------------

GRAMMAR_ALPHABET = ' \t."a,=\\'


def _accepts(parse: Callable[[str], object]) -> Callable[[str], bool]:
    def ok(text: str) -> bool:
        try:
            parse(text)
        except (grammar.BadRequest, ManifestError):
            return False
        return True

    return ok


def _keypair_syntax(text: str) -> object:
    try:
        return grammar.keypair(text)
    except grammar.BadRequest as e:
        if "names no setting" in e.detail:  # `settings=x`: the syntax is fine, the key names nothing
            return None
        raise


def _grammars() -> list[tuple[str, re.Pattern[str], Callable[[str], bool], str]]:
    version = next(p for p in DOC["paths"]["/actions/retry-update"]["post"]["parameters"] if p["name"] == "version")
    return [
        ("keys", doc_pattern("components", "schemas", "KeyList"), _accepts(grammar.key_list), GRAMMAR_ALPHABET),
        ("keypair", doc_pattern("components", "schemas", "KeypairRequest", "properties", "request_payload", "items"),
         _accepts(_keypair_syntax), GRAMMAR_ALPHABET),
        ("names", doc_pattern("components", "parameters", "names", "schema"), _accepts(grammar.name_list), "a,b "),
        ("tx", doc_pattern("components", "parameters", "tx", "schema"), lambda t: bool(_TX.fullmatch(t)),
         "a-_.\n9"),
        ("cursor", doc_pattern("components", "schemas", "ContainerLogs", "properties", "cursor", "anyOf", 0),
         lambda t: bool(CURSOR.fullmatch(t)), "s=0a;\n"),
        ("version", python_pattern(version["schema"]["pattern"]), _accepts(Version.parse), "v1.0\n\u0661"),
        ("Connection", doc_pattern("components", "parameters", "connectionUpgrade", "schema"),
         lambda t: grammar.upgrade_protocol(t, "kiln-exec") == "kiln-exec", "upgrade, \tUPx"),
        ("Upgrade", doc_pattern("components", "parameters", "upgradeKilnExec", "schema"),
         lambda t: grammar.upgrade_protocol("upgrade", t) == "kiln-exec", "kiln-exec KILN\t"),
    ]


GRAMMARS = _grammars()


@pytest.mark.parametrize(("name", "pattern", "parses", "alphabet"), GRAMMARS, ids=[g[0] for g in GRAMMARS])
def test_each_grammar_pattern_matches_what_its_parser_takes(
        name: str, pattern: re.Pattern[str], parses: Callable[[str], bool], alphabet: str) -> None:
    """Every string of up to 5 of the grammar's own characters (where they disagree, if anywhere)."""
    for size in range(6):
        for chars in itertools.product(alphabet, repeat=size):
            text = "".join(chars)
            assert bool(pattern.search(text)) == parses(text), f"{name}: {text!r} pattern={not parses(text)}"


@settings(max_examples=400, deadline=None, database=None)
@given(data=st.data())
def test_grammar_patterns_and_parsers_agree_on_longer_strings(data: st.DataObject) -> None:
    name, pattern, parses, alphabet = data.draw(st.sampled_from(GRAMMARS))
    text = data.draw(st.one_of(st.from_regex(pattern), st.text(alphabet + "\u00a0\n\x85\"", max_size=30),
                               st.text(max_size=20)))
    assert bool(pattern.search(text)) == parses(text), f"{name}: {text!r}"


def test_the_query_patterns_are_the_servers() -> None:
    """Where the server holds the regular expression itself, the document carries the same one."""
    version = next(p for p in DOC["paths"]["/actions/retry-update"]["post"]["parameters"] if p["name"] == "version")
    assert COMPONENTS["parameters"]["tx"]["schema"]["pattern"] == _TX.pattern
    logs = DOC["paths"]["/containers/logs"]["get"]["parameters"]
    assert next(p for p in logs if p["name"] == "cursor")["schema"]["pattern"] == CURSOR.pattern
    assert python_pattern(version["schema"]["pattern"]).search("1.2.3")


# --- one test per disagreement that was found ----------------------------------------------------------


@pytest.mark.parametrize("number", ["42.0", "4.2e1", "420e-1", "42.000", "-0.0"])
def test_an_integral_number_is_an_integer(call: Caller, host: ApiHost, number: str) -> None:
    """JSON Schema's `integer` takes 42.0; the server refused it ("expected int, got float")."""
    status, answer = send(host.socket, "PATCH", "/settings", f'{{"updates": {{"seed": {number}}}}}'.encode())
    assert status == 204, answer
    seed = call.ok("GET", "/tx")["updates"]["seed"]
    assert seed == int(float(number)) and type(seed) is int


def test_a_fraction_or_a_huge_number_is_not_an_integer(host: ApiHost) -> None:
    for number in ("42.5", "1e400", "-1e400", "9" * 5000):
        status, answer = send(host.socket, "PATCH", "/settings", f'{{"updates": {{"seed": {number}}}}}'.encode())
        assert status == 400 and answer["path"] == "settings.updates.seed", (number[:20], answer)
    status, _ = send(host.socket, "PATCH", "/settings", b'{"containers": {"w": {"cpus": 2.0, "stop-timeout": 30.0}}}')
    assert status == 204  # a number field still takes 2.0, an integer one 30.0


def test_keypair_values_read_json_numbers_the_same_way(call: Caller) -> None:
    call.ok("PATCH", "/settings/keypair", {"request_payload": ["updates.seed=42.0", "network.hostname=42.0"]})
    assert call.ok("GET", "/tx") == {"updates": {"seed": 42}, "network": {"hostname": "42.0"}}


def test_exec_takes_integral_rows_and_cols(host: ApiHost) -> None:
    body = b'{"target": "nothere", "command": ["sh"], "rows": 24.0, "cols": 8e1}'
    status, answer = send(host.socket, "POST", "/exec", body, {"Connection": "Upgrade", "Upgrade": "kiln-exec"})
    assert status == 404 and answer["path"] == "target", answer  # past the body's checks


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"motd": NaN}', "not JSON"),
        (b'{"motd": "x", "x": Infinity}', "not JSON"),
        (b'{"updates": {"seed": -Infinity}}', "not JSON"),
        (b'{"motd": "a", "motd": "b"}', "appears twice"),
        ('{"motd": "é"}'.encode("utf-16"), "not UTF-8"),
        ('{"motd": "é"}'.encode("latin-1"), "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not JSON"),  # a byte order mark
        (b"[" * 513 + b"]" * 513, "nested too deeply"),
    ],
)
def test_bodies_are_rfc8259_json(host: ApiHost, body: bytes, detail: str) -> None:
    """Python's parser took NaN, Infinity, duplicate names and UTF-16: none of them is JSON."""
    before = host.state()
    for target in ("/settings", "/settings/keypair"):
        status, answer = send(host.socket, "PATCH", target, body)
        assert status == 400 and detail in answer["detail"] and answer["path"] == "body", answer
    assert host.state() == before


def test_nesting_up_to_the_documented_depth_is_json(host: ApiHost) -> None:
    deep = b'{"request_payload": [], "x": ' + b"[" * 511 + b"]" * 511 + b"}"  # 512 levels with the object
    assert send(host.socket, "PATCH", "/settings/keypair", deep)[0] == 204


@pytest.mark.parametrize("keys", ["", ",", "motd,", ",motd", "motd,,ntp", " ", "motd. "])
def test_an_empty_key_is_refused_never_skipped(call: Caller, keys: str) -> None:
    for method, target in (("GET", "/settings"), ("DELETE", "/settings"), ("POST", "/tx/apply"),
                           ("GET", "/metadata/templates")):
        call.refused(method, f"{target}?keys={urllib.parse.quote(keys)}", status=400, path="keys")


def test_spaces_around_keys_are_dropped_but_only_spaces_and_tabs(call: Caller) -> None:
    assert call.ok("GET", "/settings?keys=" + urllib.parse.quote(" motd\t,\tntp ")).keys() == {"motd", "ntp"}
    assert call.ok("GET", "/settings?keys=" + urllib.parse.quote("\u00a0motd")) == {}  # a segment "\u00a0motd"
    call.ok("PATCH", "/settings/keypair", {"request_payload": [" motd =hi"]})
    assert call.ok("GET", "/tx") == {"motd": "hi"}


def test_the_delete_example_succeeds(call: Caller) -> None:
    """The document's DELETE /settings examples remove what is there (they used to be 400s)."""
    examples = COMPONENTS["parameters"]["removeKeys"]["examples"]
    call.ok("PATCH", "/settings", COMPONENTS["schemas"]["Settings"]["examples"][0])
    call.ok("POST", "/tx/commit")
    for example in examples.values():
        got = call.ok("DELETE", "/settings?keys=" + urllib.parse.quote(example["value"]))
        assert got["changed"], example
    call.refused("DELETE", "/settings?keys=containers.web", status=404, path="keys")


def test_a_key_named_twice_is_removed_once(call: Caller) -> None:
    call.ok("PATCH", "/settings", {"containers": {"web": {"image": "busybox"}}})
    call.ok("POST", "/tx/commit")
    got = call.ok("DELETE", "/settings?keys=containers.web,settings.containers.web")
    assert got["changed"] == ["settings.containers.web.image"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Upgrade": "kiln-exec"}, 426),  # no Connection: upgrade (RFC 9110 7.8): the Upgrade header is ignored
        ({"Connection": "keep-alive", "Upgrade": "kiln-exec"}, 426),
        ({"Connection": "Upgrade"}, 426),
        ({"Connection": "Upgrade", "Upgrade": "kiln-exec/2"}, 426),
        ({"Connection": "keep-alive, Upgrade", "Upgrade": "KILN-EXEC"}, 404),
        ({"Connection": "UPGRADE", "Upgrade": " kiln-exec\t"}, 404),
    ],
)
def test_exec_needs_both_upgrade_headers(host: ApiHost, headers: dict[str, str], status: int) -> None:
    got, answer = send(host.socket, "POST", "/exec", b'{"target": "nothere", "command": ["sh"]}', headers)
    assert got == status, answer
    check_schema(DOC, "POST", "/exec", got, answer)


def test_exec_arguments_with_nul_are_refused_as_documented(host: ApiHost) -> None:
    body = json.dumps({"target": "admin", "command": ["a\u0000b"]}).encode()
    status, answer = send(host.socket, "POST", "/exec", body, {"Connection": "Upgrade", "Upgrade": "kiln-exec"})
    assert status == 400 and answer["path"] == "command", answer


@pytest.mark.parametrize("cursor", ["", "x", "s=XYZ", "s=0a;", "s=0a\n", "s=" + "0" * 65])
def test_a_cursor_outside_its_pattern_is_400(call: Caller, cursor: str) -> None:
    call.refused("GET", "/containers/logs?name=admin&cursor=" + urllib.parse.quote(cursor), status=400, path="cursor")


@pytest.mark.parametrize("lines", ["\u00b2", "\u0661\u0662", "0", "10001", "+5", "5 "])
def test_lines_is_an_ascii_integer(call: Caller, lines: str) -> None:
    """`lines=²` was a 500 ("²".isdigit() holds, int("²") raises); `lines=١٢` was 12."""
    call.refused("GET", "/containers/logs?name=admin&lines=" + urllib.parse.quote(lines), status=400, path="lines")


def test_names_refuse_an_empty_name(call: Caller) -> None:
    for target in ("/services", "/configuration-files"):
        for names in ("", ",", "motd,", ",motd", "motd,,hosts"):
            call.refused("GET", f"{target}?names={urllib.parse.quote(names)}", status=400, path="names")


@pytest.mark.parametrize("version", ["1" * 5000 + ".0.0", "1234567890.0.0", "\u0661.2.3", "1.2.3\n"])
def test_versions_are_bounded_ascii(call: Caller, version: str) -> None:
    """A 5000-digit `?version=` was a 500 (int() refuses over 4300 digits), Arabic-Indic digits a lock
    the update agent could not parse."""
    call.refused("POST", "/actions/retry-update?version=" + urllib.parse.quote(version), status=400, path="version")
    call.refused("PATCH", "/settings", {"updates": {"version-lock": version}}, status=400,
                 path="settings.updates.version-lock")
    with pytest.raises(ManifestError):
        Version.parse(version)
    assert Version.parse("v123456789.0.1") == Version(123456789, 0, 1)


def test_container_paths_match_in_linear_time() -> None:
    """`^/((?!..)[^/]+/?)*` tried every split of a long segment: 40 characters and a comma took hours."""
    start = time.monotonic()
    for path in ("/" + "a" * 1000 + ",", "/" + "a/" * 500 + ",", "/local/" + "a" * 1000 + "\n"):
        with pytest.raises(Exception, match="path"):
            validate({"containers": {"w": {"mounts": [{"source": "/local/x", "destination": path}]}}})
        with pytest.raises(Exception, match="path"):
            validate({"containers": {"w": {"mounts": [{"source": path}]}}})
    assert time.monotonic() - start < 1.0


def test_every_model_pattern_is_fast_on_long_near_misses() -> None:
    """No pattern of the model backtracks without bound (the server validates with Python's re)."""
    patterns = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            patterns.update([node["pattern"]] if "pattern" in node else [])
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(msgspec.json.schema(Settings))
    for pattern in patterns:
        start = time.monotonic()
        for unit in ("a", "a.", "a/", "a-", "a:", "0", "a ", "/a", "a=", "a1.", "aa/b."):
            for tail in (",", "\n", "!", "\x00", "/..", ".."):
                re.search(pattern, unit * 300 + tail)
        assert time.monotonic() - start < 0.5, f"{pattern} is slow on near misses"


def test_readers_and_pending_limits_are_documented(host: ApiHost) -> None:
    """403 for a reader on GET /tx, /tx/list and /containers/logs, 409 for too many pending
    transactions and for retry-update without updates: the server answered them undocumented."""
    from kiln.host.api.routes import Request

    for target in ("/tx", "/tx/list", "/containers/logs?name=admin"):
        resp = host.api.handle(Request.from_target("GET", target, role="reader"))
        assert resp.status == 403
        check_schema(DOC, "GET", target, 403, resp.body)
    status, answer = send(host.socket, "POST", "/actions/retry-update?version=1.2.3")
    assert status == 409
    check_schema(DOC, "POST", "/actions/retry-update", 409, answer)
    from kiln.host.datastore import MAX_TRANSACTIONS

    for i in range(MAX_TRANSACTIONS):
        assert send(host.socket, "PATCH", f"/settings?tx=t{i}", b'{"motd": "x"}')[0] == 204
    status, answer = send(host.socket, "PATCH", "/settings?tx=one-more", b'{"motd": "x"}')
    assert status == 409
    check_schema(DOC, "PATCH", "/settings", 409, answer)


def test_a_raw_upgrade_without_connection_is_not_switched(host: ApiHost) -> None:
    body = b'{"target": "admin", "command": ["sh"]}'
    answer = raw_exchange(host.socket, b"POST /exec HTTP/1.1\r\nUpgrade: kiln-exec\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert status_of(answer) == 426
