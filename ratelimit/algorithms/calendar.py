"""Calendar quotas: an allowance per UTC day or month, as a pure state transition.

The period containing a unix time `now` starts at midnight UTC (a day) or at
00:00 UTC on the 1st (a month) and ends where the next one starts; month
lengths and leap years come from the proleptic Gregorian calendar (Howard
Hinnant's `days_from_civil` / `civil_from_days`, integer arithmetic on days).

A quota's state is `(start, count)`: the units counted in the period starting
at `start`. A state of an earlier period counts nothing. A step of `cost` units
admits iff `count + cost <= limit`; a refused step changes nothing; `cost=0`
peeks. `retry_after` of a refusal and `reset_after` are the seconds to the
period's end, when the allowance returns.

The Lua port (window.lua) does the same operations in the same order; no `%`
(Lua's and Python's differ on negative numbers), only `math.floor` of divisions.
"""

from __future__ import annotations

import math
from typing import Any

from .window import IdleAt, Refund, Step, WindowResult

DAY = 86400
#: The calendar units a quota may count per.
UNITS = ("day", "month")

QuotaState = tuple[float, int]


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a Gregorian date."""
    year -= 1 if month <= 2 else 0
    era = math.floor(year / 400)
    yoe = year - era * 400
    doy = math.floor((153 * (month - 3 if month > 2 else month + 9) + 2) / 5) + day - 1
    doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
    return era * 146097 + doe - 719468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """The Gregorian (year, month, day) of `days` since 1970-01-01."""
    z = days + 719468
    era = math.floor(z / 146097)
    doe = z - era * 146097
    yoe = math.floor(
        (doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365
    )
    doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    mp = math.floor((5 * doy + 2) / 153)
    day = doy - math.floor((153 * mp + 2) / 5) + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if month <= 2 else 0), month, day


def bounds(unit: str, now: float) -> tuple[int, int]:
    """(start, end) in unix seconds of the UTC day or month containing `now`."""
    days = math.floor(now / DAY)
    if unit == "day":
        return days * DAY, (days + 1) * DAY
    year, month, _ = civil_from_days(days)
    start = days_from_civil(year, month, 1)
    end = days_from_civil(year + 1, 1, 1) if month == 12 else days_from_civil(year, month + 1, 1)
    return start * DAY, end * DAY


def quota(state: QuotaState | None, now: float, cost: int, limit: int, unit: str) -> WindowResult:
    """One step of a calendar quota (see the module docstring)."""
    start, end = bounds(unit, now)
    count = state[1] if state is not None and state[0] == start else 0
    left = end - now
    if cost > 0 and count + cost > limit:
        return WindowResult(False, state, max(0, limit - count), left, left)
    if cost > 0:
        count += cost
        state = (start, count)
    return WindowResult(True, state, max(0, limit - count), 0.0, left)


def refund_quota(
    state: QuotaState | None, now: float, cost: int, unit: str, at: float
) -> QuotaState | None:
    """Give back `cost` units hit at `at`, if that period is still the current one (a
    negative cost: charge them to the current period)."""
    start, _ = bounds(unit, now)
    if state is None or state[0] != start:
        if cost >= 0:
            return None
        state = (start, 0)
    elif at < start and cost >= 0:
        return state  # taken in a period that has ended since
    count = state[1] - cost
    return (start, count) if count > 0 else None


def idle_at(state: QuotaState, unit: str) -> float:
    """When a quota's state counts nothing any more: the end of its period."""
    return float(bounds(unit, state[0])[1])


def _strategy(unit: str) -> tuple[Step, Refund, IdleAt]:
    """`quota` for `unit` in the shape of `window.STRATEGIES` (whose `period` it ignores)."""

    def step(state: QuotaState | None, now: float, cost: int, limit: int, _: float) -> WindowResult:
        return quota(state, now, cost, limit, unit)

    def refund(state: QuotaState | None, now: float, cost: int, _: float, at: float) -> Any:
        return refund_quota(state, now, cost, unit, at)

    def idle(state: QuotaState, _: float) -> float:
        return idle_at(state, unit)

    return step, refund, idle


#: unit -> (step, refund, idle_at), as `window.STRATEGIES`; times are unix seconds.
STRATEGIES: dict[str, tuple[Step, Refund, IdleAt]] = {unit: _strategy(unit) for unit in UNITS}
