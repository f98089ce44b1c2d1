"""Hypothesis strategies drawn from the OpenAPI document's schemas: values that fit, and values
that break exactly one rule.

`Schemas(doc).values(schema)` draws instances of a schema (its `examples` and `default` too,
so requests that succeed are common); `.violations(schema)` draws instances the document says
are invalid, mostly one mutation away from a valid one (a property of the wrong type, a
string one character outside its pattern, a name the map refuses, one item too many), each
checked against the document. Only the keywords the document uses are understood; anything
else fails loudly rather than generating values the schema does not mean.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import strategies as st

from tests.openapi_schema import ANNOTATIONS, python_pattern, resolve, validator

KNOWN = {"type", "properties", "additionalProperties", "required", "propertyNames", "maxProperties",
         "items", "minItems", "maxItems", "pattern", "minLength", "maxLength", "minimum", "maximum",
         "enum", "const", "anyOf", "oneOf", "$ref"} | ANNOTATIONS
SMALL = 3  # at most this many entries in a generated map or list (beyond minItems)

json_scalars = (st.none() | st.booleans() | st.integers(-(2**40), 2**40)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)


class Schemas:
    """Strategies for the schemas of one document (their $refs point into it)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self._values: dict[str, st.SearchStrategy[Any]] = {}
        self._violations: dict[str, st.SearchStrategy[Any]] = {}

    def deref(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The schema with its $ref followed (siblings of a $ref are annotations only)."""
        while "$ref" in schema:
            siblings = set(schema) - {"$ref"} - ANNOTATIONS
            assert not siblings, f"constraints beside a $ref: {siblings}"
            schema = resolve(self.doc, schema["$ref"])
        unknown = set(schema) - KNOWN
        assert not unknown, f"keywords the generator does not understand: {unknown}"
        return schema

    def valid(self, schema: dict[str, Any], value: Any) -> bool:
        return bool(validator(self.doc, schema).is_valid(value))

    # -- instances ---------------------------------------------------------------------------

    def values(self, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._values:
            self._values[key] = st.deferred(lambda: self._build_values(schema))
        return self._values[key]

    def _build_values(self, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        documented = [*schema.get("examples", []), *([schema["default"]] if "default" in schema else [])]
        s = self.deref(schema)
        documented += [*s.get("examples", []), *([s["default"]] if "default" in s else [])]
        drawn = self._drawn(s)
        if documented:
            ok = [v for v in documented if self.valid(schema, v)]
            assert ok == documented, f"an example or default the schema refuses: {documented}"
            drawn = st.one_of(drawn, drawn, st.sampled_from(documented))
        return drawn

    def _drawn(self, s: dict[str, Any]) -> st.SearchStrategy[Any]:
        if "const" in s:
            return st.just(s["const"])
        if "enum" in s:
            return st.sampled_from(s["enum"])
        if "anyOf" in s:
            return st.one_of([self.values(b) for b in s["anyOf"]])
        if "oneOf" in s:
            return st.one_of([self.values(b) for b in s["oneOf"]]).filter(lambda v: self.valid(s, v))
        types = s.get("type")
        if isinstance(types, list):
            return st.one_of([self._drawn({**s, "type": t}) for t in types])
        if types == "string":
            return self._strings(s)
        if types == "integer":
            lo, hi = s.get("minimum"), s.get("maximum")
            ints = st.integers(lo, hi)
            # An integral number however written: 42.0 is the integer 42 to JSON Schema (and the server).
            return st.one_of(ints, ints, ints.filter(lambda i: abs(i) < 2**53).map(float))
        if types == "number":
            lo, hi = s.get("minimum"), s.get("maximum")
            return st.one_of(st.floats(lo, hi, allow_nan=False, allow_infinity=False),
                             st.integers(math.ceil(lo) if lo is not None else None,
                                         math.floor(hi) if hi is not None else None))
        if types == "boolean":
            return st.booleans()
        if types == "null":
            return st.none()
        if types == "array":
            items = self.values(s.get("items", {}))
            low = s.get("minItems", 0)
            return st.lists(items, min_size=low, max_size=min(s.get("maxItems", low + SMALL), low + SMALL))
        if types == "object" or "properties" in s:
            return self._objects(s)
        return json_values

    def _strings(self, s: dict[str, Any]) -> st.SearchStrategy[str]:
        low, high = s.get("minLength", 0), s.get("maxLength")
        if "pattern" not in s:
            return st.text(min_size=low, max_size=min(high if high is not None else 40, low + 40))
        drawn = st.from_regex(python_pattern(s["pattern"]))
        return drawn.filter(lambda v: low <= len(v) and (high is None or len(v) <= high))

    def _objects(self, s: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        props: dict[str, Any] = s.get("properties", {})
        required = set(s.get("required", []))
        extra = s.get("additionalProperties", True)
        names = self.values({"type": "string", **s.get("propertyNames", {})})

        @st.composite
        def build(draw: st.DrawFn) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, sub in props.items():
                if name in required or draw(st.integers(0, 2)) == 0:
                    out[name] = draw(self.values(sub))
            room = s.get("maxProperties", 64) - len(out)
            if isinstance(extra, dict) and room > 0:
                entries = draw(st.dictionaries(names.filter(lambda n: n not in props), self.values(extra),
                                               max_size=min(room, SMALL)))
                out.update(entries)
            elif extra is True and not props and room > 0:
                out.update(draw(st.dictionaries(names, json_values, max_size=min(room, SMALL))))
            elif extra is True and draw(st.integers(0, 4)) == 0:  # undeclared members are allowed: send one
                out.update(draw(st.dictionaries(names.filter(lambda n: n not in props), json_values, max_size=1)))
            return out

        return build()

    # -- violations -----------------------------------------------------------------------------

    def violations(self, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        """Instances `schema` refuses, mostly one mutation away from one it accepts."""
        key = json.dumps(schema, sort_keys=True)
        if key not in self._violations:
            self._violations[key] = st.deferred(
                lambda: self._build_violations(schema).filter(lambda v: not self.valid(schema, v)))
        return self._violations[key]

    def _build_violations(self, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        s = self.deref(schema)
        options: list[st.SearchStrategy[Any]] = [json_values]
        types = s.get("type")
        if "anyOf" in s or "oneOf" in s:
            # Broken the way each branch would be, and hope it is none of the others.
            options += [self.violations(b) for b in s.get("anyOf", s.get("oneOf", []))]
        if "enum" in s or "const" in s:
            allowed = s.get("enum", [s.get("const")])
            options.append(st.sampled_from([v + "x" if isinstance(v, str) else str(v) for v in allowed]))
        if types == "string":
            options += [st.integers(-5, 5), st.booleans(), *self._bad_strings(s)]
        if types in ("integer", "number"):
            lo, hi = s.get("minimum"), s.get("maximum")
            options += [st.just(x) for x in (lo - 1 if lo is not None else None, hi + 1 if hi is not None else None)
                        if x is not None]
            options += [st.sampled_from([str(lo if lo is not None else 1), True, None])]
            if types == "integer":
                options.append(st.integers(lo, hi).map(lambda i: i + 0.5))
        if types == "array":
            item = s.get("items", {})
            options.append(st.tuples(st.lists(self.values(item), max_size=2), self.violations(item)).map(
                lambda t: [*t[0], t[1]]))
            most = s.get("maxItems")
            if most is not None and most <= 64:
                options.append(st.lists(self.values(item), min_size=most + 1, max_size=most + 1))
        if types == "object" or "properties" in s:
            options += self._bad_objects(s)
        return st.one_of(options)

    def text_violations(self, schema: dict[str, Any], read: Any = str) -> st.SearchStrategy[str]:
        """Strings that `schema` refuses once `read` (the way a query parameter's text is typed) has
        made a value of them: the mutations of `violations`, but always text."""
        s = self.deref(schema)
        options: list[st.SearchStrategy[str]] = [st.text(max_size=12)]
        if s.get("type") == "string":
            options += self._bad_strings(s)
        if "enum" in s:
            options.append(st.sampled_from([f"{v}x" for v in s["enum"]] + [str(v).upper() for v in s["enum"]]))
        if s.get("type") == "integer":
            lo, hi = s.get("minimum"), s.get("maximum")
            edges = [str(x) for x in (lo - 1 if lo is not None else None, hi + 1 if hi is not None else None) if x]
            options.append(st.sampled_from([*edges, "1.5", "+1", " 1", "1e3", "\u00b2", "\u0661", "0x10", ""]))
        return st.one_of(options).filter(lambda t: isinstance(t, str) and not self.valid(schema, read(t)))

    def _bad_strings(self, s: dict[str, Any]) -> list[st.SearchStrategy[str]]:
        fine = self._strings(s)
        out: list[st.SearchStrategy[str]] = []
        if "pattern" in s:
            # One character more, somewhere: a line break after the end, a NUL, a quote, a space...
            inserts = st.sampled_from(["\n", "\r", "\x00", "\u2028", " ", "\t", '"', ",", ".", "=", "/", "-", "x",
                                       "\u0661", "\ufeff", "\x85", "\\"])
            out.append(st.builds(lambda v, c, at: v[:at % (len(v) + 1)] + c + v[at % (len(v) + 1):],
                                 fine, inserts, st.integers(0, 1000)))
            out.append(fine.map(lambda v: v + "\n"))
            out.append(st.text(max_size=20))
        high = s.get("maxLength")
        if high is not None and high <= 300:
            out.append(st.just("a" * (high + 1)))
        if s.get("minLength", 0) > 0:
            out.append(st.just(""))
        return out

    def _bad_objects(self, s: dict[str, Any]) -> list[st.SearchStrategy[Any]]:
        props: dict[str, Any] = s.get("properties", {})
        fine = self._objects(s)
        out: list[st.SearchStrategy[Any]] = [st.sampled_from([[], "x", 1])]
        if props:
            def replace(base: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
                return {**base, name: value}

            out.append(st.sampled_from(sorted(props)).flatmap(
                lambda name: st.builds(replace, fine, st.just(name), self.violations(props[name]))))
        for name in s.get("required", []):
            out.append(fine.map(lambda v, n=name: {k: x for k, x in v.items() if k != n}))
        extra = s.get("additionalProperties", True)
        if extra is False:
            out.append(st.builds(lambda v, k, x: {**v, k: x}, fine,
                                 st.text(min_size=1, max_size=8).filter(lambda k: k not in props), json_scalars))
        elif isinstance(extra, dict):
            names = self.values({"type": "string", **s.get("propertyNames", {})})
            out.append(st.builds(lambda v, k, x: {**v, k: x}, fine, names.filter(lambda k: k not in props),
                                 self.violations(extra)))
            if "propertyNames" in s:
                bad_names = self.violations({"type": "string", **s["propertyNames"]}).filter(
                    lambda k: isinstance(k, str))
                out.append(st.builds(lambda v, k, x: {**v, k: x}, fine, bad_names, self.values(extra)))
        return out
