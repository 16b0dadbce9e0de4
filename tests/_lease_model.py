"""Taking a lease, written plainly: the contract the backends' all-or-nothing pass keeps.

The backends take a slot inside one pass over a rule's checks (the memory
backend in `decide_nowait`, Redis in `checks.lua`); this is that step for one
lease alone, the model the Lua differential test and the lease tests use.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import NamedTuple

from ratelimit.algorithms import leases


class LeaseResult(NamedTuple):
    """The outcome of one acquire."""

    admitted: bool
    #: Slots held after this step (including the new lease's when admitted).
    in_use: int
    #: Slots still free after this step.
    remaining: int


def acquire(
    table: MutableMapping[str, float], lease_id: str, now: float, limit: int, ttl: float
) -> LeaseResult:
    """Grant `lease_id` its weight in slots (1 unless its id is weighted) until
    `now + ttl` if that many of `limit` are free.

    Dead leases are pruned first, so a crashed holder never blocks a slot
    longer than its ttl. Refusal changes nothing but that pruning.
    """
    leases.prune(table, now)
    in_use = leases.held(table)
    need = leases.weight_of(lease_id)
    if in_use + need > limit:
        return LeaseResult(admitted=False, in_use=in_use, remaining=0)
    table[lease_id] = now + ttl
    return LeaseResult(admitted=True, in_use=in_use + need, remaining=limit - in_use - need)
