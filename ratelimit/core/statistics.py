"""`LimitStatistics`: how full a concurrency limit is now (trio's `CapacityLimiter.statistics`).

The counts come from the backend: on `MemoryBackend` this process's slots and
line; on `RedisBackend` the fleet's (one `in_use` and one `queue_length` call
per limit, each one small script).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backends.base import Backend, QueueBackend, StoreKey
from ..policy.limits import Concurrency
from .plan import Plan


@dataclass(frozen=True, slots=True)
class LimitStatistics:
    """One concurrency limit of a rule, for one key, at one moment."""

    rule: str
    #: The limit's policy name (as in header fields and metrics).
    limit: str
    #: Slots the limit has (overrides included).
    total: int
    #: Slots held now by leases alive in the store (a weighted limit's leases count
    #: their weights).
    in_flight: int
    #: Requests waiting in the limit's line now (0 without a line).
    waiting: int


async def gather(
    plan: Plan, texts: tuple[str | None, ...], backend: Backend
) -> tuple[LimitStatistics, ...]:
    """The statistics of every concurrency limit of `plan` for the caller `texts` (per limit:
    the caller's text, None for an exempt limit, skipped here)."""
    out = []
    for i, limit in enumerate(plan.limits):
        if not isinstance(limit, Concurrency):
            continue
        fixed = plan.fixed[i]
        text = texts[i]
        if fixed is None and text is None:
            continue
        entry = fixed if fixed is not None else plan.entry(i, text or "")
        key = entry if isinstance(entry, StoreKey) else entry[0]
        in_use = await backend.in_use(key)
        waiting = 0
        if limit.queue and isinstance(backend, QueueBackend):
            waiting = await backend.queue_length(key)
        out.append(LimitStatistics(plan.rule.name, plan.names[i], limit.limit, in_use, waiting))
    return tuple(out)
