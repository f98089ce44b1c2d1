"""Dotted setting keys and the tree operations on settings documents.

A key is the path to a value in the settings tree, written with dots:
`settings.network.hostname`. A segment that itself contains a dot or a quote (a sysctl
name, a label) is written in double quotes with `\\` escapes, like Bottlerocket's keys:
`settings.kernel.sysctl."net.ipv4.ip_forward"`. `parse_key(format_key(p)) == p` for every
tuple of non-empty segments.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

Tree = dict[str, Any]
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class BadKey(ValueError):
    """A malformed key; the message names it."""


def format_segment(seg: str) -> str:
    if seg and all(c in _PLAIN for c in seg):
        return seg
    return '"' + seg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_key(parts: Iterable[str]) -> str:
    return ".".join(format_segment(p) for p in parts)


def parse_key(key: str) -> tuple[str, ...]:
    """Split a dotted key into segments; a clear error for empty or unterminated segments."""
    parts: list[str] = []
    i, n = 0, len(key)
    while True:
        if i < n and key[i] == '"':
            i += 1
            buf = []
            while i < n and key[i] != '"':
                if key[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(key[i])
                i += 1
            if i >= n:
                raise BadKey(f"key '{key}': unterminated quote")
            i += 1
            seg = "".join(buf)
        else:
            j = i
            while j < n and key[j] != ".":
                if key[j] == '"':
                    raise BadKey(f"key '{key}': quote inside a segment")
                j += 1
            seg, i = key[i:j], j
        if seg == "":
            raise BadKey(f"key '{key}': empty segment")
        parts.append(seg)
        if i == n:
            return tuple(parts)
        if key[i] != ".":
            raise BadKey(f"key '{key}': expected '.' after a quoted segment")
        i += 1


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, leaf) pairs; lists and scalars are leaves, empty tables are dropped."""
    for k, v in tree.items():
        path = (*prefix, k)
        if isinstance(v, Mapping):
            yield from flatten(v, path)
        else:
            yield path, v


def unflatten(items: Iterable[tuple[tuple[str, ...], Any]]) -> Tree:
    out: Tree = {}
    for path, value in items:
        set_path(out, path, value)
    return out


def set_path(tree: Tree, path: tuple[str, ...], value: Any) -> None:
    node = tree
    for seg in path[:-1]:
        nxt = node.get(seg)
        if not isinstance(nxt, dict):
            nxt = node[seg] = {}
        node = nxt
    node[path[-1]] = value


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The subtree or leaf at `path`; raises LookupError when absent."""
    node: Any = tree
    for seg in path:
        if not isinstance(node, Mapping) or seg not in node:
            raise LookupError(format_key(path))
        node = node[seg]
    return node


def has_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    """Whether `path` (a leaf or a subtree) exists in `tree`."""
    try:
        get_path(tree, path)
    except LookupError:
        return False
    return True


def merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> Tree:
    """A new tree: `patch` over `base`. Tables merge key by key; any other value replaces.

    Neither input is modified, so a rejected patch leaves the caller's state untouched.
    """
    out: Tree = dict(base)
    for k, v in patch.items():
        old = out.get(k)
        if isinstance(v, Mapping) and isinstance(old, Mapping):
            out[k] = merge(old, v)
        elif isinstance(v, Mapping):
            out[k] = merge({}, v)
        else:
            out[k] = v
    return out


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Leaf paths whose value differs between the trees (added, removed or changed)."""
    a, b = dict(flatten(old)), dict(flatten(new))
    return sorted(p for p in a.keys() | b.keys() if a.get(p, _MISSING) != b.get(p, _MISSING))


def select(tree: Mapping[str, Any], paths: Iterable[tuple[str, ...]]) -> Tree:
    """The sub-tree made of the given paths that exist in `tree` (prefixes select subtrees)."""
    out: Tree = {}
    for p in paths:
        try:
            set_path(out, p, get_path(tree, p))
        except LookupError:
            continue
    return out


def is_prefix(prefix: tuple[str, ...], path: tuple[str, ...]) -> bool:
    return path[: len(prefix)] == prefix


_MISSING = object()
