"""Update waves, the update choice and migration paths, against Bottlerocket's semantics.

The wave checks compare `kiln.host.update.waves` with an independent transliteration of
Bottlerocket's `Update::update_wave` / `Update::update_ready` (update_metadata), kept
branch for branch (Initial / General / Last waves, has_started / has_passed, the host's
*absolute* seed times the wave's time per seed), computed in whole microseconds so that
the reference itself cannot overflow.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kiln.host.update import waves
from kiln.host.update.manifest import Choice, Host, Image, Manifest, ManifestError, Update, Version, choose
from kiln.repo import schedule

MAX_SEED = 2048
US = timedelta(microseconds=1)
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)  # wave times stay below this (datetime ends at 9999)


# --- the reference: Bottlerocket's update_wave / update_ready -------------------------------------


def _us(t: datetime) -> int:
    return (t - EPOCH) // US


def update_wave(wave_map: dict[int, datetime], seed: int) -> tuple[str, dict[str, Any]] | None:
    """Bottlerocket's `update_wave`: the last wave starting below the seed (range 0..seed,
    end excluded) and the first one at or above it (seed..=MAX_SEED)."""
    start = [(s, t) for s, t in sorted(wave_map.items()) if 0 <= s < seed]
    end = [(s, t) for s, t in sorted(wave_map.items()) if seed <= s <= MAX_SEED]
    start_wave = start[-1] if start else None
    end_wave = end[0] if end else None
    if start_wave is None and end_wave is not None:
        return "Initial", {"end_seed": end_wave[0], "end_time": end_wave[1]}
    if start_wave is not None and end_wave is not None:
        return "General", {"start_time": start_wave[1], "end_time": end_wave[1],
                           "start_seed": start_wave[0], "end_seed": end_wave[0]}
    if start_wave is not None and end_wave is None:
        return "Last", {"start_time": start_wave[1], "start_seed": start_wave[0]}
    return None


def has_started(wave: tuple[str, dict[str, Any]], time: datetime) -> bool:
    kind, w = wave
    if kind == "Initial":
        return True
    return bool(w["start_time"] <= time)


def has_passed(wave: tuple[str, dict[str, Any]], time: datetime) -> bool:
    kind, w = wave
    if kind in ("General", "Initial"):
        return bool(w["end_time"] <= time)
    return bool(w["start_time"] <= time)


def update_ready(wave_map: dict[int, datetime], seed: int, time: datetime) -> bool:
    """Bottlerocket's `update_ready`."""
    wave = update_wave(wave_map, seed)
    if wave is not None:
        if has_passed(wave, time):
            return True
        if not has_started(wave, time):
            return False
        kind, w = wave
        if kind == "Initial":
            bound = None
        elif kind == "General":
            bound = (w["start_time"], w["end_time"], w["start_seed"], w["end_seed"])
        else:
            bound = (w["start_time"], None, w["start_seed"], MAX_SEED)
        if bound is not None and bound[1] is not None:
            start_time, end_time, start_seed, end_seed = bound
            seeds_in_wave = end_seed - start_seed
            if seeds_in_wave == 0:
                return True
            time_per_seed = (_us(end_time) - _us(start_time)) // seeds_in_wave
            target = _us(start_time) + time_per_seed * seed
            return _us(time) >= target
    return True


# --- strategies -----------------------------------------------------------------------------------


@st.composite
def wave_maps(draw: st.DrawFn) -> dict[int, datetime]:
    """0..12 waves: start seeds in 0..2048 (neighbours or far apart), strictly increasing
    times with µs precision between the years 2000 and 9000, close together or far apart."""
    start = draw(st.integers(0, MAX_SEED) | st.integers(1800, MAX_SEED))
    steps = draw(st.lists(st.integers(1, 3) | st.integers(1, 1000), max_size=12))
    keys = [k for k in itertools.accumulate(steps, initial=start) if k <= MAX_SEED][: len(steps)]
    times = st.datetimes(EPOCH.replace(tzinfo=None), LATEST.replace(tzinfo=None), timezones=st.just(UTC))
    return dict(zip(keys, sorted(draw(st.lists(times, min_size=len(keys), max_size=len(keys), unique=True))),
                    strict=True))


@st.composite
def moments(draw: st.DrawFn, wave_map: dict[int, datetime]) -> datetime:
    """A time near one of the waves (to the microsecond), or anywhere."""
    if wave_map and draw(st.booleans()):
        base = draw(st.sampled_from(sorted(wave_map.values())))
        return base + draw(st.integers(-3, 3)) * US
    return EPOCH + draw(st.integers(-10**6, _us(LATEST))) * US


seeds = st.integers(0, MAX_SEED - 1)


@st.composite
def host_seeds(draw: st.DrawFn, wave_map: dict[int, datetime]) -> int:
    """Any seed, or one next to a wave's start seed."""
    if wave_map and draw(st.booleans()):
        return min(MAX_SEED - 1, max(0, draw(st.sampled_from(sorted(wave_map))) + draw(st.integers(-2, 2))))
    return draw(seeds)


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[int, datetime], int, list[datetime]]:
    wave_map = draw(wave_maps())
    return wave_map, draw(host_seeds(wave_map)), [draw(moments(wave_map)) for _ in range(4)]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
@example(case=({0: EPOCH, 20: EPOCH + timedelta(days=1)}, 20, [EPOCH + timedelta(hours=h) for h in (0, 23, 24)]))
@example(case=({2000: EPOCH, 2001: LATEST}, 2001, [EPOCH, LATEST - US, LATEST]))  # time per seed × seed overflows
def test_is_ready_matches_bottlerocket(case: tuple[dict[int, datetime], int, list[datetime]]) -> None:
    wave_map, seed, times = case
    for now in times:
        assert waves.is_ready(wave_map, seed, now) == update_ready(wave_map, seed, now), (wave_map, seed, now)


@settings(max_examples=600, deadline=None)
@given(case=cases())
@example(case=({2000: EPOCH, 2001: LATEST}, 2001, []))
@example(case=({0: EPOCH, 2048: EPOCH + 2047 * US}, 2047, []))  # under a µs per seed: ready at the start
def test_ready_at_is_the_first_ready_moment(case: tuple[dict[int, datetime], int, list[datetime]]) -> None:
    wave_map, seed, _ = case
    at = waves.ready_at(wave_map, seed)
    if at is None:  # ready at any time
        for now in (EPOCH - timedelta(days=365), *wave_map.values(), LATEST):
            assert update_ready(wave_map, seed, now)
        return
    assert not update_ready(wave_map, seed, at - US), (wave_map, seed, at)
    assert update_ready(wave_map, seed, at), (wave_map, seed, at)
    assert update_ready(wave_map, seed, at + timedelta(days=30))
    assert min(wave_map.values()) <= at <= max(wave_map.values())


def test_reference_agrees_with_bottlerocket_unit_tests() -> None:
    """Bottlerocket's own cases (update_metadata's tests), run against the reference and Kiln."""
    ms = timedelta(milliseconds=1)
    one = {0: EPOCH, MAX_SEED: EPOCH + MAX_SEED * ms}
    for seed in range(100, 500, 100):
        for ready in (update_ready, waves.is_ready):
            assert not ready(one, seed, EPOCH + (seed - 1) * ms)
            assert ready(one, seed, EPOCH + seed * ms)
    four = {0: EPOCH, 50: EPOCH + 200 * ms, 100: EPOCH + 1024 * ms, 1024: EPOCH + 4096 * ms}
    position = (1024 - 200) // (100 - 50) * 60  # seed 60 in the second wave: its absolute seed counts
    for ready in (update_ready, waves.is_ready):
        assert not any(ready(four, 60, EPOCH + d * ms) for d in range(0, position, 2))
        assert all(ready(four, 60, EPOCH + 200 * ms + d * ms) for d in range(position, 1024, 4))
        assert all(ready(four, 60, EPOCH + d * ms) for d in range(1024, 4096, 8))
    last = {0: EPOCH - timedelta(hours=3), 256: EPOCH - timedelta(hours=2), 512: EPOCH - timedelta(hours=1)}
    assert update_ready(last, 1024, EPOCH) and waves.is_ready(last, 1024, EPOCH)
    assert update_ready({}, 7, EPOCH) and waves.ready_at({}, 7) is None


# --- wave seeds and offsets ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("default", [0, 20, 102, 307, 819, 1228, 1843]),
    ("accelerated", [0, 102, 409, 1024, 1638]),
    ("slow", [0, 20, 61, 102, 204, 307, 409, 614, 819, 1024, 1228, 1536, 1843]),
    ("ohno", [0, 102, 409, 819, 1228, 1638]),
])
def test_wave_seeds_of_the_builtin_schedules(name: str, expected: list[int]) -> None:
    """Bottlerocket's float32 arithmetic: (pct as f32 / 100) * 2048 as f32, truncated."""
    plan = schedule.load(name)
    assert waves.wave_seeds([w.fleet_percentage for w in plan.waves]) == expected
    start = datetime(2026, 5, 1, 9, tzinfo=UTC)
    at = plan.at(start)
    assert list(at) == expected
    assert [at[s] - start for s in expected] == [w.start_after for w in plan.waves]


def test_wave_seeds_edges() -> None:
    assert waves.wave_seeds([]) == []
    assert waves.wave_seeds([100]) == [0]
    assert waves.wave_seeds([50, 100]) == [0, 1024]
    assert waves.wave_seeds([99, 100]) == [0, 2027]  # 0.99f * 2048 = 2027.52


@pytest.mark.parametrize(("text", "seconds"), [
    ("90 minutes", 5400), ("1 minute", 60), ("1 hour", 3600), ("4 hours", 14400), ("2 days", 172800),
    ("1 week", 604800), ("3 Weeks", 3 * 604800), ("30 seconds", 30), ("0 days", 0),
])
def test_parse_offset(text: str, seconds: int) -> None:
    assert waves.parse_offset(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(("text", "words"), [
    ("", "is not '<number> <unit>'"),
    ("4", "is not '<number> <unit>'"),
    ("four hours", "is not '<number> <unit>'"),
    ("1.5 hours", "is not '<number> <unit>'"),
    ("-1 hour", "is not '<number> <unit>'"),
    ("1 hour later", "is not '<number> <unit>'"),
    ("2 fortnights", "unknown unit 'fortnights'"),
    ("3 ms", "unknown unit 'ms'"),
])
def test_parse_offset_errors_name_the_text(text: str, words: str) -> None:
    with pytest.raises(ValueError) as err:
        waves.parse_offset(text)
    assert f"'{text}'" in str(err.value) and words in str(err.value)


# --- choose ---------------------------------------------------------------------------------------

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
SHA = "0" * 64


def release(version: str, *, max_version: str | None = None, variant: str = "container-host",
            arch: str = "amd64", wave_map: dict[int, datetime] | None = None) -> Update:
    images = {k: Image(f"{variant}-{arch}-{version}-{k}.img.zst", 4096, SHA) for k in ("boot", "root", "hash")}
    return Update(variant, arch, Version.parse(version), Version.parse(max_version or version), wave_map or {},
                  images, SHA, SHA, 1)


def manifest(*updates: Update) -> Manifest:
    """As `kiln repo add` leaves it: every release of a variant/arch shares the highest max_version."""
    top: dict[tuple[str, str], Version] = {}
    for u in updates:
        key = (u.variant, u.arch)
        top[key] = max(top.get(key, u.max_version), u.max_version)
    return Manifest([replace(u, max_version=top[(u.variant, u.arch)]) for u in updates], {})


def host(version: str = "1.0.0", **kw: Any) -> Host:
    return Host("container-host", "amd64", Version.parse(version), kw.pop("seed", 100), **kw)


def chosen(c: Choice) -> str | None:
    return str(c.update.version) if c.update else None


def test_choose_filters_variant_and_arch() -> None:
    m = manifest(release("1.1.0", variant="other"), release("1.2.0", arch="arm64"), release("1.0.5"))
    c = choose(m, host(), NOW)
    assert (chosen(c), c.available, c.reason) == ("1.0.5", [Version(1, 0, 5)], "")
    none = choose(manifest(release("1.1.0", variant="other")), host(), NOW)
    assert (none.update, none.available) == (None, [])
    assert none.reason == "the repository has no release for variant container-host (amd64)"


def test_choose_takes_the_newest_and_lists_newest_first() -> None:
    m = manifest(release("1.1.0"), release("1.3.0"), release("0.9.0"), release("1.2.0"))
    c = choose(m, host(), NOW)
    assert chosen(c) == "1.3.0"
    assert [str(v) for v in c.available] == ["1.3.0", "1.2.0", "1.1.0", "0.9.0"]
    newest = choose(m, host("1.3.0"), NOW)
    assert newest.update is None and newest.reason == "1.3.0 is the newest release for container-host"


def test_choose_skips_versions_above_max_version() -> None:
    m = Manifest([release("1.1.0", max_version="1.1.0"), release("1.2.0", max_version="1.1.0")], {})
    c = choose(m, host(), NOW)
    assert chosen(c) == "1.1.0" and [str(v) for v in c.available] == ["1.2.0", "1.1.0"]


def test_lowered_max_version_forces_a_downgrade() -> None:
    m = Manifest([release("1.1.0", max_version="1.1.0"), release("2.0.0", max_version="1.1.0")], {})
    assert chosen(choose(m, host("2.0.0"), NOW)) == "1.1.0"
    assert chosen(choose(m, host("1.5.0"), NOW)) == "1.1.0"  # not published, but above the max
    assert chosen(choose(m, host("1.1.0"), NOW)) is None


def test_version_lock_is_exact_and_may_go_down() -> None:
    m = manifest(release("1.1.0"), release("1.2.0"), release("2.0.0"))
    assert chosen(choose(m, host(version_lock="1.2.0"), NOW)) == "1.2.0"
    assert chosen(choose(m, host("2.0.0", version_lock="1.1.0"), NOW)) == "1.1.0"
    running = choose(m, host("1.2.0", version_lock="1.2.0"), NOW)
    assert running.update is None
    assert running.reason == "locked to 1.2.0 (settings.updates.version-lock), which is running"
    missing = choose(m, host(version_lock="1.5.0"), NOW)
    assert missing.reason == "locked to 1.5.0 (settings.updates.version-lock), not in the repository"
    with pytest.raises(ManifestError, match=r"settings\.updates\.version-lock: 'soon' is not MAJOR\.MINOR\.PATCH"):
        choose(m, host(version_lock="soon"), NOW)


def test_waves_hold_back_and_say_when() -> None:
    later = {0: NOW + timedelta(hours=1), 20: NOW + timedelta(hours=4), 102: NOW + timedelta(days=1)}
    m = manifest(release("1.1.0"), release("1.2.0", wave_map=later))
    c = choose(m, host(seed=500), NOW)  # the last wave: it opens in a day
    assert chosen(c) == "1.1.0" and c.ready_at is None  # the older release has no waves
    only = manifest(release("1.2.0", wave_map=later))
    c = choose(only, host(seed=500), NOW)
    assert c.update is None and c.ready_at == NOW + timedelta(days=1)
    assert c.reason == "1.2.0 is out, but this host's wave (seed 500) opens at 2026-06-02T12:00:00Z"
    assert chosen(choose(only, host(seed=500), NOW + timedelta(days=1))) == "1.2.0"
    assert chosen(choose(only, host(seed=500, ignore_waves=True), NOW)) == "1.2.0"
    assert chosen(choose(only, host(seed=0), NOW)) == "1.2.0"  # below the first start seed: ready at once
    soonest = manifest(release("1.2.0", wave_map=later), release("1.3.0", wave_map={0: NOW + timedelta(hours=2)}))
    c = choose(soonest, host(seed=500), NOW)
    assert c.update is None and c.ready_at == NOW + timedelta(hours=2)
    assert c.reason.startswith("1.3.0 is out, but this host's wave (seed 500) opens at 2026-06-01T14:00:00Z")


# --- migration paths ------------------------------------------------------------------------------


def migrations(*pairs: tuple[str, str, list[str]]) -> Manifest:
    return Manifest([], {(Version.parse(a), Version.parse(b)): names for a, b, names in pairs})


def path(m: Manifest, a: str, b: str) -> list[str]:
    return m.migration_path(Version.parse(a), Version.parse(b))


def test_migration_path_forward_and_backward() -> None:
    m = migrations(("1.0.0", "1.1.0", ["a", "b"]), ("1.1.0", "1.2.0", ["c"]), ("1.2.0", "1.3.0", ["d"]))
    assert path(m, "1.0.0", "1.3.0") == ["a", "b", "c", "d"]
    assert path(m, "1.3.0", "1.0.0") == ["d", "c", "b", "a"]
    assert path(m, "1.1.0", "1.2.0") == ["c"]
    assert path(m, "1.2.0", "1.2.0") == []


def test_migration_path_takes_the_shortcut_with_the_highest_to() -> None:
    """Bottlerocket's test data: a shortcut from 1.1.0 to 1.5.0 skips what lies between."""
    m = migrations(("1.0.0", "1.1.0", ["migration_1.1.0_a", "migration_1.1.0_b"]),
                   ("1.1.0", "1.2.0", ["migration_1.2.0_a"]), ("1.2.0", "1.3.0", ["migration_1.3.0_a"]),
                   ("1.1.0", "1.5.0", ["migration_1.5.0_shortcut"]))
    assert path(m, "1.0.0", "1.5.0") == ["migration_1.1.0_a", "migration_1.1.0_b", "migration_1.5.0_shortcut"]
    assert path(m, "1.5.0", "1.0.0") == ["migration_1.5.0_shortcut", "migration_1.1.0_b", "migration_1.1.0_a"]
    # the shortcut overshoots a goal of 1.3.0: the highest TO not beyond it is taken instead
    assert path(m, "1.0.0", "1.3.0") == ["migration_1.1.0_a", "migration_1.1.0_b", "migration_1.2.0_a",
                                         "migration_1.3.0_a"]


def test_migration_path_gaps_need_no_migrations() -> None:
    m = migrations(("1.0.0", "1.1.0", ["a"]), ("1.5.0", "1.6.0", ["x"]))
    assert path(m, "1.1.0", "1.4.0") == []
    assert path(m, "1.2.0", "1.5.0") == []
    assert path(m, "1.0.0", "1.6.0") == ["a", "x"]
    assert path(m, "1.6.0", "1.0.0") == ["x", "a"]
    assert path(m, "1.0.0", "1.5.9") == ["a"]
    assert path(Manifest.empty(), "1.0.0", "9.0.0") == []


# --- manifest.json errors name the field ----------------------------------------------------------


def good_update() -> dict[str, Any]:
    return release("1.1.0", wave_map={0: NOW, 20: NOW + timedelta(hours=1)}).to_json()


def edited(change: Any) -> dict[str, Any]:
    doc = {"updates": [good_update()], "migrations": {"(1.0.0, 1.1.0)": ["migrate_1.1.0_x"]}}
    change(doc)
    return doc


def _set(where: str, value: Any) -> Any:
    """A change to the document: `where` is keys (and list indexes) separated by "/"."""
    def change(doc: dict[str, Any]) -> None:
        *parents, last = where.split("/")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return change


@pytest.mark.parametrize(("doc", "words"), [
    ([], "manifest.json: expected an object"),
    ({"updates": {}}, "manifest.json: updates: expected a list"),
    ({"updates": ["x"]}, "updates[0]: expected an object"),
    (edited(_set("updates/0/version", KeyError)), "updates[0].version: missing"),
    (edited(_set("updates/0/version", 110)), "updates[0].version: expected str, got int"),
    (edited(_set("updates/0/max_version", "1.1")), "updates[0].max_version: '1.1' is not MAJOR.MINOR.PATCH"),
    (edited(_set("updates/0/version", "1.1.0\n")), "updates[0].version: '1.1.0\n' is not MAJOR.MINOR.PATCH"),
    (edited(_set("updates/0/waves", [])), "updates[0].waves: expected an object"),
    (edited(_set("updates/0/waves/2049", "2026-06-01T12:00:00Z")), "updates[0].waves: '2049' is not a seed"),
    (edited(_set("updates/0/waves/-1", "2026-06-01T12:00:00Z")), "updates[0].waves: '-1' is not a seed"),
    (edited(_set("updates/0/waves/\u00b2", "2026-06-01T12:00:00Z")), "updates[0].waves: '\u00b2' is not a seed"),
    (edited(_set("updates/0/waves/20", "2026-06-01T11:00:00Z")), "updates[0].waves: wave times must increase"),
    (edited(_set("updates/0/waves/0", "2026-06-01T12:00:00")), "updates[0].waves.0: '2026-06-01T12:00:00' has no"),
    (edited(_set("updates/0/waves/0", "tomorrow")), "updates[0].waves.0: 'tomorrow' is not an RFC 3339 time"),
    (edited(_set("updates/0/images/root", KeyError)), "updates[0].images.root: missing"),
    (edited(_set("updates/0/images/boot/target", "../boot.img")),
     "updates[0].images.boot.target: '../boot.img' is not a plain file name"),
    (edited(_set("updates/0/images/boot/target", "boot.img\n")), "updates[0].images.boot.target: 'boot.img\n'"),
    (edited(_set("updates/0/images/hash/sha256", "ab")), "updates[0].images.hash.sha256: not a sha256 hex digest"),
    (edited(_set("updates/0/images/root/size", True)), "updates[0].images.root.size: expected int, got bool"),
    (edited(_set("updates/0/verity/root_hash", "X" * 64)), "updates[0].verity.root_hash: not a sha256 hex digest"),
    (edited(_set("updates/0/verity", KeyError)), "updates[0].verity: missing"),
    (edited(_set("updates/0/verity/data_blocks", "1")), "updates[0].verity.data_blocks: expected int, got str"),
    (edited(_set("updates/0/variant", None)), "updates[0].variant: expected str, got NoneType"),
    (edited(_set("migrations", [])), "manifest.json: migrations: expected an object"),
    (edited(_set("migrations/1.0.0->1.1.0", [])), "migrations: key '1.0.0->1.1.0' is not '(FROM, TO)'"),
    (edited(_set("migrations/(1.1.0, 1.0.0)", [])), "migrations.(1.1.0, 1.0.0): FROM must be lower than TO"),
    (edited(_set("migrations/(1.0.0, 1.1.0)", "x")), "migrations.(1.0.0, 1.1.0): expected a list of target names"),
    (edited(_set("migrations/(1.0.0, 1.1.0)", ["a/b"])), "migrations.(1.0.0, 1.1.0): expected a list of target"),
])
def test_manifest_errors_name_the_field(doc: Any, words: str) -> None:
    with pytest.raises(ManifestError) as err:
        Manifest.from_json(doc)
    assert words in str(err.value)
    with pytest.raises(ManifestError):  # the same through the bytes the agent downloads
        Manifest.from_bytes(json.dumps(doc).encode())


def test_manifest_bytes_that_are_not_json() -> None:
    for data in (b"", b"{", b"\xff\xfe", b"[1, 2"):
        with pytest.raises(ManifestError, match=r"manifest\.json is not JSON"):
            Manifest.from_bytes(data)


def test_manifest_round_trips() -> None:
    m = Manifest.from_json(edited(lambda doc: None))
    assert Manifest.from_bytes(m.to_bytes()) == m
    assert m.updates[0].waves == {0: NOW, 20: NOW + timedelta(hours=1)}
