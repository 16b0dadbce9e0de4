"""Window limits: at most `limit` units per `period` seconds, three ways.

The strategies of the `limits` package, as pure state transitions (no I/O,
no clock: every function takes `now`):

- fixed: a counter for a window that opens at the first hit and lasts one
  period. State `(start, count)`.
- sliding (the "sliding window counter"): counters for the current and the
  previous window, windows aligned at multiples of `period`; the previous
  window's count is weighted by the part of it the sliding period still
  covers. State `(index, previous, current)` with `index = floor(now / period)`.
- moving: the exact log of hit times, oldest first, at most `limit` entries
  (older ones can never refuse anything). An entry counts while
  `entry > now - period`. State: a tuple of times.

`None` is the empty state (nothing counted): drop the key then. A step of
`cost` units admits iff the units counted plus `cost` stay within `limit`; a
refused step changes nothing; `cost=0` peeks. `refund` gives back a hit made
at time `at` exactly: it takes the units from the window (or log entries)
that hit went into, or nothing if that window is gone. A negative refund
charges units more (a settlement's debt): into the window the hit went into,
or the current one if that has closed; the count may then pass `limit`
(`remaining` stays 0 until it is back under).

Floating point: the Lua port (checks.lua) does the same operations in the same
order, so the two agree bit for bit; no `%` (Lua's and Python's differ).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

FixedState = tuple[float, int]
SlidingState = tuple[int, int, int]
MovingState = tuple[float, ...]


class WindowResult(NamedTuple):
    """The outcome of one window step."""

    admitted: bool
    #: The new state (the old one when refused or peeking); None: empty.
    state: Any
    #: Units that could still be admitted right now, after this step.
    remaining: int
    #: Seconds until this request could be admitted (0 when admitted).
    retry_after: float
    #: Seconds until the window resets as the `limits` package reports it
    #: (`WindowStats.reset_time - now`); 0 when nothing is counted.
    reset_after: float


# -- fixed ---------------------------------------------------------------------


def fixed(
    state: FixedState | None, now: float, cost: int, limit: int, period: float
) -> WindowResult:
    """One step of a fixed window (see the module docstring)."""
    if state is not None and now < state[0] + period:
        start, count = state
    else:
        state = None
        start, count = now, 0
    if cost > 0 and count + cost > limit:
        # Refused: wait for this window to end (a fresh window when none is open).
        left = start + period - now
        reset = left if state is not None else 0.0
        return WindowResult(False, state, max(0, limit - count), left, reset)
    if cost > 0:
        count = count + cost
        state = (start, count)
    reset = start + period - now if state is not None else 0.0
    return WindowResult(True, state, max(0, limit - count), 0.0, reset)


def refund_fixed(
    state: FixedState | None, now: float, cost: int, period: float, at: float
) -> FixedState | None:
    """Give back `cost` units hit at `at`, if that window is still the open one (a
    negative cost: charge them to it, or to the window open now)."""
    if state is None or now >= state[0] + period:
        if cost >= 0:
            return None
        state = (now, 0)  # a charge opens a window, as a hit would
    elif at < state[0] and cost >= 0:
        return state  # taken from a window that has closed since
    count = state[1] - cost
    return (state[0], count) if count > 0 else None


def fixed_idle_at(state: FixedState, period: float) -> float:
    """When a fixed window's state is empty again."""
    return state[0] + period


# -- sliding window counter -------------------------------------------------------


def _roll(state: SlidingState | None, index: int) -> tuple[int, int]:
    """(previous, current) counts seen from window `index`."""
    if state is None:
        return 0, 0
    at, previous, current = state
    if at == index:
        return previous, current
    if at == index - 1:
        return current, 0
    return 0, 0


def sliding(
    state: SlidingState | None, now: float, cost: int, limit: int, period: float
) -> WindowResult:
    """One step of a sliding window counter (see the module docstring)."""
    index = math.floor(now / period)
    previous, current = _roll(state, index)
    # The part of the current window still to come: the previous window's weight.
    left = (index + 1) - now / period
    weighted = math.floor(previous * left + current)
    if cost > 0 and weighted + cost > limit:
        retry = _sliding_retry(previous, current, index, now, cost, limit, period)
        reset = _sliding_reset(previous, current, left, period)
        return WindowResult(False, state, max(0, limit - weighted), retry, reset)
    if cost > 0:
        current = current + cost
        weighted = math.floor(previous * left + current)
        state = (index, previous, current)
    reset = _sliding_reset(previous, current, left, period)
    return WindowResult(True, state, max(0, limit - weighted), 0.0, reset)


def _sliding_retry(
    previous: int, current: int, index: int, now: float, cost: int, limit: int, period: float
) -> float:
    """Seconds until floor(weighted) + cost <= limit, the counts being as now."""
    target = limit - cost + 1  # admitted iff previous * left + current < target
    if target <= 0:
        return period  # more than the limit: never; a hint, as for a full bucket
    if current < target:
        # This window: previous * left < target - current, left = index + 1 - t / period.
        at = (index + 1) - (target - current) / previous
    else:
        # The next one, where this window's count is the previous.
        at = (index + 2) - target / current
    return max(0.0, at * period - now)


def _sliding_reset(previous: int, current: int, left: float, period: float) -> float:
    """`limits`' reset time, less now: the sooner of the previous window's weighted
    count dropping by one and the current window ending; 0 with nothing counted."""
    if not (previous or current):
        return 0.0
    reset = math.inf
    in_window = left * period
    if previous:
        step = period / previous
        reset = in_window - math.floor(in_window / step) * step
    if current:
        reset = min(reset, in_window)
    return reset


def refund_sliding(
    state: SlidingState | None, now: float, cost: int, period: float, at: float
) -> SlidingState | None:
    """Give back `cost` units hit at `at` from the window they were counted in."""
    index = math.floor(now / period)
    previous, current = _roll(state, index)
    hit = math.floor(at / period)
    if hit == index or cost < 0:
        # A charge for a window that has rolled out of the sliding period: this one.
        current = max(0, current - cost)
    elif hit == index - 1:
        previous = max(0, previous - cost)
    if not (previous or current):
        return None
    return (index, previous, current)


def sliding_idle_at(state: SlidingState, period: float) -> float:
    """When a sliding window's state is empty again: the end of the next window."""
    return (state[0] + 2) * period


# -- moving window ------------------------------------------------------------------


def _live(state: MovingState | None, now: float, period: float) -> MovingState:
    """The entries still counted at `now`."""
    if not state:
        return ()
    edge = now - period
    if state[0] > edge:
        return state
    first = 0
    while first < len(state) and state[first] <= edge:
        first += 1
    return state[first:]


def moving(
    state: MovingState | None, now: float, cost: int, limit: int, period: float
) -> WindowResult:
    """One step of a moving window (see the module docstring)."""
    log = _live(state, now, period)
    count = len(log)
    if cost > 0 and count + cost > limit:
        # Until enough of the oldest entries have left; more than the limit: never
        # (`period`, a hint, as for a full bucket).
        retry = period if cost > limit else log[count + cost - limit - 1] + period - now
        reset = log[0] + period - now if log else 0.0
        return WindowResult(False, state, max(0, limit - count), retry, reset)
    if cost > 0:
        log = log + (now,) * cost
        count += cost
        state = log
    elif not log:
        state = None
    reset = log[0] + period - now if log else 0.0
    return WindowResult(True, state, max(0, limit - count), 0.0, reset)


def refund_moving(
    state: MovingState | None, now: float, cost: int, period: float, at: float
) -> MovingState | None:
    """Remove `cost` entries made at `at` (entries of one time are alike), then, while
    that hit is still counted, the newest (a settlement's charges, made later); a
    negative cost adds entries made now."""
    log = list(_live(state, now, period))
    if cost < 0:
        return (*log, *(now,) * -cost)
    for _ in range(cost):
        try:
            log.remove(at)
        except ValueError:
            if at > now - period and log:
                log.pop()
            else:
                break
    return tuple(log) or None


def moving_idle_at(state: MovingState, period: float) -> float:
    """When a moving window's log is empty again: its newest entry leaves."""
    return state[-1] + period


Step = Callable[[Any, float, int, int, float], WindowResult]
Refund = Callable[[Any, float, int, float, float], Any]
IdleAt = Callable[[Any, float], float]

#: strategy name -> (step, refund, idle_at)
STRATEGIES: dict[str, tuple[Step, Refund, IdleAt]] = {
    "fixed": (fixed, refund_fixed, fixed_idle_at),
    "sliding": (sliding, refund_sliding, sliding_idle_at),
    "moving": (moving, refund_moving, moving_idle_at),
}
