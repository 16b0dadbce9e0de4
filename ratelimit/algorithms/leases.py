"""Concurrency leases: at most `limit` live leases per key, each with an expiry.

A lease table is a mapping of lease id to expiry time. A lease whose expiry
has passed is dead: its holder crashed or stopped renewing, and its slot is
free again. Holders renew well before expiry and release exactly once.

Taking a slot is not here: the backends take it inside their all-or-nothing
pass over a rule's checks (prune, count against the limit, add on commit).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping


def live(table: Mapping[str, float], now: float) -> int:
    """Count leases whose expiry is still in the future."""
    return sum(1 for expiry in table.values() if expiry > now)


def prune(table: MutableMapping[str, float], now: float) -> int:
    """Drop dead leases from `table` in place; return how many were dropped."""
    dead = [lease for lease, expiry in table.items() if expiry <= now]
    for lease in dead:
        del table[lease]
    return len(dead)


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
