"""Dotted setting keys and tree operations (kiln.host.settings.keys), as properties."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.host.settings.keys import (
    BadKey,
    changed_keys,
    flatten,
    format_key,
    get_path,
    merge,
    parse_key,
    select,
    unflatten,
)

# No per-example deadline (Hypothesis's default is 200 ms): these are properties of pure
# functions, not timings, and an example is slower only when the machine is busy.
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any non-empty text: dots, quotes, backslashes, spaces, unicode (surrogates can't be JSON).
segment = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)
tricky = st.sampled_from(['.', '"', "\\", '\\"', '"."', "a.b", "net.ipv4.ip_forward", "é", "ü.ß", " ", "\\\\."])
segments = st.lists(st.one_of(segment, tricky), min_size=1, max_size=6).map(tuple)

# Trees with a consistent shape, like settings: names t*/u* are always tables, a*/b* are
# always leaves, so a key is never a table in one tree and a scalar in another.
TABLES = ("t", "u", "v.w")
LEAVES = ("a", "b", 'c"d')
leaf = st.one_of(st.integers(-3, 3), st.text(max_size=3), st.booleans(), st.lists(st.integers(0, 2), max_size=2))
trees = st.recursive(
    st.dictionaries(st.sampled_from(LEAVES), leaf, max_size=3),
    lambda sub: st.builds(
        lambda leaves, tables: {**leaves, **tables},
        st.dictionaries(st.sampled_from(LEAVES), leaf, max_size=3),
        st.dictionaries(st.sampled_from(TABLES), sub, max_size=3),
    ),
    max_leaves=12,
)


def prune(tree: dict[str, Any]) -> dict[str, Any]:
    """The tree without empty tables (flatten drops them)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            v = prune(v)
            if not v:
                continue
        out[k] = v
    return out


# -- parse_key / format_key ------------------------------------------------------------


@PROPERTY
@given(segments)
def test_format_then_parse_is_identity(parts: tuple[str, ...]) -> None:
    assert parse_key(format_key(parts)) == parts


@PROPERTY
@given(st.lists(st.from_regex(r"[A-Za-z0-9_-]+", fullmatch=True), min_size=1, max_size=5).map(tuple))
def test_plain_segments_are_written_bare(parts: tuple[str, ...]) -> None:
    assert format_key(parts) == ".".join(parts)
    assert parse_key(".".join(parts)) == parts


def test_quoted_segments() -> None:
    assert parse_key('settings.kernel.sysctl."net.ipv4.ip_forward"') == (
        "settings", "kernel", "sysctl", "net.ipv4.ip_forward")
    assert format_key(("settings", "kernel", "sysctl", "net.ipv4.ip_forward")) == (
        'settings.kernel.sysctl."net.ipv4.ip_forward"')
    assert format_key(("a", 'say "hi"', "back\\slash")) == 'a."say \\"hi\\""."back\\\\slash"'
    assert parse_key('"plain"."x"') == ("plain", "x")


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "empty segment"),
        ("a..b", "empty segment"),
        ("a.", "empty segment"),
        (".a", "empty segment"),
        ('a.""', "empty segment"),
        ('a."b', "unterminated quote"),
        ('a."b\\"', "unterminated quote"),
        ('a.b"c', "quote inside a segment"),
        ('"a"b', "expected '.' after a quoted segment"),
        ('"a".', "empty segment"),
    ],
)
def test_malformed_keys_are_named(key: str, why: str) -> None:
    with pytest.raises(BadKey) as e:
        parse_key(key)
    assert f"key '{key}'" in str(e.value)
    assert why in str(e.value)


@PROPERTY
@given(st.text(max_size=20))
def test_parse_key_accepts_or_raises_badkey(key: str) -> None:
    try:
        parts = parse_key(key)
    except BadKey as e:
        assert key in str(e)
    else:
        assert parts and all(parts)
        assert parse_key(format_key(parts)) == parts


# -- merge ----------------------------------------------------------------------------------


@PROPERTY
@given(trees)
def test_merge_with_empty_patch_is_identity(a: dict[str, Any]) -> None:
    assert merge(a, {}) == a
    assert merge({}, a) == a


@PROPERTY
@given(trees, trees)
def test_patch_leaves_win_and_base_leaves_survive(a: dict[str, Any], p: dict[str, Any]) -> None:
    out = dict(flatten(merge(a, p)))
    patch_leaves = dict(flatten(p))
    for path, value in patch_leaves.items():
        assert out[path] == value
    for path, value in flatten(a):
        if path not in patch_leaves:
            assert out[path] == value
    assert set(out) == set(dict(flatten(a))) | set(patch_leaves)


@PROPERTY
@given(trees, trees)
def test_merge_leaves_its_inputs_untouched(a: dict[str, Any], p: dict[str, Any]) -> None:
    a0, p0 = copy.deepcopy(a), copy.deepcopy(p)
    out = merge(a, p)
    assert (a, p) == (a0, p0)
    assert out is not a and out is not p
    # (The result may share untouched sub-tables with `base`: callers must not modify it.)


@PROPERTY
@given(trees, trees, trees)
def test_merge_is_associative_on_consistent_trees(a: dict[str, Any], b: dict[str, Any], c: dict[str, Any]) -> None:
    # (Only for trees of one shape: if b made a table a scalar and c a table again, merging
    # b and c first would forget that b dropped a's other leaves. The settings model never
    # lets a key change between table and scalar, so the datastore is safe.)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


def test_merge_examples() -> None:
    base = {"kernel": {"sysctl": {"a": "1", "b": "2"}}, "motd": "hi", "ntp": {"time-servers": ["x", "y"]}}
    patch = {"kernel": {"sysctl": {"b": "3"}}, "ntp": {"time-servers": ["z"]}}
    assert merge(base, patch) == {
        "kernel": {"sysctl": {"a": "1", "b": "3"}},
        "motd": "hi",
        "ntp": {"time-servers": ["z"]},  # lists replace, they do not append
    }


# -- flatten / unflatten / changed_keys / select -----------------------------------------------


@PROPERTY
@given(trees)
def test_flatten_unflatten_round_trip(t: dict[str, Any]) -> None:
    flat = list(flatten(t))
    assert unflatten(flat) == prune(t)
    assert list(flatten(unflatten(flat))) == flat
    for path, value in flat:
        assert get_path(t, path) == value
        assert not isinstance(value, dict)


@PROPERTY
@given(trees)
def test_changed_keys_of_equal_trees_is_empty(a: dict[str, Any]) -> None:
    assert changed_keys(a, copy.deepcopy(a)) == []


@PROPERTY
@given(trees, trees)
def test_changed_keys_are_the_patch_leaves_that_differ(a: dict[str, Any], p: dict[str, Any]) -> None:
    old = dict(flatten(a))
    expected = sorted(path for path, v in flatten(p) if path not in old or old[path] != v)
    assert changed_keys(a, merge(a, p)) == expected


@PROPERTY
@given(trees, trees)
def test_changed_keys_is_symmetric_and_complete(a: dict[str, Any], b: dict[str, Any]) -> None:
    keys = changed_keys(a, b)
    assert keys == changed_keys(b, a) == sorted(set(keys))
    fa, fb = dict(flatten(a)), dict(flatten(b))
    for path in set(fa) | set(fb):
        assert (path in keys) == (fa.get(path, KeyError) != fb.get(path, KeyError))


def test_changed_keys_counts_added_and_removed_leaves() -> None:
    old = {"motd": "a", "kernel": {"sysctl": {"x.y": "1"}}}
    new = {"kernel": {"sysctl": {"x.y": "2", "z": "1"}}}
    assert changed_keys(old, new) == [("kernel", "sysctl", "x.y"), ("kernel", "sysctl", "z"), ("motd",)]


@settings(PROPERTY, max_examples=50)
@given(trees, st.lists(st.lists(st.sampled_from(TABLES + LEAVES), min_size=1, max_size=3).map(tuple), max_size=4))
def test_select_takes_existing_paths_only(t: dict[str, Any], paths: list[tuple[str, ...]]) -> None:
    out = select(t, paths)
    for path, value in flatten(out):
        assert get_path(t, path) == value
    for p in paths:
        try:
            want = get_path(t, p)
        except LookupError:
            continue
        assert get_path(out, p) == want


def test_get_path_names_the_missing_key() -> None:
    with pytest.raises(LookupError, match=r'kernel\.sysctl\."a\.b"'):
        get_path({"kernel": {"sysctl": {}}}, ("kernel", "sysctl", "a.b"))
    with pytest.raises(LookupError):
        get_path({"motd": "x"}, ("motd", "deeper"))
