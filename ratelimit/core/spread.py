"""When to tell a refused caller to come back: never earlier than honest, and spread.

The store answers each refusal with the earliest time *that* request could be
admitted, so callers refused at the same moment are all told the same instant,
and all but the first find the freed capacity taken again. `Spread` keeps, per
limit and caller key, the instant this process last told a refused caller; the
next refusal of that key is told no earlier than that instant plus what the
told caller will take: its units times the seconds a unit takes to come back
(`interval` for a bucket, period / amount for a window, service time / slots
for a full pool). For a token bucket that is exact: the k-th caller refused in
one interval can only be admitted k intervals later. For a fixed window it
spreads the callers over the next window rather than sending them all at its
start; for a full pool it is the line's estimate for the k-th place.

Process-local and cheap: another process may tell the same instant, and a
promise lapses once its instant has passed (the caller came back, and the
store now counts what it took, or it did not). A request that costs more than
a rate limit's capacity is never admitted: its wait is `math.inf`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from ..backends.base import BucketCheck, Check, CheckResult, LeaseCheck, StoreKey
from .holding import Holding
from .plan import SKIPPED, Plan, retry_after

#: Promises kept at most; past it, the lapsed ones are dropped (all, if none has lapsed).
MAX_PROMISES = 4096


class Spread:
    """An engine's promises to refused callers (see the module docstring)."""

    __slots__ = ("_clock", "_told", "holding")

    def __init__(self, holding: Holding, clock: Callable[[], float] = time.monotonic) -> None:
        self.holding = holding
        self._clock = clock
        #: Store key of a limit's caller -> the instant (on `clock`) last told.
        self._told: dict[StoreKey, float] = {}

    def refused(
        self,
        plan: Plan,
        results: Sequence[CheckResult | None],
        checks: Sequence[Check],
        slots: Sequence[int],
    ) -> float:
        """Seconds the caller of a refused request is told to wait, and promised.

        `checks[j]` decided limit `slots[j]`, whose answer is `results[slots[j]]`;
        the refused ones' honest waits are read from there (a full pool's with the
        engine's estimate filled in). `math.inf`: a rate limit can never admit it.
        """
        now = self._clock()
        told = self._told
        wait = 0.0  # relative to now: an unspread wait is the store's, exactly
        refused: list[StoreKey] = []
        for check, i in zip(checks, slots, strict=True):
            r = results[i]
            if r is None or r is SKIPPED or r.admitted:
                continue
            limit = plan.limits[i]
            if isinstance(check, LeaseCheck):
                service = self.holding.service.get((plan.rule.name, i), 0.0)
                gap = (service or retry_after(limit, r)) / check.limit
            else:
                if isinstance(check, BucketCheck):
                    units, capacity, per_unit = check.cost, check.burst, check.interval
                else:
                    units, capacity = check.cost, check.limit
                    per_unit = check.period / capacity
                if units > capacity:
                    return math.inf
                gap = units * per_unit
            after = retry_after(limit, r)
            key = check.key
            last = told.get(key)
            if last is not None and last > now and last - now + gap > after:
                after = last - now + gap
            if after > wait:
                wait = after
            refused.append(key)
        if len(told) >= MAX_PROMISES:
            for key in [k for k, t in told.items() if t <= now]:
                del told[key]
            if len(told) >= MAX_PROMISES:
                told.clear()
        due = now + wait
        for key in refused:
            told[key] = due
        return wait
