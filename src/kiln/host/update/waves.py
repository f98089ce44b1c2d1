"""Update waves: when a host with a given seed may take an update (Bottlerocket semantics).

A manifest entry's `waves` maps a *start seed* to the time that wave opens. A host's seed
(0..2047, `settings.updates.seed`) falls in the wave whose start seed is the largest one
strictly below it; the host's turn inside that wave is spread linearly over the wave's
duration. Bottlerocket spreads by the host's absolute seed (not its offset in the wave),
so hosts late in a wave usually wait for the wave's end; Kiln keeps that arithmetic so a
fleet moving from Bottlerocket keeps its schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

MAX_SEED = 2048


def ready_at(waves: Mapping[int, datetime], seed: int) -> datetime | None:
    """The moment an update with these waves becomes ready for `seed`; None: ready now."""
    if not waves:
        return None
    starts = sorted(waves)
    before = [s for s in starts if s < seed]
    after = [s for s in starts if s >= seed]
    if not before:
        # Below the first start seed: Bottlerocket treats it as ready at once.
        return None
    start_seed = before[-1]
    start = waves[start_seed]
    if not after:  # the last wave: everyone in it goes when it opens
        return start
    end_seed = after[0]
    end = waves[end_seed]
    # In whole microseconds: per seed truncated, as Bottlerocket's Duration; the wave's end
    # caps a large absolute seed (and keeps a far-off end from overflowing datetime).
    span = (end - start) // timedelta(microseconds=1)
    offset = span // (end_seed - start_seed) * seed
    return end if offset >= span else start + timedelta(microseconds=offset)


def is_ready(waves: Mapping[int, datetime], seed: int, now: datetime) -> bool:
    when = ready_at(waves, seed)
    return when is None or now >= when


def wave_seeds(percentages: list[int]) -> list[int]:
    """Start seeds for a schedule's waves: the first opens at seed 0, the next at the
    previous wave's fleet share of MAX_SEED (computed in float32 as Bottlerocket does,
    truncated)."""
    import struct

    if not percentages:
        return []
    seeds = [0]
    for pct in percentages[:-1]:
        f32 = struct.unpack("f", struct.pack("f", pct / 100))[0]
        seeds.append(int(struct.unpack("f", struct.pack("f", f32 * MAX_SEED))[0]))
    return seeds


def parse_offset(text: str) -> timedelta:
    """'90 minutes', '1 hour', '2 days', '1 week' -> timedelta; ValueError names the text."""
    units = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit():
        raise ValueError(f"'{text}' is not '<number> <unit>' (seconds, minutes, hours, days, weeks)")
    unit = parts[1].lower().removesuffix("s")
    if unit not in units:
        raise ValueError(f"'{text}': unknown unit '{parts[1]}' (seconds, minutes, hours, days, weeks)")
    return timedelta(seconds=int(parts[0]) * units[unit])
