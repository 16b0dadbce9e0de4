"""The memory backend's per-key structures: a lease table, and a waiting line."""

from __future__ import annotations

from ..algorithms import leases, queue

_INF = float("inf")


class LeaseTable(dict[str, float]):
    """Lease id -> expiry, remembering a lower bound of its earliest expiry.

    Renewals only push expiries later, so `earliest` may be stale but never
    too late: while `now < earliest` no lease can be dead and pruning is
    skipped. That keeps a decision O(1) with thousands of slots in flight.
    """

    __slots__ = ("earliest",)

    def __init__(self) -> None:
        # dict.__new__ already made the empty dict: no super().__init__() call needed.
        self.earliest = _INF

    def prune(self, now: float) -> None:
        if now >= self.earliest:
            leases.prune(self, now)
            self.earliest = min(self.values(), default=_INF)

    def add(self, lease_id: str, expiry: float) -> None:
        self[lease_id] = expiry
        if expiry < self.earliest:
            self.earliest = expiry


class Line:
    """The waiting line in front of one key's slots, with what a hand-off needs."""

    __slots__ = ("guaranteed", "limit", "state", "ttl")

    def __init__(self, limit: int, ttl: float, guaranteed: dict[int, int]) -> None:
        self.state = queue.QueueState()
        self.limit = limit
        self.ttl = ttl
        self.guaranteed = guaranteed
