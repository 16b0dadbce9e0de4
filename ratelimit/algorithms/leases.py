"""Concurrency leases: at most `limit` live leases per key, each with an expiry.

A lease table is a mapping of lease id to expiry time. A lease whose expiry
has passed is dead: its holder crashed or stopped renewing, and its slot is
free again. Holders renew well before expiry and release exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import NamedTuple


class LeaseResult(NamedTuple):
    """The outcome of one acquire."""

    admitted: bool
    #: Live leases after this step (including the new one when admitted).
    in_use: int
    #: Slots still free after this step.
    remaining: int


def live(table: Mapping[str, float], now: float) -> int:
    """Count leases whose expiry is still in the future."""
    return sum(1 for expiry in table.values() if expiry > now)


def prune(table: MutableMapping[str, float], now: float) -> int:
    """Drop dead leases from `table` in place; return how many were dropped."""
    dead = [lease for lease, expiry in table.items() if expiry <= now]
    for lease in dead:
        del table[lease]
    return len(dead)


def acquire(
    table: MutableMapping[str, float], lease_id: str, now: float, limit: int, ttl: float
) -> LeaseResult:
    """Grant `lease_id` a slot until `now + ttl` if fewer than `limit` are live.

    Dead leases are pruned first, so a crashed holder never blocks a slot
    longer than its ttl. Refusal changes nothing but that pruning.
    """
    prune(table, now)
    in_use = len(table)
    if in_use >= limit:
        return LeaseResult(admitted=False, in_use=in_use, remaining=0)
    table[lease_id] = now + ttl
    return LeaseResult(admitted=True, in_use=in_use + 1, remaining=limit - in_use - 1)


def can_acquire(table: Mapping[str, float], now: float, limit: int) -> bool:
    """Whether `acquire` would admit right now (a peek for all-or-nothing checks)."""
    return live(table, now) < limit


def renew(table: MutableMapping[str, float], lease_id: str, now: float, ttl: float) -> bool:
    """Push a live lease's expiry to `now + ttl`; False if it was already dead or gone."""
    expiry = table.get(lease_id)
    if expiry is None or expiry <= now:
        table.pop(lease_id, None)
        return False
    table[lease_id] = now + ttl
    return True


def release(table: MutableMapping[str, float], lease_id: str) -> bool:
    """Remove a lease; False if it was not there (already released or expired)."""
    return table.pop(lease_id, None) is not None
