"""Concurrency leases: at most `limit` live leases per key, each with an expiry.

A lease table is a mapping of lease id to expiry time. A lease whose expiry
has passed is dead: its holder crashed or stopped renewing, and its slot is
free again. Holders renew well before expiry and release exactly once.

Taking a slot is not here: the backends take it inside their all-or-nothing
pass over a rule's checks (prune, count against the limit, add on commit).

Weights. A lease of a weighted pool (`Concurrency(counts=...)`) holds `w`
slots, and says so at the end of its id: `<id>*<w>` (`weighted_id`). The
weight travels with the id into every operation that sees it (release,
renewal, expiry, a ghost's undo, a hand-off from the line), so no store needs
another field or key for it. An id without the mark holds one slot: an
unweighted pool's ids carry none and are counted as before, by their number.
Every lease of one pool is marked, or none is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping

#: What separates a lease id from its weight (`weighted_id`).
MARK = "*"


def weighted_id(lease_id: str, weight: int) -> str:
    """The id of a lease holding `weight` slots of a weighted pool."""
    return f"{lease_id}{MARK}{weight}"


def weight_of(lease_id: str) -> int:
    """Slots a lease holds: the weight its id ends with, else 1."""
    if MARK not in lease_id:
        return 1
    _, _, tail = lease_id.rpartition(MARK)
    return int(tail) if tail.isascii() and tail.isdigit() else 1


def held(lease_ids: Iterable[str]) -> int:
    """Slots held by these leases (their weights summed)."""
    return sum(map(weight_of, lease_ids))


def live(table: Mapping[str, float], now: float) -> int:
    """Slots held by leases whose expiry is still in the future."""
    return sum(weight_of(lease) for lease, expiry in table.items() if expiry > now)


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
