"""The settings model: every setting a Kiln host accepts, typed and strict.

msgspec decodes a whole settings tree into these structs; unknown keys and wrong types are
rejected with the path of the offending value. Every field is optional because the live
store, a pending transaction and a PATCH body are all partial trees of the same shape.

Adding a setting is one field here (kebab-case in the API), a default in the variant's
defaults file, and, if it is rendered, its metadata and template.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from kiln.host.settings.errors import InvalidSettings
from kiln.host.settings.keys import format_key, format_segment, get_path, set_path

__all__ = ["InvalidSettings", "Settings", "to_tree", "validate"]

# Patterns end in \Z, not $: msgspec searches with re.search, where `$` also matches before
# a final "\n" (which then reached rendered files). One-line values exclude every line break
# Python or a C tool would split on, and NUL. The API document carries each pattern in
# ECMA-262 (`\Z` spelled `$`); so that the two read alike, patterns use no bare `$`, `.`,
# `\d` or `\w` (tests/openapi_schema.ecma_pattern refuses them).
_BREAKS = r"\n\r\x00\x0b\x0c\x85\u2028\u2029"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
Hostname = Annotated[str, Meta(pattern=rf"^(?=[A-Za-z0-9.-]{{1,253}}\Z){_LABEL}(\.{_LABEL})*\Z")]
Url = Annotated[str, Meta(pattern=r"^https?://[^\s\x00]+\Z", max_length=2048)]
Name = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}\Z")]
Port = Annotated[int, Meta(ge=1, le=65535)]
SysctlName = Annotated[str, Meta(pattern=r"^[a-z0-9_][a-z0-9_.\-/]*\Z", max_length=256)]
SysctlValue = Annotated[str, Meta(pattern=rf"^[^{_BREAKS}]*\Z", max_length=4096)]
TimeServer = Annotated[str, Meta(pattern=r"^[A-Za-z0-9.:\[\]-]{1,253}\Z")]
Base64 = Annotated[str, Meta(pattern=r"^[A-Za-z0-9+/=\s]*\Z", max_length=65536)]
Pem = Annotated[str, Meta(pattern=r"-----BEGIN [A-Z ]+-----", max_length=65536)]
# A registry host as in an image reference (`docker.io`, `10.0.2.2:5000`), or `*` for any.
RegistryHost = Annotated[str, Meta(pattern=r"^(\*|[A-Za-z0-9]([A-Za-z0-9.-]{0,252})(:[0-9]{1,5})?)\Z")]
# An image reference: [registry/]path[:tag][@sha256:digest] (lowercase path, as OCI requires).
ImageRef = Annotated[
    str,
    Meta(
        pattern=r"^([A-Za-z0-9.-]+(:[0-9]{1,5})?/)?[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*"
        r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?\Z",
        max_length=512,
    ),
]
EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*\Z", max_length=256)]
# Env values reach the container through a 0600 file of NAME=VALUE lines (ctr --env-file), never
# ctr's world-readable command line: a line break would end the value there.
EnvValue = Annotated[str, Meta(pattern=r"^[^\x00\n\r]*\Z", max_length=32768)]
Argument = Annotated[str, Meta(pattern=r"^[^\x00]*\Z", max_length=32768)]
# Workload mounts come from /local only (the host's own directories stay out of reach).
# Mount paths reach `ctr run --mount type=bind,src=…,dst=…`, which ctr reads as CSV of key=value:
# a ',', '"' or '=' in a path would add fields of the user's choosing (a second `src=/`).
_MOUNT_SYNTAX = ',"='
# One way to match each path: `([^/]+/?)*` split a run of N characters 2^N ways, and a bad
# character at the end of 40 tried them all (a request stalled the server for hours).
_SEGMENT = rf"(?!\.\.?(/|\Z))[^/{_BREAKS}{_MOUNT_SYNTAX}]+"
LocalPath = Annotated[str, Meta(pattern=rf"^/local(/{_SEGMENT})*/?\Z", max_length=1024)]
ContainerPath = Annotated[str, Meta(pattern=rf"^/({_SEGMENT}(/{_SEGMENT})*/?)?\Z", max_length=1024)]
# Workload memory limit: 4Mi up to 9999999Mi, or 1Gi up to 9999Gi (binary units, as Kubernetes writes them).
MemoryLimit = Annotated[str, Meta(pattern=r"^(([4-9]|[1-9][0-9]{1,6})Mi|[1-9][0-9]{0,3}Gi)\Z")]
Cpus = Annotated[float, Meta(ge=0.01, le=1024)]
# The update daemon: "30s", "15m", "1h", "1d"; FleetLock group names; weekly windows.
Interval = Annotated[str, Meta(pattern=r"^[1-9][0-9]{0,6}(s|m|h|d)\Z")]
FleetGroup = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9.-]+\Z", max_length=253)]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
ClockTime = Annotated[str, Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]\Z")]
TimeZone = Annotated[
    str,
    Meta(pattern=r"^(UTC|[+-][01][0-9]:[0-5][0-9]|[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,2})\Z", max_length=64),
]
UnitName = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9:_.@\\-]+\.(service|socket|target|mount|timer|path)\Z", max_length=256)
]


class _S(Struct, forbid_unknown_fields=True, omit_defaults=True, rename="kebab"):
    """Base: kebab-case names, unknown keys rejected, unset fields left out of output."""


class Network(_S):
    hostname: Hostname | None = None


class Ntp(_S):
    time_servers: Annotated[list[TimeServer], Meta(max_length=32)] | None = None


class Kernel(_S):
    sysctl: Annotated[dict[SysctlName, SysctlValue], Meta(max_length=512)] | None = None
    lockdown: Literal["none", "integrity", "confidentiality"] | None = None


class FleetLock(_S):
    """The FleetLock server the update daemon asks before each reboot (strategy fleet-lock)."""

    url: Url | None = None
    group: FleetGroup | None = None
    ca: Pem | None = None  # an https server's certificate must chain to this CA


class MaintenanceWindow(_S):
    """A weekly window in which the update daemon may reboot (kiln.host.update.windows)."""

    days: Annotated[list[Day], Meta(min_length=1, max_length=7)] | None = None
    start: ClockTime | None = None
    length_minutes: Annotated[int, Meta(ge=1, le=10080)] | None = None
    time_zone: TimeZone | None = None


class Updates(_S):
    metadata_base_url: Url | None = None
    targets_base_url: Url | None = None
    seed: Annotated[int, Meta(ge=0, le=2047)] | None = None
    # Version.parse's grammar (kiln.host.update.manifest): ASCII digits, at most 9 a part.
    version_lock: Annotated[str, Meta(pattern=r"^(latest|v?[0-9]{1,9}\.[0-9]{1,9}\.[0-9]{1,9})\Z")] | None = None
    ignore_waves: bool | None = None
    # The update daemon (in the host agent): manual = nothing automatic.
    strategy: Literal["manual", "immediate", "fleet-lock"] | None = None
    check_interval: Interval | None = None
    fleet_lock: FleetLock | None = None
    maintenance_windows: Annotated[list[MaintenanceWindow], Meta(max_length=32)] | None = None
    max_boot_attempts: Annotated[int, Meta(ge=1, le=100)] | None = None


class Health(_S):
    """What a new version must show before its boot counts as successful (the update
    health gate): these units active and, if set, the URL answering 2xx, within timeout."""

    units: Annotated[list[UnitName], Meta(max_length=64)] | None = None
    http_check: Url | None = None
    timeout: Annotated[int, Meta(ge=1, le=3600)] | None = None


class HostContainer(_S):
    """An admin or control container on the host's own containerd (Bottlerocket's host-ctr)."""

    source: ImageRef | None = None
    enabled: bool | None = None
    superpowered: bool | None = None
    user_data: Base64 | None = None


class BootstrapContainer(_S):
    """Runs to completion before the host reports ready (`once`: then set to `off`)."""

    source: ImageRef | None = None
    mode: Literal["off", "once", "always"] | None = None
    essential: bool | None = None
    user_data: Base64 | None = None


class Mount(_S):
    source: LocalPath | None = None
    destination: ContainerPath | None = None
    read_only: bool | None = None


class Container(_S):
    """A workload on the workload containerd, kept running per `restart` (no orchestrator)."""

    image: ImageRef | None = None
    enabled: bool | None = None
    command: Annotated[list[Argument], Meta(max_length=256)] | None = None
    env: Annotated[dict[EnvName, EnvValue], Meta(max_length=256)] | None = None
    restart: Literal["always", "on-failure", "never"] | None = None
    network: Literal["host", "none"] | None = None
    mounts: Annotated[list[Mount], Meta(max_length=64)] | None = None
    memory_limit: MemoryLimit | None = None
    cpus: Cpus | None = None
    stop_timeout: Annotated[int, Meta(ge=1, le=300)] | None = None  # seconds from SIGTERM to SIGKILL


class RegistryCredential(_S):
    username: Annotated[str, Meta(pattern=r"^[^:\s\x00]+\Z", max_length=256)] | None = None
    password: Annotated[str, Meta(pattern=r"^[^\s\x00]+\Z", max_length=4096)] | None = None


class ContainerRegistry(_S):
    """Where images come from: mirrors per registry (an `http://` endpoint is the only way to
    pull over plain HTTP) and credentials per registry."""

    mirrors: Annotated[dict[RegistryHost, Annotated[list[Url], Meta(max_length=16)]], Meta(max_length=64)] | None = None
    credentials: Annotated[dict[RegistryHost, RegistryCredential], Meta(max_length=64)] | None = None


# The fleet CA's revocation list (`kiln pki crl`): ~40 bytes a revoked certificate, so 256 KiB
# holds thousands.
Crl = Annotated[str, Meta(pattern=r"^-----BEGIN X509 CRL-----", max_length=262144)]


class ApiRemote(_S):
    enabled: bool | None = None
    port: Port | None = None
    ca: Pem | None = None
    certificate: Pem | None = None
    key: Pem | None = None
    crl: Crl | None = None

    def __post_init__(self) -> None:
        """A CRL the listener cannot use (another fleet's, damaged) would refuse every client,
        admins included: check it, against the node's CA and certificate when they are set."""
        if self.crl is None:
            return
        from kiln.core.errors import KilnError
        from kiln.host.api.tls import check_crl

        try:
            check_crl(self.crl, self.ca, self.certificate, self.key)
        except KilnError as e:
            raise ValueError(e.message.removeprefix("remote API: ")) from None


class Api(_S):
    remote: ApiRemote | None = None


class Settings(_S):
    motd: Annotated[str, Meta(max_length=4096)] | None = None
    network: Network | None = None
    ntp: Ntp | None = None
    kernel: Kernel | None = None
    updates: Updates | None = None
    health: Health | None = None
    host_containers: Annotated[dict[Name, HostContainer], Meta(max_length=64)] | None = None
    bootstrap_containers: Annotated[dict[Name, BootstrapContainer], Meta(max_length=64)] | None = None
    containers: Annotated[dict[Name, Container], Meta(max_length=64)] | None = None
    container_registry: ContainerRegistry | None = None
    api: Api | None = None




_AT = re.compile(r"^(?P<msg>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.S)
_SEG = re.compile(r"\.([^.\[]+)|\[(\d+)\]|(\[\.\.\.\])")
_PATTERNS = {
    Hostname: "a hostname (letters, digits, '-' and '.')",
    Url: "an http:// or https:// URL",
    UnitName: "a systemd unit name (e.g. containerd.service)",
    Name: "a name of lowercase letters, digits and '-' (at most 63)",
    Pem: "a PEM block",
    Crl: "a PEM X509 CRL block (kiln pki crl)",
    SysctlName: "a sysctl name (lowercase letters, digits, '_', '-', '.', '/')",
    SysctlValue: "a value on one line",
    TimeServer: "a host name or an IP address",
    Base64: "base64 text",
    RegistryHost: "a registry host[:port] or '*'",
    ImageRef: "an image reference ([registry/]name[:tag][@sha256:digest], lowercase name)",
    EnvName: "an environment variable name",
    EnvValue: "one line of text (no line break or NUL)",
    LocalPath: "a path under /local (no '.' or '..' parts; no ',', '\"' or '=')",
    ContainerPath: "an absolute path (no '.' or '..' parts; no ',', '\"' or '=')",
    MemoryLimit: "a size in Mi (at least 4Mi) or Gi, e.g. 512Mi",
    Interval: "a whole number followed by s, m, h or d (e.g. 1h)",
    FleetGroup: "a group name (letters, digits, '.' and '-')",
    ClockTime: "a time of day HH:MM",
    TimeZone: "UTC, an offset such as +02:00, or a zone name such as Europe/Berlin",
}


def _describe(msg: str) -> str:
    for typ, what in _PATTERNS.items():
        pattern = typ.__metadata__[0].pattern  # type: ignore[attr-defined]
        if pattern and pattern in msg.replace("\\\\", "\\"):
            return f"expected {what}"
    m = re.match(r"Expected `(.+?)`(.*)$", msg, re.S)
    if m:
        return "expected " + m.group(1).removesuffix(" | null") + m.group(2).replace("`", "")
    m = re.match(r"Object contains unknown field `(.+?)`$", msg)
    if m:
        return "unknown setting"
    return msg[:1].lower() + msg[1:]


def _fails_alone(tree: dict[str, Any], at: tuple[str, ...], key: str, msg: str) -> bool:
    """Does the entry `key` of the map at `at`, validated on its own, fail with `msg`?

    Only the branch down to that one entry is built and checked (every field is optional), so
    finding a bad key costs the size of the map, not the map times the whole tree.
    """
    trial: dict[str, Any] = {}
    set_path(trial, at, {key: get_path(tree, at)[key]})
    try:
        msgspec.convert(trial, Settings, strict=True)
    except msgspec.ValidationError as e:
        m = _AT.match(str(e))
        return m is not None and m.group("msg") == msg
    return False


def _locate(tree: dict[str, Any], msg: str, raw: str, key_error: bool) -> tuple[tuple[str, ...], list[str]]:
    """msgspec hides map keys (`$.kernel.sysctl[...]`); find them by trying each entry.

    Returns the path and, per segment, the list indices that follow it (`mounts[0]`).
    """
    path: tuple[str, ...] = ()
    indices: list[str] = []
    for field, idx, anykey in _SEG.findall(raw):
        if field:
            path, indices = (*path, field), [*indices, ""]
        elif idx:
            indices[-1] += f"[{idx}]"
        elif anykey:
            key = next((k for k in get_path(tree, path) if _fails_alone(tree, path, k, msg)), "*")
            path, indices = (*path, key), [*indices, ""]
    if key_error:
        key = next((k for k in get_path(tree, path) if _fails_alone(tree, path, k, msg)), "*")
        path, indices = (*path, key), [*indices, ""]
    return path, indices


def _null_at(tree: dict[str, Any], prefix: tuple[str, ...]) -> tuple[str, ...] | None:
    for k, v in tree.items():
        found = (*prefix, k) if v is None else _null_at(v, (*prefix, k)) if isinstance(v, dict) else None
        if found is not None:
            return found
    return None


def validate(tree: Any) -> Settings:
    """Decode a settings tree (nested dicts, as from JSON or TOML) or raise InvalidSettings."""
    if not isinstance(tree, dict):
        raise InvalidSettings(f"expected a table of settings, got {type(tree).__name__}", "settings")
    try:
        settings = msgspec.convert(tree, Settings, strict=True)
        null = _null_at(tree, ())
        if null is not None:  # fields are optional, but null is not a value (it would render "None")
            raise InvalidSettings("expected a value, got null", format_key(("settings", *null)))
        return settings
    except msgspec.ValidationError as e:
        m = _AT.match(str(e))
        assert m is not None
        msg = m.group("msg")
        path, indices = _locate(tree, msg, m.group("path") or "", bool(m.group("key")))
        unknown = re.match(r"Object contains unknown field `(.+?)`$", msg)
        if unknown:
            path, indices = (*path, unknown.group(1)), [*indices, ""]
        detail = _describe(msg)
        if m.group("key"):
            detail = f"invalid name: {detail}"
        key = ".".join(["settings", *(format_segment(p) + i for p, i in zip(path, indices, strict=True))])
        raise InvalidSettings(detail, key) from None


def to_tree(settings: Settings) -> dict[str, Any]:
    """Back to plain JSON-able nested dicts, unset fields omitted."""
    out: dict[str, Any] = msgspec.to_builtins(settings)
    return out


def check_remote_tls(tree: dict[str, Any]) -> None:
    """The node's TLS material must load together, or the remote listener would not start.

    A host reached only over the remote API would lock its admins out: refuse the change
    instead (run when a patch touches settings.api.remote).
    """
    remote = tree.get("api", {}).get("remote", {})
    material = [remote.get(k) for k in ("ca", "certificate", "key")]
    if not all(material):
        return
    from kiln.core.errors import KilnError
    from kiln.host.api.tls import server_context

    try:
        server_context(*material)
    except KilnError as e:
        raise InvalidSettings(str(e).split(": ", 1)[-1], "settings.api.remote") from None

