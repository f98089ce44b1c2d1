"""Maintenance windows and check intervals (kiln.host.update.windows), with a fixed clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kiln.host.update.windows import Window, check, parse_interval, zone

SAT_0100 = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)  # a Saturday


def win(**raw: object) -> Window:
    return Window.from_settings(dict(raw))


@pytest.mark.parametrize(("text", "seconds"), [("1s", 1), ("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800)])
def test_intervals(text: str, seconds: int) -> None:
    assert parse_interval(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0s", "1", "h", "1 h", "1hour", "-1h", "1.5h", "1h\n", "01h"])
def test_bad_intervals_name_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="is not a whole number"):
        parse_interval(text)


def test_no_window_means_any_time() -> None:
    st = check([], SAT_0100)
    assert st.open and st.opens_at is None and st.closes_at is None


def test_inside_a_window_says_when_it_closes() -> None:
    st = check([win(days=["sat"], start="00:30", **{"length-minutes": 60})], SAT_0100)
    assert st.open and st.closes_at == datetime(2026, 12, 5, 1, 30, tzinfo=UTC)
    assert st.window == "sat 00:30 UTC for 60 min"


def test_the_end_of_a_window_is_excluded_and_the_next_one_is_named() -> None:
    w = win(days=["sat", "sun"], start="00:00", **{"length-minutes": 60})
    st = check([w], SAT_0100)
    assert not st.open and st.opens_at == datetime(2026, 12, 6, 0, 0, tzinfo=UTC)


def test_a_window_crossing_midnight_and_a_week_boundary() -> None:
    w = win(days=["sun"], start="23:00", **{"length-minutes": 180})  # Sun 23:00 → Mon 02:00
    monday_0130 = datetime(2026, 12, 7, 1, 30, tzinfo=UTC)
    assert check([w], monday_0130).open
    assert not check([w], monday_0130 + timedelta(minutes=30)).open
    assert check([w], monday_0130 + timedelta(minutes=30)).opens_at == datetime(2026, 12, 13, 23, 0, tzinfo=UTC)


def test_time_zones_offsets_and_names() -> None:
    # 02:00 at +05:30 is 20:30 UTC the day before
    w = win(days=["sat"], start="02:00", **{"length-minutes": 30, "time-zone": "+05:30"})
    assert check([w], datetime(2026, 12, 4, 20, 45, tzinfo=UTC)).open
    assert not check([w], SAT_0100).open
    try:
        berlin = zone("Europe/Berlin")
    except ValueError:
        pytest.skip("no zone database on this machine")
    # Sat 02:00 in Berlin (UTC+1 in December) is Sat 01:00 UTC
    w = win(days=["sat"], start="02:00", **{"length-minutes": 10, "time-zone": "Europe/Berlin"})
    assert check([w], SAT_0100).open
    assert SAT_0100.astimezone(berlin).hour == 2


def test_daylight_saving_time_keeps_the_wall_clock() -> None:
    try:
        zone("Europe/Berlin")
    except ValueError:
        pytest.skip("no zone database on this machine")
    # 02:30 every day, Berlin; on 2027-03-28 the clocks jump 02:00 → 03:00: that window starts
    # at 03:30 local (01:30 UTC), not at a time that does not exist
    w = win(start="02:30", **{"length-minutes": 30, "time-zone": "Europe/Berlin"})
    before = datetime(2027, 3, 27, 1, 45, tzinfo=UTC)  # 02:45 CET: open
    after = datetime(2027, 3, 29, 0, 45, tzinfo=UTC)  # 02:45 CEST: open
    assert check([w], before).open and check([w], after).open


def test_several_windows_the_earliest_opening_and_the_latest_close() -> None:
    a = win(days=["sat"], start="00:00", **{"length-minutes": 90})
    b = win(days=["sat"], start="00:45", **{"length-minutes": 120})
    st = check([a, b], SAT_0100)
    assert st.open and st.closes_at == datetime(2026, 12, 5, 2, 45, tzinfo=UTC)
    c = win(days=["mon"], start="04:00", **{"length-minutes": 60})
    d = win(days=["sun"], start="04:00", **{"length-minutes": 60})
    assert check([c, d], SAT_0100 + timedelta(hours=5)).opens_at == datetime(2026, 12, 6, 4, 0, tzinfo=UTC)


@pytest.mark.parametrize("name", ["Mars/Olympus", "+25:00", "UTC+1"])
def test_unknown_zones_are_refused_by_name(name: str) -> None:
    with pytest.raises(ValueError, match="not known on this host"):
        zone(name)
