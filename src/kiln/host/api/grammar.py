"""The request grammars the OpenAPI document states, parsed exactly as it states them.

docs/api.openapi.json gives each of these a pattern (ECMA-262) or a sentence, and
tests/test_api_contract.py generates requests from those: a grammar that drifted from its
description (a blank list item silently dropped, `42.0` refused for an integer, `NaN`
taken as JSON) would be a second, undocumented API. Everything here is pure: no datastore,
no model.

- Bodies are RFC 8259 JSON in UTF-8: no `NaN`/`Infinity`, no duplicate member names, at
  most MAX_DEPTH levels. Numbers are read as JSON Schema reads them: an integral number is an
  integer whatever its spelling (`42`, `42.0`, `4.2e1`), so an integer setting takes all three.
- `?keys=` is a comma-separated list of dotted keys (kiln.host.settings.keys); commas inside
  a quoted segment do not split; spaces and tabs around a key are dropped; an empty key (or an
  empty segment) is refused, never skipped.
- `?names=` is a comma-separated list of non-empty names.
- A keypair is `KEY=VALUE`: KEY up to the first `=` (so it holds no `=`), VALUE the rest.
- `/exec` needs `Connection: upgrade` (a token of the list, any case) and `Upgrade: kiln-exec`.
"""

from __future__ import annotations

import json
from typing import Any

from kiln.host.settings.keys import BadKey, parse_key

MAX_DEPTH = 512  # arrays and objects inside each other (Python's parser would give up near 1000)
_SPACE = " \t"  # what is dropped around a key: ASCII space and tab only (RFC 9110's OWS)


class BadRequest(ValueError):
    """A request that does not follow its grammar; the API answers 400 naming `path`."""

    def __init__(self, detail: str, path: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.path = path


# -- JSON bodies -----------------------------------------------------------------------------


class _NotJson(ValueError):
    pass


def _number(text: str) -> int | float:
    """A JSON number with a fraction or exponent: an int when it is integral (JSON Schema's view)."""
    value = float(text)  # "1e999" is inf: not integral, so it stays a float (and fits no setting)
    return int(value) if value.is_integer() else value


def _integer(text: str) -> int | float:
    # Python refuses to parse ints of more than 4300 digits (CVE-2020-10735): such a number is
    # still JSON, and as large as the float that says so.
    return int(text) if len(text) <= 4300 else float("inf") if text[0] != "-" else float("-inf")


def _constant(name: str) -> Any:
    raise _NotJson(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _NotJson(f"member '{name}' appears twice in one object")
            seen.add(name)
    return out


def _depth_ok(value: Any) -> bool:
    """At most MAX_DEPTH arrays and objects inside each other (level by level: containers only)."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(MAX_DEPTH):
        if not level:
            return True
        level = [c for node in level for c in (node.values() if isinstance(node, dict) else node)
                 if isinstance(c, dict | list)]
    return not level


def loads(text: str) -> Any:
    """One JSON text by the rules above; ValueError (with the reason) when it breaks one."""
    try:
        value = json.loads(text, parse_float=_number, parse_int=_integer, parse_constant=_constant,
                           object_pairs_hook=_object)
    except RecursionError:
        raise ValueError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    if not _depth_ok(value):
        raise ValueError(f"nested too deeply (more than {MAX_DEPTH} levels)")
    try:  # "\ud800" parses, but could never be written to a file
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValueError("holds a string that is not valid Unicode") from None
    return value


def body_json(body: bytes) -> Any:
    """A request body (empty: null) as JSON; BadRequest naming `body` otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not JSON: not UTF-8 ({e})", "body") from None
    try:
        return loads(text or "null")
    except ValueError as e:
        raise BadRequest(f"request body is not JSON: {e}", "body") from None


# -- keys, names, keypairs --------------------------------------------------------------------


def split_list(raw: str) -> list[str]:
    """Split on commas outside double quotes (`\\` escapes a character inside quotes)."""
    out: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    for c in raw:
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            out.append("".join(buf))
            buf = []
            continue
        buf.append(c)
    out.append("".join(buf))
    return out


def key(text: str, path: str) -> tuple[str, ...]:
    """One dotted key, spaces and tabs around it dropped, without its optional `settings.`."""
    try:
        parts = parse_key(text.strip(_SPACE))
    except BadKey as e:
        raise BadRequest(str(e), path) from None
    return parts[1:] if parts[0] == "settings" else parts


def key_list(raw: str, path: str = "keys") -> list[tuple[str, ...]]:
    """`?keys=a,b`: at least one key; `()` stands for `settings` itself (everything)."""
    items = split_list(raw)
    if not all(k.strip(_SPACE) for k in items):
        raise BadRequest(f"an empty key in '{raw}' (a comma too many, or nothing at all?)", path)
    return [key(k, path) for k in items]


def name_list(raw: str, path: str = "names") -> list[str]:
    names = raw.split(",")
    if not all(names):
        raise BadRequest("expected NAME[,NAME...] (no empty name)", path)
    return names


def keypair(pair: str, path: str = "request_payload") -> tuple[tuple[str, ...], str]:
    """`KEY=VALUE` → (the setting's path, VALUE as written)."""
    text, sep, value = pair.partition("=")
    if not sep:
        raise BadRequest(f"'{pair}' is not KEY=VALUE", path)
    parts = key(text, path)
    if not parts:
        raise BadRequest(f"'{text}' names no setting", path)
    return parts, value


# -- headers --------------------------------------------------------------------------------


def upgrade_protocol(connection: str | None, upgrade: str | None) -> str:
    """The protocol asked for, or "" unless `Connection` lists `upgrade` (RFC 9110 7.8)."""
    tokens = [t.strip(_SPACE).lower() for t in (connection or "").split(",")]
    if "upgrade" not in tokens:
        return ""
    return (upgrade or "").strip(_SPACE).lower()
