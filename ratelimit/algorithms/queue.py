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

Appointments. A bounded line overflows: past it, a refusal's `Retry-After`
is only honest if the caller gets in when it comes back, which it will not
if newcomers keep the line full. With a fair key (the caller's identity) and
an observed service time, every refusal therefore carries an appointment:
come back at `due` and join the line whatever its length. Appointments of a
class are spaced one service interval (`spacing` = service time / slots)
apart after the line's own wait, and while any of the same or a higher class
are outstanding, newcomers of that class get an appointment at the end of
the book instead of a place in line. Callers are then served in the order
they first came, the line holding only those whose turn is near. An
appointment not kept within `grace_for(spacing)` of its time lapses.

Shares. A class may be guaranteed `g` slots. A freed slot goes first to the
highest-ranked waiting class still below its guarantee, then in plain order.
Guarantees never preempt: idle slots are borrowed by any class. A full queue
sheds its lowest-ranked waiter to admit a higher-ranked newcomer, but never a
waiter its class's guarantee would admit (a newcomer with such a claim may
shed any waiter without one).

Weights. In a weighted pool (`Concurrency(counts=...)`) a waiter needs `w`
free slots at once (`algorithms.leases`). Freed slots go to the waiter the
order above picks (the head) when it fits. When it does not, waiters behind
it that fit now may take them ("backfill"), but only up to a budget: while
one head waits, at most `limit` slots (one pool's worth) go past it; then
it reserves every slot that frees until it fits. Why this policy:

- strict reservation (no backfill) leaves up to `w - 1` slots idle until
  running requests free the rest, while light requests that would fit wait;
- unbounded backfill starves the heavy: under load a 1-slot gap is refilled
  at once, and `w` slots are never free together;
- the budget bounds both: a heavy head is passed by at most one pool's worth
  of slots (about one service time more of waiting), after which it waits
  only for requests already running, which end (leases are bounded and
  `w <= limit` is checked before anyone joins), so light waiters behind it
  are held up for at most about one service time.

A pool's waiters are all weighted or none is, so an unweighted line never
looks past its head. Backfill looks at the first `BACKFILL_SCAN` waiters
only (a hand-off's work stays bounded). A head that can never fit (its
limit was lowered while it waited) reserves nothing and leaves at its timeout.
`benchmarks/weighted_slots.py` measures the policy against both extremes.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

from . import leases

#: Ranks run 0 (first) to RANK_MAX; the sort key gives them four digits.
RANK_MAX = 9999
#: Waiters a hand-off looks at for one that fits past a head that does not (see Weights).
BACKFILL_SCAN = 32
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
    """Slots held per class, from the ids of live leases (weights summed)."""
    out: dict[int, int] = {}
    for lease in lease_ids:
        rank = rank_of(lease)
        out[rank] = out.get(rank, 0) + leases.weight_of(lease)
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

    #: "queued", "full" (no room, nothing shed) or "too_long" (its wait would exceed the
    #: bound, or the line is booked ahead of it: see `due`).
    outcome: str
    #: The newcomer's place in line (0: next), as if inserted when refused.
    position: int
    #: Waiters ahead of or behind it: the queue's length after the step.
    length: int
    #: The waiter shed to make room, if any.
    shed: Waiter | None
    #: A refused newcomer's appointment (absolute time; 0.0: none).
    due: float = 0.0


#: Appointments one book holds at most; past it, refusals carry only an estimate.
BOOK_MAX = 10_000


def grace_for(spacing: float) -> float:
    """Seconds an appointment stays claimable after its time: clients round `Retry-After`
    up to whole seconds and take a moment to send again."""
    return max(2.0, 4 * spacing)


class Book:
    """Appointments handed out with refusals, per caller (see the module's Appointments)."""

    __slots__ = ("by_rank", "due", "last")

    def __init__(self) -> None:
        #: Fair key -> (rank, time it is due).
        self.due: dict[str, tuple[int, float]] = {}
        #: Rank -> appointments outstanding.
        self.by_rank: dict[int, int] = {}
        #: Rank -> the time of the class's latest appointment.
        self.last: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.due)

    def prune(self, now: float, grace: float) -> None:
        """Drop appointments not kept within `grace` of their time."""
        lapsed = [fair for fair, (_, due) in self.due.items() if due + grace < now]
        for fair in lapsed:
            self._drop(fair)
        if not self.due:
            self.last.clear()

    def booked_ahead(self, rank: int) -> bool:
        """Whether appointments of this class or a higher one are outstanding."""
        return any(count for r, count in self.by_rank.items() if r <= rank)

    def give(self, fair: str, rank: int, now: float, first_free: float, spacing: float) -> float:
        """The caller's appointment: its outstanding one if still ahead, else the next free
        one of its class (at least `first_free`, one `spacing` after the class's last);
        0.0 when the book is full."""
        held = self.due.get(fair)
        if held is not None and held[1] > now:
            return held[1]
        if held is not None:
            self._drop(fair)
        if len(self.due) >= BOOK_MAX:
            return 0.0
        due = max(first_free, self.last.get(rank, 0.0) + spacing)
        self.due[fair] = (rank, due)
        self.by_rank[rank] = self.by_rank.get(rank, 0) + 1
        self.last[rank] = due
        return due

    def claim(self, fair: str, now: float) -> float:
        """Keep a due appointment (0.0, removed), or say when it is due (still booked);
        -1.0 when the caller has none."""
        held = self.due.get(fair)
        if held is None:
            return -1.0
        if held[1] <= now:
            self._drop(fair)
            return 0.0
        return held[1]

    def _drop(self, fair: str) -> None:
        rank, _ = self.due.pop(fair)
        left = self.by_rank[rank] - 1
        if left:
            self.by_rank[rank] = left
        else:
            del self.by_rank[rank]


class QueueState:
    """The waiters of one concurrency key, in order, with the counters that order them."""

    __slots__ = ("counts", "passed", "passing", "rounds", "seq", "waiters")

    def __init__(self) -> None:
        self.waiters: list[Waiter] = []
        #: Fair key -> how many of its requests wait now (dropped at zero).
        self.counts: dict[str, int] = {}
        #: Rank -> the fair sequence number of the class's last admitted waiter.
        self.rounds: dict[int, int] = {}
        self.seq = 0
        #: The ticket of the last head that lighter waiters passed, and the slots they
        #: took past it (its backfill budget spent; see the module's Weights).
        self.passing = ""
        self.passed = 0

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
        return self.pop_at(next_index(self.waiters, in_use, guaranteed))

    def pop_at(self, i: int) -> Waiter:
        """Take the waiter at `i` out of line, admitted: its class's round moves on."""
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
            self.passing, self.passed = "", 0
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


def hand_off(
    state: QueueState,
    lease_ids: Collection[str],
    limit: int,
    guaranteed: Mapping[int, int],
    budget: int | None = None,
) -> list[Waiter]:
    """Admit waiters into the free slots of a pool whose live leases are `lease_ids`, in
    the line's order (see Shares and Weights); return them, taken out of line.

    `budget`: slots lighter waiters may take past a waiting head, `limit` unless given
    (the benchmark compares 0, strict reservation, with unbounded backfill)."""
    waiters = state.waiters
    if not waiters:
        return []
    weighted = leases.MARK in waiters[0].ticket
    free = limit - (leases.held(lease_ids) if weighted else len(lease_ids))
    by_rank = in_use_by_rank(lease_ids) if guaranteed else {}
    granted = []
    while waiters and free > 0:
        i = next_index(waiters, by_rank, guaranteed)
        if weighted:
            i = _fitting(state, i, free, limit, limit if budget is None else budget)
            if i < 0:
                break
        waiter = state.pop_at(i)
        need = leases.weight_of(waiter.ticket)
        free -= need
        if guaranteed:
            by_rank[waiter.rank] = by_rank.get(waiter.rank, 0) + need
        granted.append(waiter)
    return granted


def _fitting(state: QueueState, head: int, free: int, limit: int, allowance: int) -> int:
    """The waiter `free` slots go to when `head` is next: the head if it fits, else the
    first of the next `BACKFILL_SCAN` that fits within the head's `allowance`; -1: none."""
    waiters = state.waiters
    ticket = waiters[head].ticket
    need = leases.weight_of(ticket)
    if need <= free:
        return head
    passed = state.passed if state.passing == ticket else 0
    # A head that can never fit (its limit was lowered) reserves nothing.
    budget = allowance - passed if need <= limit else free
    for j in range(min(len(waiters), BACKFILL_SCAN)):
        if j != head:
            weight = leases.weight_of(waiters[j].ticket)
            if weight <= free and weight <= budget:
                state.passing, state.passed = ticket, passed + weight
                return j
    return -1


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
    book: Book | None = None,
    now: float = 0.0,
    spacing: float = 0.0,
) -> Enqueued:
    """Put a request in line, shedding a lower waiter if the line is full.

    `max_position` refuses a newcomer whose place in line is past it (its
    estimated wait would outlast its timeout; pass `capacity` for no bound, -1
    when not even the next place would make it). Refusals change nothing in
    the line. With a `book`, a fair key and a `spacing` > 0, appointments apply
    (see the module's Appointments): a caller keeping its appointment joins the
    line past every bound, and a refused one is given an appointment (`due`).
    """
    key = state.place(rank, fair)
    position = bisect_left(state.waiters, (key,))
    length = len(state.waiters)
    booking = book is not None and fair != "" and spacing > 0
    if booking:
        assert book is not None
        book.prune(now, grace_for(spacing))
        held = book.claim(fair, now)
        if held == 0.0:
            waiter = state.insert(rank, fair, ticket)
            return Enqueued("queued", state.waiters.index(waiter), len(state.waiters), None)
        if held > 0 or book.booked_ahead(rank):
            due = book.give(fair, rank, now, now + (length + 1) * spacing, spacing)
            return Enqueued("too_long", position, length, None, due)

    def refuse(outcome: str) -> Enqueued:
        due = 0.0
        if booking:
            assert book is not None
            due = book.give(fair, rank, now, now + (length + 1) * spacing, spacing)
        return Enqueued(outcome, position, length, None, due)

    if position > max_position:
        return refuse("too_long")
    shed = None
    if length >= capacity:
        ahead_in_class = sum(1 for w in state.waiters[:position] if w.rank == rank)
        claimed = claims(rank, ahead_in_class, in_use, guaranteed)
        i = victim_index(state.waiters, rank, claimed, in_use, guaranteed)
        if i < 0:
            return refuse("full")
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
