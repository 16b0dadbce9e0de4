"""GCRA (generic cell rate algorithm): a token bucket stored as one number.

The state is the *theoretical arrival time* `tat`: the instant at which the
bucket would be full again. With `interval` seconds per unit (the emission
interval, period / amount) and `burst` units of capacity, a request of
`cost` units at `now` is admitted iff

    max(tat, now) + cost * interval - now <= burst * interval

i.e. `burst` unit-cost requests are admissible back-to-back from idle, and
capacity comes back at one unit per `interval`. A refused request leaves the
state untouched.

Floating point: every step is a single IEEE double operation in a fixed
order, so a Lua port doing the same operations gets bit-identical results.
"""

from __future__ import annotations

from typing import NamedTuple

#: Slack for comparisons, in seconds: absorbs float rounding in `tat` sums
#: (1 ns, far below any rate anyone configures).
EPSILON = 1e-9


class BucketResult(NamedTuple):
    """The outcome of one GCRA step."""

    admitted: bool
    #: The new state (equal to the old one when refused).
    tat: float
    #: Whole units that could still be admitted right now, after this step.
    remaining: int
    #: Seconds until this request could be admitted (0 when admitted).
    retry_after: float
    #: Seconds until the bucket is full again (the key may be dropped then).
    reset_after: float


def gcra(tat: float | None, now: float, cost: int, interval: float, burst: int) -> BucketResult:
    """Decide one request of `cost` units against a bucket whose state is `tat`.

    `tat=None` means no state (a full bucket). `cost=0` peeks without consuming.
    The readable form of `gcra_tuple`, which computes it.
    """
    return BucketResult._make(gcra_tuple(tat, now, cost, interval, burst))


def refund(tat: float | None, now: float, cost: int, interval: float) -> float | None:
    """Give back `cost` units taken earlier; None when the bucket is full again.

    A negative cost charges that many units more, past the burst if need be: a
    settlement's debt, which later requests wait out (see `core.decision`).
    """
    base = tat if tat is not None and tat > now else now
    new_tat = base - cost * interval
    return None if new_tat <= now else new_tat


def gcra_tuple(
    tat: float | None, now: float, cost: int, interval: float, burst: int
) -> tuple[bool, float, int, float, float]:
    """`gcra`'s step as a plain tuple of `BucketResult`'s fields: the one implementation.

    The memory backend's per-request step unpacks it: building a NamedTuple
    would cost as much again as the arithmetic here.
    """
    # Seconds of capacity in use, measured from `now`: every comparison is then between
    # numbers of the bucket's own size, so a burst-sized request from idle compares
    # burst * interval with itself (exactly), whatever the clock reads.
    used = tat - now if tat is not None and tat > now else 0.0
    capacity = burst * interval
    after = used + cost * interval
    if cost > 0 and after - capacity > EPSILON:
        # Refused: nothing is consumed.
        free = capacity - used
        remaining = int(free / interval + EPSILON) if free > 0 else 0
        return (False, tat if tat is not None else now, remaining, after - capacity, used)
    free = capacity - after
    # int() is floor here (the argument is positive), and cheaper than math.floor.
    remaining = int(free / interval + EPSILON) if free > 0 else 0
    return (True, now + after, remaining, 0.0, after)
