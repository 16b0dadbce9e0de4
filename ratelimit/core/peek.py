"""What `Limiter.peek` answers: each limit's verdict for a cost, from its untouched state.

The backend decides the rule at cost 0 (it takes and writes nothing); each
limit's answer for the real units is then computed from that state.
"""

from __future__ import annotations

from ..algorithms.gcra import gcra
from ..policy.limits import TokenBucket
from .decision import Decision
from .plan import SKIPPED, Plan


def would(plan: Plan, zero: Decision, taken: tuple[int, ...]) -> Decision:
    """The decision `taken` units per limit would get, from `zero` (the cost-0 decision).

    Exact for buckets and fixed windows; for a sliding or moving window the wait
    is when the window next frees units, which may be too few (a lower bound).
    """
    results = list(zero.results)
    allowed, status, wait = True, 503, 0.0
    for i, (limit, r) in enumerate(zip(plan.limits, results, strict=True)):
        if r is None or r is SKIPPED:
            continue
        units = taken[i]
        if isinstance(limit, TokenBucket):
            step = gcra(r.reset_after, 0.0, units, limit.interval, limit.burst)
            admitted, retry = step.admitted, step.retry_after
        else:
            admitted = r.remaining >= units
            retry = 0.0 if admitted else r.reset_after
        results[i] = r._replace(admitted=admitted, retry_after=retry)
        if not admitted:
            allowed = False
            status = 503 if limit.shared and status == 503 else 429
            wait = max(wait, retry)
    if allowed:
        return Decision(plan.rule, True, 200, 0.0, plan, results)
    return Decision(plan.rule, False, status, wait, plan, results)
