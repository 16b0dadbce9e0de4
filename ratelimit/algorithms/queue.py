"""A bounded waiting queue in front of concurrency slots: order, hand-off, shedding, estimates.

Pure: no I/O and no clock. The memory backend runs these functions directly;
the Redis scripts (`enqueue.lua`, `release.lua`, `wait.lua`) run the same
steps on a sorted set and are tested against them.

Order. Each waiter has a sort key of three fixed-width fields, compared as
text (so Redis can order members of equal score the same way):

- its class `rank` (0 is served first: the engine maps priorities to ranks);
- a fair sequence number `n`: a caller's k-th waiting request gets
  `round[rank] + k`, where `round[rank]` is the `n` of the class's last
  admitted waiter. One caller with 100 waiting requests then holds
  n = 1..100 and a newcomer's first request slots in at n = round + 1, right
  after the requests that were already due; with no fair key every waiter
  is the same caller and the order is plain FIFO;
- the arrival number `seq`, which breaks ties in arrival order.

Shares. A class may be guaranteed `g` slots. A freed slot goes first to the
highest-ranked waiting class still below its guarantee, then in plain order.
Guarantees never preempt: idle slots are borrowed by any class. A full queue
sheds its lowest-ranked waiter to admit a higher-ranked newcomer, but never a
waiter its class's guarantee would admit (a newcomer with such a claim may
shed any waiter without one).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping
from typing import NamedTuple

#: Ranks run 0 (first) to RANK_MAX; the sort key gives them four digits.
RANK_MAX = 9999
#: Classes per limit are few; these widths keep keys fixed-size (compared as text).
_N_WIDTH = 10
_SEQ_WIDTH = 12


def sort_key(rank: int, n: int, seq: int) -> str:
    """The text that orders a waiter: rank, then fair sequence, then arrival."""
    return f"{rank:04d}{n:0{_N_WIDTH}d}{seq:0{_SEQ_WIDTH}d}"


def rank_of(ticket: str) -> int:
    """The class rank a ticket id starts with (`"0003~..."`); -1 for a plain lease id."""
    head = ticket[:4]
    return int(head) if ticket[4:5] == "~" and head.isdigit() else -1


def in_use_by_rank(lease_ids: Iterable[str]) -> dict[int, int]:
    """Slots held per class, from the ids of live leases."""
    out: dict[int, int] = {}
    for lease in lease_ids:
        rank = rank_of(lease)
        out[rank] = out.get(rank, 0) + 1
    return out


def ticket_id(rank: int, lease_id: str) -> str:
    """A ticket (and later lease) id that carries its class: shares count slots per class."""
    return f"{rank:04d}~{lease_id}"


class Waiter(NamedTuple):
    """One waiting request."""

    key: str
    ticket: str
    rank: int
    fair: str


class Enqueued(NamedTuple):
    """What `enqueue` did."""

    #: "queued", "full" (no room, nothing shed) or "too_long" (its wait would exceed the bound).
    outcome: str
    #: The newcomer's place in line (0: next), as if inserted when refused.
    position: int
    #: Waiters ahead of or behind it: the queue's length after the step.
    length: int
    #: The waiter shed to make room, if any.
    shed: Waiter | None


class QueueState:
    """The waiters of one concurrency key, in order, with the counters that order them."""

    __slots__ = ("counts", "rounds", "seq", "waiters")

    def __init__(self) -> None:
        self.waiters: list[Waiter] = []
        #: Fair key -> how many of its requests wait now (dropped at zero).
        self.counts: dict[str, int] = {}
        #: Rank -> the fair sequence number of the class's last admitted waiter.
        self.rounds: dict[int, int] = {}
        self.seq = 0

    def __len__(self) -> int:
        return len(self.waiters)

    def place(self, rank: int, fair: str) -> str:
        """The sort key a newcomer would get now (consumes no sequence number)."""
        n = self.rounds.get(rank, 0) + self.counts.get(fair, 0) + 1
        return sort_key(rank, n, self.seq + 1)

    def insert(self, rank: int, fair: str, ticket: str) -> Waiter:
        """Add a waiter at its place in line."""
        waiter = Waiter(self.place(rank, fair), ticket, rank, fair)
        self.seq += 1
        self.counts[fair] = self.counts.get(fair, 0) + 1
        insort(self.waiters, waiter)
        return waiter

    def remove(self, ticket: str) -> Waiter | None:
        """Take a waiter out of line (it left, timed out or was shed); None if absent."""
        for i, waiter in enumerate(self.waiters):
            if waiter.ticket == ticket:
                return self._pop(i)
        return None

    def pop_next(self, in_use: Mapping[int, int], guaranteed: Mapping[int, int]) -> Waiter:
        """Take the waiter a freed slot goes to (see the module's Shares)."""
        i = next_index(self.waiters, in_use, guaranteed)
        waiter = self._pop(i)
        n = int(waiter.key[4 : 4 + _N_WIDTH])
        if self.waiters and n > self.rounds.get(waiter.rank, 0):
            self.rounds[waiter.rank] = n
        return waiter

    def _pop(self, i: int) -> Waiter:
        waiter = self.waiters.pop(i)
        left = self.counts[waiter.fair] - 1
        if left:
            self.counts[waiter.fair] = left
        else:
            del self.counts[waiter.fair]
        if not self.waiters:
            # An empty queue starts afresh: sequence numbers stay small.
            self.rounds.clear()
            self.seq = 0
        return waiter

    def position(self, ticket: str) -> int:
        """A waiter's place in line (0: next), or -1 when it is not waiting."""
        for i, waiter in enumerate(self.waiters):
            if waiter.ticket == ticket:
                return i
        return -1


def next_index(
    waiters: list[Waiter], in_use: Mapping[int, int], guaranteed: Mapping[int, int]
) -> int:
    """Index of the waiter a freed slot goes to: first one whose class is under its
    guarantee, else the head."""
    if guaranteed:
        for i, waiter in enumerate(waiters):
            if in_use.get(waiter.rank, 0) < guaranteed.get(waiter.rank, 0):
                return i
    return 0


def claims(
    rank: int, ahead_in_class: int, in_use: Mapping[int, int], guaranteed: Mapping[int, int]
) -> bool:
    """Whether a waiter with `ahead_in_class` of its class before it is covered by its
    class's guarantee (its class would get a slot for it without borrowing)."""
    return in_use.get(rank, 0) + ahead_in_class < guaranteed.get(rank, 0)


def victim_index(
    waiters: list[Waiter],
    rank: int,
    claimed: bool,
    in_use: Mapping[int, int],
    guaranteed: Mapping[int, int],
) -> int:
    """Which waiter to shed for a newcomer of class `rank`, or -1 for none.

    The candidate is the last waiter of the lowest class whose last waiter has
    no guarantee claim; it must rank below the newcomer unless the newcomer
    itself has a claim (`claimed`).
    """
    per_class: dict[int, int] = {}
    for waiter in waiters:
        per_class[waiter.rank] = per_class.get(waiter.rank, 0) + 1
    for i in range(len(waiters) - 1, -1, -1):
        waiter = waiters[i]
        if i + 1 < len(waiters) and waiters[i + 1].rank == waiter.rank:
            continue  # only the last waiter of each class is a candidate
        if claims(waiter.rank, per_class[waiter.rank] - 1, in_use, guaranteed):
            continue
        if waiter.rank > rank or (claimed and waiter.rank < rank):
            return i
    return -1


def enqueue(
    state: QueueState,
    *,
    ticket: str,
    rank: int,
    fair: str,
    capacity: int,
    max_position: int,
    in_use: Mapping[int, int],
    guaranteed: Mapping[int, int],
) -> Enqueued:
    """Put a request in line, shedding a lower waiter if the line is full.

    `max_position` refuses a newcomer whose place in line is past it (its
    estimated wait would outlast its timeout; pass `capacity` for no bound, -1
    when not even the next place would make it). Refusals change nothing.
    """
    key = state.place(rank, fair)
    position = bisect_left(state.waiters, (key,))
    length = len(state.waiters)
    if position > max_position:
        return Enqueued("too_long", position, length, None)
    shed = None
    if length >= capacity:
        ahead_in_class = sum(1 for w in state.waiters[:position] if w.rank == rank)
        claimed = claims(rank, ahead_in_class, in_use, guaranteed)
        i = victim_index(state.waiters, rank, claimed, in_use, guaranteed)
        if i < 0:
            return Enqueued("full", position, length, None)
        shed = state._pop(i)
        # Popping may reset the counters of an emptied queue; place again.
    waiter = state.insert(rank, fair, ticket)
    return Enqueued("queued", state.waiters.index(waiter), len(state.waiters), shed)


def estimate_wait(position: int, limit: int, service_time: float) -> float:
    """Seconds until a waiter at `position` (0: next) gets a slot: slots free at a
    rate of `limit / service_time`, and it needs `position + 1` of them."""
    return (position + 1) * service_time / limit


def max_position(timeout: float, limit: int, service_time: float, capacity: int) -> int:
    """The last place in line whose estimated wait fits `timeout`: -1 when none does,
    `capacity` (no bound) before any service time was observed."""
    if service_time <= 0:
        return capacity
    return min(capacity, int(timeout * limit / service_time) - 1)


def ewma(average: float, sample: float, weight: float = 0.2) -> float:
    """A moving average of service times; the first sample starts it."""
    if average <= 0:
        return sample
    return average + weight * (sample - average)
