"""Reading the OpenAPI document the way a JSON client does, and the settings model beside it.

JSON Schema patterns are ECMA-262 regular expressions (`$` is the end of the text, `\\d` is
0-9, `\\s` has its own set); the `jsonschema` package runs them with Python's `re`, where `$`
also matches before a final newline. So that the tests check what the document *says*,
patterns are translated (`python_pattern`) before Python runs them. The model (msgspec)
runs Python patterns with `re.search`; `ecma_pattern` gives the document's spelling of one,
refusing anything the two dialects would read differently and that has no exact spelling.

`settings_schema()` is the model's own JSON Schema in the document's normal form, and
`reader_view()` derives from a settings schema the one a reader gets (kiln.host.api.redact),
so the hand-written document can be compared with both.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import msgspec
from jsonschema.exceptions import ValidationError

from kiln.host.api.redact import READER_VISIBLE, REDACTED
from kiln.host.settings.model import Settings

# What `\s` means to Python (str patterns) and to ECMA-262, as class contents both dialects read alike.
PY_SPACE = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
ECMA_SPACE = r"\t\n\x0b\x0c\r\x20\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
ECMA_DOT = r"[^\n\r\u2028\u2029]"


class Untranslatable(ValueError):
    """A construct the two dialects read differently, with no exact spelling in the other."""


def _translate(pattern: str, escapes: dict[str, str | None], class_escapes: dict[str, str | None],
               dot: str, dollar: str | None) -> str:
    out: list[str] = []
    i, n, in_class = 0, len(pattern), False
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise Untranslatable(f"{pattern!r}: a trailing backslash")
            e = pattern[i + 1]
            i += 2
            table = class_escapes if in_class else escapes
            if e in table:
                spelled = table[e]
                if spelled is None:
                    raise Untranslatable(f"{pattern!r}: \\{e} {'in a class ' if in_class else ''}differs")
                out.append(spelled)
            else:
                out.append("\\" + e)
            continue
        i += 1
        if in_class:
            in_class = c != "]"
            out.append(c)
        elif c == "[":
            in_class = True
            out.append(c)
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):  # Python: a literal ']'; ECMA: the empty class
                raise Untranslatable(f"{pattern!r}: '[]' differs")
            if pattern.startswith(r"\s\S]", i):  # any character, in both
                out.append(r"\s\S]")
                i += 5
                in_class = False
        elif c == "$":
            if dollar is None:
                raise Untranslatable(f"{pattern!r}: Python's $ also matches before a final newline (use \\Z)")
            out.append(dollar)
        elif c == ".":
            out.append(dot)
        else:
            out.append(c)
    return "".join(out)


_UNICODE_CLASSES = {e: None for e in "dDwWbB"}


def ecma_pattern(py: str) -> str:
    """The document's spelling of a model pattern (Python, searched): the same strings match."""
    return _translate(
        py,
        {**_UNICODE_CLASSES, "Z": "$", "A": "^", "s": f"[{PY_SPACE}]", "S": f"[^{PY_SPACE}]"},
        {**_UNICODE_CLASSES, "s": PY_SPACE, "S": None},
        dot=r"[^\n]", dollar=None,
    )


@functools.cache
def python_pattern(ecma: str) -> re.Pattern[str]:
    """A document pattern (ECMA-262, searched) compiled for Python with the same meaning."""
    source = _translate(
        ecma,
        {"d": "[0-9]", "D": "[^0-9]", "w": "[A-Za-z0-9_]", "W": "[^A-Za-z0-9_]", "s": f"[{ECMA_SPACE}]",
         "S": f"[^{ECMA_SPACE}]", "b": None, "B": None, "Z": None, "A": None, "p": None, "P": None, "k": None},
        {"d": "0-9", "w": "A-Za-z0-9_", "s": ECMA_SPACE, "D": None, "W": None, "S": None, "b": None},
        dot=ECMA_DOT, dollar=r"\Z",
    )
    return re.compile(source)


# -- validation with ECMA patterns --------------------------------------------------------------


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not python_pattern(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


EcmaValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern})


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A 2020-12 validator for `schema`, whose $refs point into `doc` (#/components/...)."""
    return EcmaValidator({**schema, "components": doc["components"]})


# -- normal forms, for comparing schemas -----------------------------------------------------------

ANNOTATIONS = {"title", "description", "examples", "default", "$comment", "deprecated", "readOnly", "writeOnly"}


def resolve(root: dict[str, Any], ref: str) -> Any:
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def normal(schema: Any, root: dict[str, Any]) -> Any:
    """`schema` with every $ref inlined and annotations dropped; enums sorted; `anyOf`s of one
    branch unwrapped; `required: []` dropped. Two schemas with equal normal forms accept the
    same values."""
    if isinstance(schema, list):
        return [normal(s, root) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    if "$ref" in schema:
        out.update(normal(resolve(root, schema["$ref"]), root))
    for k, v in schema.items():
        if k in ANNOTATIONS or k == "$ref" or (k == "required" and v == []):
            continue
        if k in ("properties", "$defs"):
            out[k] = {name: normal(s, root) for name, s in v.items()}
        elif k == "enum":
            out[k] = sorted(v, key=repr)
        else:
            assert k not in out, f"{k} both in a $ref'd schema and beside the $ref"
            out[k] = normal(v, root)
    if set(out) == {"anyOf"} and len(out["anyOf"]) == 1:
        one: Any = out["anyOf"][0]
        return one
    return out


def _model_form(schema: Any) -> Any:
    """msgspec's schema in the document's terms: no null (validate() refuses it), ECMA patterns."""
    if isinstance(schema, list):
        return [_model_form(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _model_form(v) if k not in ("properties", "$defs") else {n: _model_form(s) for n, s in v.items()}
           for k, v in schema.items()}
    if "anyOf" in out:
        out["anyOf"] = [s for s in out["anyOf"] if s != {"type": "null"}]
    if "pattern" in out:
        out["pattern"] = ecma_pattern(out["pattern"])
    return out


def settings_schema() -> dict[str, Any]:
    """The model's JSON Schema (Settings), normal form, ECMA patterns."""
    raw = _model_form(msgspec.json.schema(Settings))
    schema: dict[str, Any] = normal({"$ref": raw["$ref"]}, raw)
    return schema


def _visible(at: tuple[str, ...]) -> bool:
    return any(len(p) <= len(at) and all(x in ("*", y) for x, y in zip(p, at, strict=False)) for p in READER_VISIBLE)


def _leads_to_visible(at: tuple[str, ...]) -> bool:
    return any(len(p) > len(at) and all(x in ("*", y) for x, y in zip(p, at, strict=False)) for p in READER_VISIBLE)


def reader_view(schema: dict[str, Any], at: tuple[str, ...] = ()) -> dict[str, Any]:
    """What `schema` (normal form, settings below `at`) becomes once redact.reader_view has run."""
    if _visible(at):
        return schema
    if _leads_to_visible(at) and schema.get("type") == "object":
        out = dict(schema)
        if "properties" in out:
            out["properties"] = {k: reader_view(s, (*at, k)) for k, s in out["properties"].items()}
        if isinstance(out.get("additionalProperties"), dict):  # a map: any name, so only `*` patterns match
            out["additionalProperties"] = reader_view(out["additionalProperties"], (*at, "\0any"))
        return out
    return {"anyOf": [schema, {"const": REDACTED}]}
