"""Space-Saving: the heaviest items of a stream in a fixed number of counters.

Metwally, Agrawal and El Abbadi, "Efficient Computation of Frequent and Top-k
Elements in Data Streams" (ICDT 2005). A table of at most `capacity` counters:
an item already counted adds its weight; a new item takes a free counter, or,
when the table is full, takes over the smallest counter (count c) with count
c + weight and error c. Memory stays at `capacity` entries however many
distinct items arrive (an attacker rotating keys cannot grow it), and with N
the total weight added:

- the counts add up to N exactly;
- every count overestimates its item's true weight by at most its `error`,
  and `error` is at most the smallest count, itself at most N / capacity;
- so every item whose true weight exceeds N / capacity is in the table.

Adding a counted item is a dict update; taking over the smallest counter is
amortised O(log capacity) through a heap whose entries may lag behind their
counts (counts only grow, so a lagging entry is re-pushed when it surfaces).

Tables of disjoint streams (several workers' traffic) merge by summing: a
table's `summary(k)` is its k heaviest items and its `floor`, the most weight
an item missing from them can have had in that stream (0 when the table kept
every item it saw). `merge` gives each item the sum of its counts, and of the
floors of the tables it is missing from; its error is the sum of its errors
and of those same floors. The guarantee above carries over: the merged count
never undercounts, and overcounts by at most the merged error (Agarwal et al.,
"Mergeable Summaries", PODS 2012).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["Counted", "SpaceSaving", "Summary", "merge"]


class Counted(NamedTuple):
    """One item of the table: its estimated weight, and how much of it may be overcount."""

    item: str
    #: Estimated total weight: never below the true one.
    estimate: int
    #: The estimate exceeds the true weight by at most this (0: exact).
    error: int


class Summary(NamedTuple):
    """What a table says of its stream, in k entries: enough to merge with other streams'."""

    #: Total weight of the stream (N).
    total: int
    #: An item not in `counted` had at most this weight in the stream (0: it had none).
    floor: int
    #: The heaviest items, heaviest first.
    counted: tuple[Counted, ...]


class SpaceSaving:
    """At most `capacity` counters that keep the heaviest items of a stream (see module)."""

    __slots__ = ("_counts", "_errors", "_heap", "capacity", "total")

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        #: Total weight added (N).
        self.total = 0
        self._counts: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        #: (count when pushed, item): one entry per counted item, count <= its true count.
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._counts)

    def __contains__(self, item: object) -> bool:
        return item in self._counts

    def add(self, item: str, weight: int = 1) -> None:
        """Count `weight` (> 0) more for `item`."""
        if weight < 1:
            raise ValueError(f"weight must be a positive int, got {weight!r}")
        self.total += weight
        counts = self._counts
        count = counts.get(item)
        if count is not None:
            counts[item] = count + weight
            return
        if len(counts) < self.capacity:
            counts[item] = weight
            self._errors[item] = 0
            heapq.heappush(self._heap, (weight, item))
            return
        smallest, victim = self._pop_smallest()
        del counts[victim], self._errors[victim]
        counts[item] = smallest + weight
        self._errors[item] = smallest
        heapq.heappush(self._heap, (smallest + weight, item))

    def _pop_smallest(self) -> tuple[int, str]:
        """Remove and return the heap entry of the item with the smallest count."""
        heap, counts = self._heap, self._counts
        while True:
            pushed, item = heap[0]
            count = counts[item]
            if count == pushed:  # every other entry's count is >= its pushed value >= this
                heapq.heappop(heap)
                return count, item
            heapq.heapreplace(heap, (count, item))

    def min_count(self) -> int:
        """The smallest count in the table (0 while it has a free counter): the error bound."""
        if len(self._counts) < self.capacity:
            return 0
        count, item = self._pop_smallest()
        heapq.heappush(self._heap, (count, item))
        return count

    def get(self, item: str) -> Counted | None:
        """`item`'s estimate, or None if it is not in the table."""
        count = self._counts.get(item)
        if count is None:
            return None
        return Counted(item, count, self._errors[item])

    def top(self, n: int | None = None) -> list[Counted]:
        """The `n` (default: all) heaviest items, heaviest first (ties by item)."""
        ranked = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if n is not None:
            ranked = ranked[:n]
        errors = self._errors
        return [Counted(item, count, errors[item]) for item, count in ranked]

    def summary(self, k: int | None = None) -> Summary:
        """The `k` (default: all) heaviest items and the floor under those left out (see module).

        The floor is the count of the heaviest item left out when `k` cuts the
        table (every other item, in it or not, weighs no more), else the
        smallest count (0 while a counter is free: nothing was ever evicted).
        """
        ranked = self.top()
        if k is not None and len(ranked) > k:
            return Summary(self.total, ranked[k].estimate, tuple(ranked[:k]))
        return Summary(self.total, self.min_count(), tuple(ranked))

    def clear(self) -> None:
        """Forget everything (start a new period)."""
        self.total = 0
        self._counts.clear()
        self._errors.clear()
        self._heap.clear()


def merge(summaries: Iterable[Summary]) -> tuple[int, list[Counted]]:
    """Merge summaries of disjoint streams: the total weight, and every item heaviest first.

    An item's count is the sum of its counts where it is counted plus the
    floors of the summaries where it is not; its error likewise sums errors
    and those floors. So, as in one table, count >= true weight >= count - error
    (ties ranked by item).
    """
    total = 0
    floors = 0
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    for summary in summaries:
        total += summary.total
        floors += summary.floor
        for c in summary.counted:
            # Start from "missing everywhere" (all floors), then swap this summary's
            # floor for the item's own count and error here.
            counts[c.item] = counts.get(c.item, 0) + c.estimate - summary.floor
            errors[c.item] = errors.get(c.item, 0) + c.error - summary.floor
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return total, [Counted(item, n + floors, errors[item] + floors) for item, n in ranked]
