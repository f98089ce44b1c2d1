"""The settings model (kiln.host.settings.model): what it accepts, and where it says a tree is wrong."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.host.settings.model import InvalidSettings, Settings, to_tree, validate

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ROOT / "variants/settings/defaults.toml"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def rejected(tree: Any) -> InvalidSettings:
    with pytest.raises(InvalidSettings) as e:
        validate(tree)
    assert str(e.value) == f"{e.value.path}: {e.value.detail}"
    return e.value


VALID: list[dict[str, Any]] = [
    {},
    {"motd": ""},
    {"motd": "x" * 4096},
    {"network": {}},
    {"network": {"hostname": "a"}},
    {"network": {"hostname": "kiln-1234abcd.example.com"}},
    {"network": {"hostname": ".".join(["a" * 63] * 3)}},
    {"ntp": {"time-servers": []}},
    {"ntp": {"time-servers": ["0.pool.ntp.org", "10.0.0.1"]}},
    {"kernel": {"lockdown": "integrity", "sysctl": {"net.ipv4.ip_forward": "1", "vm/max_map_count": "262144"}}},
    {"updates": {"metadata-base-url": "https://updates.example.com/meta", "targets-base-url": "http://10.0.0.1:8080/t",
                 "seed": 0, "version-lock": "v1.2.3", "ignore-waves": True}},
    {"updates": {"seed": 2047, "version-lock": "latest"}},
    {"updates": {"strategy": "fleet-lock", "check-interval": "1h", "max-boot-attempts": 3,
                 "fleet-lock": {"url": "http://10.0.2.2:8700", "group": "workers.eu-1"},
                 "maintenance-windows": [{"days": ["sat", "sun"], "start": "02:30", "length-minutes": 120,
                                          "time-zone": "Europe/Berlin"},
                                         {"start": "23:59", "length-minutes": 10080, "time-zone": "+05:30"}]}},
    {"updates": {"strategy": "manual", "check-interval": "45s", "maintenance-windows": []}},
    {"containers": {"w": {"stop-timeout": 300}}},
    {"host-containers": {"admin": {"source": "registry/admin:1", "enabled": False, "superpowered": True,
                                   "user-data": "e30="}}},
    {"bootstrap-containers": {"setup-1": {"mode": "once", "essential": True}}},
    {"containers": {"a": {"memory-limit": "4Mi", "cpus": 0.01}, "b": {"memory-limit": "9999Gi", "cpus": 1024.0},
                    "c": {"memory-limit": "1536Mi", "cpus": 1.5}}},
    {"api": {"remote": {"enabled": True, "port": 1, "ca": PEM, "certificate": PEM, "key": PEM}}},
    {"api": {"remote": {"port": 65535}}},
]


@pytest.mark.parametrize("tree", VALID, ids=range(len(VALID)))
def test_valid_trees_are_accepted_and_round_trip(tree: dict[str, Any]) -> None:
    settings = validate(tree)
    assert isinstance(settings, Settings)
    assert to_tree(settings) == tree


def test_the_real_defaults_validate() -> None:
    doc = tomllib.loads(DEFAULTS.read_text())
    settings = validate(doc["settings"])
    assert to_tree(settings) == doc["settings"]
    assert doc["settings"]["kernel"]["sysctl"]["net.ipv4.ip_forward"] == "1"


@pytest.mark.parametrize(
    ("tree", "path", "detail"),
    [
        # wrong types
        ({"motd": 1}, "settings.motd", "expected str, got int"),
        ({"network": {"hostname": 5}}, "settings.network.hostname", "expected str, got int"),
        ({"network": "host"}, "settings.network", "expected object, got str"),
        ({"updates": {"seed": True}}, "settings.updates.seed", "expected int, got bool"),
        ({"updates": {"seed": "7"}}, "settings.updates.seed", "expected int, got str"),
        ({"updates": {"ignore-waves": "no"}}, "settings.updates.ignore-waves", "expected bool, got str"),
        ({"api": {"remote": {"port": "50000"}}}, "settings.api.remote.port", "expected int, got str"),
        ({"host-containers": {"admin": {"enabled": "yes"}}}, "settings.host-containers.admin.enabled",
         "expected bool, got str"),
        # ranges and lengths
        ({"motd": "x" * 4097}, "settings.motd", "expected str of length <= 4096"),
        ({"updates": {"seed": -1}}, "settings.updates.seed", "expected int >= 0"),
        ({"updates": {"seed": 2048}}, "settings.updates.seed", "expected int <= 2047"),
        ({"api": {"remote": {"port": 0}}}, "settings.api.remote.port", "expected int >= 1"),
        ({"api": {"remote": {"port": 65536}}}, "settings.api.remote.port", "expected int <= 65535"),
        # unknown keys, at every depth
        ({"bogus": 1}, "settings.bogus", "unknown setting"),
        ({"network": {"hostnam": "x"}}, "settings.network.hostnam", "unknown setting"),
        ({"api": {"remote": {"listen": "0.0.0.0"}}}, "settings.api.remote.listen", "unknown setting"),
        ({"host-containers": {"admin": {"bogus": 1}}}, "settings.host-containers.admin.bogus", "unknown setting"),
        # enums
        ({"kernel": {"lockdown": "paranoid"}}, "settings.kernel.lockdown", "invalid enum value 'paranoid'"),
        ({"bootstrap-containers": {"b": {"mode": "twice"}}}, "settings.bootstrap-containers.b.mode",
         "invalid enum value 'twice'"),
        # lists: the index of the bad element
        ({"ntp": {"time-servers": "pool.ntp.org"}}, "settings.ntp.time-servers", "expected array, got str"),
        ({"ntp": {"time-servers": ["a", 3]}}, "settings.ntp.time-servers[1]", "expected str, got int"),
        ({"ntp": {"time-servers": ["a", "b", ""]}}, "settings.ntp.time-servers[2]",
         "expected a host name or an IP address"),
        ({"ntp": {"time-servers": ["a"] * 33}}, "settings.ntp.time-servers", "expected array of length <= 32"),
        # workload limits
        ({"containers": {"w": {"memory-limit": "3Mi"}}}, "settings.containers.w.memory-limit",
         "expected a size in Mi (at least 4Mi) or Gi, e.g. 512Mi"),
        ({"containers": {"w": {"memory-limit": "512M"}}}, "settings.containers.w.memory-limit",
         "expected a size in Mi (at least 4Mi) or Gi, e.g. 512Mi"),
        ({"containers": {"w": {"memory-limit": 512}}}, "settings.containers.w.memory-limit", "expected str, got int"),
        ({"containers": {"w": {"cpus": 0}}}, "settings.containers.w.cpus", "expected float >= 0.01"),
        ({"containers": {"w": {"cpus": 2048}}}, "settings.containers.w.cpus", "expected float <= 1024.0"),
        # the update daemon
        ({"updates": {"strategy": "auto"}}, "settings.updates.strategy", "invalid enum value 'auto'"),
        ({"updates": {"check-interval": "1 hour"}}, "settings.updates.check-interval",
         "expected a whole number followed by s, m, h or d (e.g. 1h)"),
        ({"updates": {"check-interval": "0s"}}, "settings.updates.check-interval",
         "expected a whole number followed by s, m, h or d (e.g. 1h)"),
        ({"updates": {"fleet-lock": {"group": "a b"}}}, "settings.updates.fleet-lock.group",
         "expected a group name (letters, digits, '.' and '-')"),
        ({"updates": {"maintenance-windows": [{"start": "24:00"}]}}, "settings.updates.maintenance-windows[0].start",
         "expected a time of day HH:MM"),
        ({"updates": {"maintenance-windows": [{"days": ["sunday"]}]}},
         "settings.updates.maintenance-windows[0].days[0]", "invalid enum value 'sunday'"),
        ({"updates": {"maintenance-windows": [{"length-minutes": 0}]}},
         "settings.updates.maintenance-windows[0].length-minutes", "expected int >= 1"),
        ({"updates": {"maintenance-windows": [{"time-zone": "../../etc/passwd"}]}},
         "settings.updates.maintenance-windows[0].time-zone",
         "expected UTC, an offset such as +02:00, or a zone name such as Europe/Berlin"),
        ({"updates": {"max-boot-attempts": 0}}, "settings.updates.max-boot-attempts", "expected int >= 1"),
        ({"containers": {"w": {"stop-timeout": 301}}}, "settings.containers.w.stop-timeout", "expected int <= 300"),
        # lists of tables: the index stays on its own segment
        ({"containers": {"web": {"mounts": [{"source": "/local/a", "destination": "/a"}, {"source": "/etc"}]}}},
         "settings.containers.web.mounts[1].source",
         "expected a path under /local (no '.' or '..' parts; no ',', '\"' or '=')"),
        ({"containers": {"web": {"mounts": [{"source": "/local/a", "destination": "/a", "bogus": 1}]}}},
         "settings.containers.web.mounts[0].bogus", "unknown setting"),
    ],
)
def test_errors_name_the_key(tree: dict[str, Any], path: str, detail: str) -> None:
    e = rejected(tree)
    assert (e.path, e.detail) == (path, detail)


@pytest.mark.parametrize(
    "hostname",
    ["bad_host", "-lead", "trail-", "a..b", ".a", "a.", "", "a" * 64, ".".join(["a" * 63] * 4), "hé", "a b"],
)
def test_bad_hostnames(hostname: str) -> None:
    e = rejected({"network": {"hostname": hostname}})
    assert e.path == "settings.network.hostname"
    assert e.detail == "expected a hostname (letters, digits, '-' and '.')"


@pytest.mark.parametrize(
    "url", ["ftp://x", "updates.example.com", "https://", "https://a b", "http:/x", "https://x/" + "a" * 2048]
)
@pytest.mark.parametrize("key", ["metadata-base-url", "targets-base-url"])
def test_bad_urls(key: str, url: str) -> None:
    e = rejected({"updates": {key: url}})
    assert e.path == f"settings.updates.{key}"
    assert e.detail.startswith("expected ")
    if len(url) <= 2048:
        assert e.detail == "expected an http:// or https:// URL"


@pytest.mark.parametrize("lock", ["1.2", "v1", "newest", "1.2.3-rc1", ""])
def test_bad_version_locks(lock: str) -> None:
    e = rejected({"updates": {"version-lock": lock}})
    assert e.path == "settings.updates.version-lock"


def test_bad_pem() -> None:
    e = rejected({"api": {"remote": {"ca": "not a certificate"}}})
    assert (e.path, e.detail) == ("settings.api.remote.ca", "expected a PEM block")


def test_map_values_are_located_by_their_key() -> None:
    e = rejected({"kernel": {"sysctl": {"net.ipv4.ip_forward": 1}}})
    assert (e.path, e.detail) == ('settings.kernel.sysctl."net.ipv4.ip_forward"', "expected str, got int")
    # the bad one among good ones, wherever it sits in the map
    sysctl = {f"k{i}.x": "1" for i in range(10)}
    sysctl["k7.x"] = 7  # type: ignore[assignment]
    e = rejected({"kernel": {"sysctl": sysctl}})
    assert e.path == 'settings.kernel.sysctl."k7.x"'
    e = rejected({"host-containers": {"admin": {"enabled": True}, "control": {"enabled": 1}}})
    assert (e.path, e.detail) == ("settings.host-containers.control.enabled", "expected bool, got int")


@pytest.mark.parametrize(
    ("tree", "path", "what"),
    [
        ({"kernel": {"sysctl": {"ok.key": "1", "Bad Key": "1"}}}, 'settings.kernel.sysctl."Bad Key"', "a sysctl name"),
        ({"kernel": {"sysctl": {".lead": "1"}}}, 'settings.kernel.sysctl.".lead"', "a sysctl name"),
        ({"host-containers": {"admin": {}, "Admin": {}}}, "settings.host-containers.Admin",
         "expected a name of lowercase letters, digits and '-' (at most 63)"),
        ({"bootstrap-containers": {"a" * 64: {}}}, "settings.bootstrap-containers." + "a" * 64, "a name of"),
    ],
)
def test_bad_map_keys_are_named(tree: dict[str, Any], path: str, what: str) -> None:
    e = rejected(tree)
    assert e.path == path
    assert e.detail.startswith("invalid name: expected ")
    assert what in e.detail


def test_a_bad_key_last_in_a_large_tree_is_found_quickly() -> None:
    """The locator validates each map entry on its own: it once deep-copied the whole tree per
    key, and this tree (a full sysctl map beside 50 containers of 250 variables) took 6.6 s
    here. The bound is loose on purpose (50x what it takes now on this 2-core machine)."""
    sysctl = {f"net.ipv4.k{i}": "1" for i in range(511)} | {"bad key!": "1"}
    containers = {f"c{i}": {"image": "busybox", "env": {f"E{j}": "x" * 10 for j in range(250)}} for i in range(50)}
    start = time.monotonic()
    e = rejected({"kernel": {"sysctl": sysctl}, "containers": containers})
    elapsed = time.monotonic() - start
    assert e.path == 'settings.kernel.sysctl."bad key!"' and e.detail.startswith("invalid name")
    assert elapsed < 0.5, f"{elapsed:.2f} s to locate one bad key"


@pytest.mark.parametrize(
    ("tree", "path"),
    [
        ({"network": {"hostname": None}}, "settings.network.hostname"),
        ({"motd": None}, "settings.motd"),
        ({"api": {"remote": None}}, "settings.api.remote"),
        ({"kernel": {"sysctl": {"a.b": None}}}, 'settings.kernel.sysctl."a.b"'),
    ],
)
def test_null_is_not_a_value(tree: dict[str, Any], path: str) -> None:
    # JSON null would be stored as a value and rendered as "None" (/etc/hostname!)
    e = rejected(tree)
    assert e.path == path
    assert "null" in e.detail


@pytest.mark.parametrize("tree", [[], "motd", 1, None])
def test_the_root_must_be_a_table(tree: Any) -> None:
    e = rejected(tree)
    assert e.path == "settings"
    assert e.detail.startswith("expected a table of settings")


@pytest.mark.parametrize(
    ("tree", "path", "detail"),
    [
        # Values are written into configuration files: no line breaks to inject lines with.
        ({"ntp": {"time-servers": ["pool.example\nNTP=evil"]}}, "settings.ntp.time-servers[0]",
         "expected a host name or an IP address"),
        ({"kernel": {"sysctl": {"vm.swappiness": "1\nkernel.kptr_restrict = 0"}}},
         'settings.kernel.sysctl."vm.swappiness"', "expected a value on one line"),
        ({"host-containers": {"admin": {"source": "img\nx"}}}, "settings.host-containers.admin.source",
         "expected an image reference ([registry/]name[:tag][@sha256:digest], lowercase name)"),
        # Maps are bounded: a huge map cannot make validation (or its error search) slow.
        ({"kernel": {"sysctl": {f"k{i}": "1" for i in range(513)}}}, "settings.kernel.sysctl",
         "expected object of length <= 512"),
        ({"bootstrap-containers": {f"c{i}": {} for i in range(65)}}, "settings.bootstrap-containers",
         "expected object of length <= 64"),
    ],
)
def test_values_that_would_inject_lines_or_grow_without_bound(tree: dict[str, Any], path: str, detail: str) -> None:
    e = rejected(tree)
    assert (e.path, e.detail) == (path, detail)


# --- patterns mean what they say: no line break or NUL gets into a name, path or address -----
# (msgspec matches patterns with re.search, where `$` also matches before a final "\n":
# "node-1\n" was a valid hostname and reached /etc/hostname.) Free text keeps its line
# breaks: motd, command arguments, environment values, base64 user data, PEM blocks.
ONE_LINE = {
    ("network", "hostname"): "node-1.example.com",
    ("ntp", "time-servers", 0): "10.0.0.1",
    ("kernel", "sysctl", "<key>"): "vm.swappiness",
    ("kernel", "sysctl", "vm.swappiness"): "10",
    ("updates", "metadata-base-url"): "https://updates.example.com/meta/",
    ("updates", "version-lock"): "1.2.3",
    ("updates", "check-interval"): "1h",
    ("updates", "fleet-lock", "group"): "workers",
    ("updates", "maintenance-windows", 0, "start"): "02:30",
    ("updates", "maintenance-windows", 0, "time-zone"): "Europe/Berlin",
    ("health", "units", 0): "containerd.service",
    ("containers", "<key>"): "web",
    ("containers", "web", "image"): "10.0.2.2:5000/kiln/httpd:1",
    ("containers", "web", "memory-limit"): "64Mi",
    ("containers", "web", "mounts", 0, "source"): "/local/www",
    ("containers", "web", "mounts", 0, "destination"): "/www",
    ("container-registry", "mirrors", "<key>"): "10.0.2.2:5000",
    ("container-registry", "credentials", "r.example", "username"): "bob",
    ("container-registry", "credentials", "r.example", "password"): "s3cret",
}


KEY_FILLER: dict[str | int, Any] = {  # what a map key being tested maps to
    "kernel": "1", "containers": {}, "container-registry": ["http://10.0.2.2:5000"],
}


def tree_with(path: tuple[str | int, ...], value: str) -> dict[str, Any]:
    """A settings tree with `value` at `path` ("<key>": as the map key at that place)."""
    def build(rest: tuple[str | int, ...]) -> Any:
        if not rest:
            return value
        head, tail = rest[0], rest[1:]
        if head == "<key>":
            return {value: KEY_FILLER[path[0]]}
        if isinstance(head, int):
            return [build(tail)]
        return {head: build(tail)}

    return dict(build(path))


@pytest.mark.parametrize("path", list(ONE_LINE), ids=[".".join(map(str, p)) for p in ONE_LINE])
@pytest.mark.parametrize("bad", ["{}\n", "{}\r", "\n{}", "{}\x00", "{}\r\n", "{}\u2028"])
def test_no_line_break_or_nul_in_a_one_line_setting(path: tuple[str | int, ...], bad: str) -> None:
    good = ONE_LINE[path]
    validate(tree_with(path, good))  # the sample itself is fine
    with pytest.raises(InvalidSettings):
        validate(tree_with(path, bad.format(good)))


@settings(max_examples=60, deadline=None, database=None)
@given(st.sampled_from(list(ONE_LINE)), st.text(alphabet=st.characters(codec="utf-8"), max_size=24))
def test_any_accepted_one_line_value_has_no_line_break(path: tuple[str | int, ...], junk: str) -> None:
    value = ONE_LINE[path] + junk
    try:
        validate(tree_with(path, value))
    except InvalidSettings:
        return
    assert not any(c in value for c in "\n\r\x00\x0b\x0c\x85\u2028\u2029"), repr(value)
