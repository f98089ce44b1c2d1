"""Maintenance windows and check intervals: when the update daemon may reboot, and how often it looks.

`settings.updates.maintenance-windows` is a list of weekly windows (Zincati's `periodic`
strategy, which Kiln combines with the fleet lock):

    [[settings.updates.maintenance-windows]]
    days = ["sat", "sun"]
    start = "02:30"            # wall-clock time in time-zone
    length-minutes = 120
    time-zone = "UTC"          # UTC, a fixed offset (+05:30), or a zone name the host knows

No window means any time. Downloading and writing the inactive slot happen any time; only
taking the lock and rebooting wait for a window. Pure functions of the settings and a clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, timezone, tzinfo
from typing import Any

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_INTERVAL = re.compile(r"\A([1-9][0-9]{0,6})(s|m|h|d)\Z")
_OFFSET = re.compile(r"\A(?:UTC)?([+-])([01][0-9]|2[0-3]):([0-5][0-9])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> timedelta:
    """'90s', '30m', '1h', '2d' -> timedelta; ValueError names the text."""
    m = _INTERVAL.fullmatch(text)
    if not m:
        raise ValueError(f"'{text}' is not a whole number followed by s, m, h or d (e.g. 1h)")
    return timedelta(seconds=int(m[1]) * _UNITS[m[2]])


def zone(name: str) -> tzinfo:
    """UTC, a fixed offset, or an IANA zone from the host's zone database; ValueError otherwise."""
    if name in ("UTC", "Z", ""):
        return UTC
    m = _OFFSET.fullmatch(name)
    if m:
        delta = timedelta(hours=int(m[2]), minutes=int(m[3]))
        return timezone(-delta if m[1] == "-" else delta)
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"time zone '{name}' is not known on this host (use UTC or an offset like +02:00)") from None


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start: time
    length: timedelta
    tz: tzinfo
    text: str  # as the settings said it, for messages

    @classmethod
    def from_settings(cls, raw: dict[str, Any]) -> Window:
        days = [str(d).lower()[:3] for d in raw.get("days") or DAYS]
        hh, mm = (int(x) for x in str(raw.get("start", "00:00")).split(":"))
        minutes = int(raw.get("length-minutes", 60))
        tz_name = str(raw.get("time-zone", "UTC"))
        text = f"{','.join(days)} {hh:02d}:{mm:02d} {tz_name} for {minutes} min"
        return cls(frozenset(DAYS.index(d) for d in days), time(hh, mm), timedelta(minutes=minutes), zone(tz_name),
                   text)

    def spans(self, now: datetime) -> list[tuple[datetime, datetime]]:
        """This window's occurrences from a week before `now` to a week after (in UTC)."""
        local = now.astimezone(self.tz)
        out = []
        for offset in range(-8, 9):
            day = (local + timedelta(days=offset)).date()
            if day.weekday() in self.days:
                start = datetime.combine(day, self.start, self.tz).astimezone(UTC)
                out.append((start, start + self.length))
        return out


@dataclass(frozen=True)
class WindowState:
    open: bool
    opens_at: datetime | None  # when closed: the next opening
    closes_at: datetime | None  # when open: its end (None: no windows, always open)
    window: str = ""


def check(windows: list[Window], now: datetime) -> WindowState:
    """Is a reboot allowed now, and if not, when next?"""
    if not windows:
        return WindowState(True, None, None)
    best_open: tuple[datetime, str] | None = None
    next_open: tuple[datetime, str] | None = None
    for w in windows:
        for start, end in w.spans(now):
            if start <= now < end and (best_open is None or end > best_open[0]):
                best_open = (end, w.text)
            elif start > now and (next_open is None or start < next_open[0]):
                next_open = (start, w.text)
    if best_open:
        return WindowState(True, None, best_open[0], best_open[1])
    return WindowState(False, next_open[0] if next_open else None, None, next_open[1] if next_open else "")
