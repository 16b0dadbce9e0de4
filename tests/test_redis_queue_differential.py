"""The queue scripts against `algorithms/queue.py`: same order, same sheds, same hand-offs.

Hypothesis generates sequences of clock steps and queue operations (enqueue
with a class, fair key and appointment spacing, release of a held slot, a
waiter leaving, a waiter's poll, an appointment for a waiter that gave up) on
one concurrency key. Each runs through `RedisBackend` on a real server (its
scripts on the manual clock) and through `LineModel`, which is what the memory
backend does with the pure queue algorithm and its `Book`, plus the ticket
expiry only Redis has (a waiter whose worker stops polling leaves the line).
After every step the line (sort keys and tickets, in order), the live leases
and their expiries, and the book (due times, ranks, counts, each class's last
time) must be equal.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from _servers import ManualClockRedisBackend, RedisServer
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from ratelimit.algorithms import leases, queue
from ratelimit.backends.base import LeaseCheck, QueueCheck, StoreKey
from ratelimit.backends.redis.calls import TICKET_MARGIN, TICKET_TTL

pytestmark = pytest.mark.redis


@dataclass
class LineModel:
    """One key's slots and waiting line, run by the pure algorithm (as MemoryBackend does)."""

    limit: int
    ttl: float
    capacity: int
    guaranteed: dict[int, int]
    state: queue.QueueState | None = None
    table: dict[str, float] = field(default_factory=dict)
    expiry: dict[str, float] = field(default_factory=dict)
    book: queue.Book = field(default_factory=queue.Book)

    def _drop_expired(self, now: float) -> None:
        if self.state is None:
            return
        for waiter in list(self.state.waiters):
            if self.expiry[waiter.ticket] <= now:
                self._remove(waiter.ticket)

    def _remove(self, ticket: str) -> bool:
        assert self.state is not None
        if self.state.remove(ticket) is None:
            return False
        del self.expiry[ticket]
        if not self.state:
            self.state = None  # an emptied line starts afresh
        return True

    def hand_off(self, now: float) -> None:
        self._drop_expired(now)
        if self.state is None:
            return
        leases.prune(self.table, now)
        for waiter in queue.hand_off(self.state, self.table, self.limit, self.guaranteed):
            del self.expiry[waiter.ticket]
            self.table[waiter.ticket] = now + self.ttl
        if not self.state:
            self.state = None

    def enqueue(
        self, ticket: str, rank: int, fair: str, max_position: int, spacing: float, now: float
    ) -> tuple[str, int, int, float]:
        self._drop_expired(now)
        leases.prune(self.table, now)
        if leases.held(self.table) + leases.weight_of(ticket) <= self.limit and self.state is None:
            self.table[ticket] = now + self.ttl
            return "admitted", -1, 0, 0.0
        line = self.state if self.state is not None else queue.QueueState()
        step = queue.enqueue(
            line,
            ticket=ticket,
            rank=rank,
            fair=fair,
            capacity=self.capacity,
            max_position=max_position,
            in_use=queue.in_use_by_rank(self.table) if self.guaranteed else {},
            guaranteed=self.guaranteed,
            book=self.book if spacing > 0 else None,
            now=now,
            spacing=spacing,
        )
        self._forget_empty_book()
        if step.outcome != "queued":
            return step.outcome, step.position, step.length, step.due - now if step.due else 0.0
        self.state = line
        if step.shed is not None:
            del self.expiry[step.shed.ticket]
        self.expiry[ticket] = now + TICKET_TTL
        self.hand_off(now)
        return "queued", step.position, step.length, 0.0

    def appoint(self, rank: int, fair: str, spacing: float, now: float) -> float:
        """MemoryBackend.appoint, with the line's length counted as Redis counts it
        (live tickets)."""
        if not (spacing > 0 and fair):
            return 0.0
        self.book.prune(now, queue.grace_for(spacing))
        length = sum(1 for expiry in self.expiry.values() if expiry > now)
        due = self.book.give(fair, rank, now, now + (length + 1) * spacing, spacing)
        self._forget_empty_book()
        return due - now if due else 0.0

    def _forget_empty_book(self) -> None:
        # MemoryBackend drops an empty book, and with it its classes' last times.
        if not self.book:
            self.book = queue.Book()

    def release(self, lease_id: str, now: float) -> bool:
        expiry = self.table.pop(lease_id, None)
        if self.state is not None:
            self.hand_off(now)
        return expiry is not None and expiry > now

    def leave(self, ticket: str, now: float) -> int:
        if self.state is not None and self._remove(ticket):
            return 0
        if self.table.get(ticket, 0.0) <= now:
            return -1
        self.release(ticket, now)
        return 2

    def poll(self, ticket: str, ttl: float, now: float) -> int:
        if self.state is not None:
            self.hand_off(now)
        if self.table.get(ticket, 0.0) > now:
            return 1
        if self.state is not None and self.state.position(ticket) >= 0:
            self.expiry[ticket] = now + ttl
            return 0
        return -1


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    backend: ManualClockRedisBackend
    rules: Iterator[int] = field(default_factory=itertools.count)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def harness(redis_server: RedisServer) -> Iterator[Harness]:
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flushall()
    loop = asyncio.new_event_loop()
    backend = ManualClockRedisBackend(redis_server.url)
    try:
        yield Harness(loop, backend)
    finally:
        loop.run_until_complete(backend.aclose())
        loop.close()


#: Seconds between appointments: mostly none (no estimate yet) or one service interval.
spacings = st.sampled_from([0.0, 0.0, 0.3, 1.0, 2.5])
steps_us = st.one_of(
    st.just(0),
    st.integers(0, 300_000),
    st.integers(0, 4_000_000),
    st.sampled_from([500_000, 1_000_000, 5_000_000]),
)
operations = st.lists(
    st.tuples(
        steps_us,
        st.one_of(
            st.tuples(
                st.just("enqueue"),
                st.integers(0, 2),
                st.sampled_from(["", "aa", "bb", "cc"]),
                st.sampled_from([-1, 0, 2, 99]),
                spacings,
            ),
            st.tuples(st.just("enqueue"), st.integers(0, 2), st.just("aa"), st.just(99), spacings),
            st.tuples(
                st.just("appoint"), st.integers(0, 2), st.sampled_from(["", "aa", "bb"]), spacings
            ),
            st.tuples(st.just("release"), st.integers(0, 1_000)),
            st.tuples(st.just("leave"), st.integers(0, 1_000)),
            st.tuples(st.just("poll"), st.integers(0, 1_000), st.sampled_from([0.5, 3.0, 9.0])),
        ),
    ),
    min_size=1,
    max_size=40,
)


#: Weights of a weighted pool's requests, taken in turn by its enqueues (up to one more
#: than the largest limit: a request heavier than its pool, as after an override).
weightings = st.one_of(st.none(), st.lists(st.integers(1, 5), min_size=1, max_size=6))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limit=st.integers(1, 4),
    ttl=st.sampled_from([0.5, 1.0, 3.0, 60.0]),
    capacity=st.integers(1, 5),
    guaranteed=st.sampled_from([(), ((0, 1),), ((0, 1), (1, 1)), ((1, 2),)]),
    ops=operations,
    weights=weightings,
)
# Shares: a class at its guarantee (rank 1 holds 2 of 2) has no claim; the head goes first.
@example(
    limit=3,
    ttl=60.0,
    capacity=5,
    guaranteed=((1, 2),),
    ops=[
        (0, ("enqueue", 1, "aa", 99, 0.0)),
        (0, ("enqueue", 1, "aa", 99, 0.0)),
        (0, ("enqueue", 0, "aa", 99, 0.0)),
        (0, ("enqueue", 0, "bb", 99, 0.0)),
        (0, ("enqueue", 1, "bb", 99, 0.0)),
        (0, ("release", 2)),
        (0, ("release", 0)),
    ],
    weights=None,
)
# Weights: a heavy head (3 of 4) is passed by light waiters for one pool's worth of
# slots (4), then reserves the slots that free until it fits; the light one behind waits.
@example(
    limit=4,
    ttl=60.0,
    capacity=9,
    guaranteed=(),
    ops=[(0, ("enqueue", 0, "aa", 99, 0.0))] * 10
    + [(0, ("release", i)) for i in (0, 1, 2, 3, 5, 6, 7, 8)],
    weights=[1, 1, 1, 1, 3, 1, 1, 1, 1, 1],
)
# Appointments: a full line books "bb" then "cc"; "cc" comes back early (same
# appointment), "bb" on time (joins the full line), "cc" late, past its grace (a new one).
@example(
    limit=1,
    ttl=60.0,
    capacity=1,
    guaranteed=(),
    ops=[
        (0, ("enqueue", 0, "aa", 99, 1.0)),
        (0, ("enqueue", 0, "aa", 99, 1.0)),
        (0, ("enqueue", 0, "bb", 99, 1.0)),
        (0, ("enqueue", 1, "cc", 99, 1.0)),
        (500_000, ("enqueue", 0, "cc", 99, 1.0)),
        (1_500_000, ("enqueue", 0, "bb", 99, 1.0)),
        (0, ("appoint", 1, "aa", 1.0)),
        (5_000_000, ("enqueue", 1, "cc", 99, 1.0)),
    ],
    weights=None,
)
def test_queue_scripts_match_the_pure_queue(
    harness: Harness,
    limit: int,
    ttl: float,
    capacity: int,
    guaranteed: tuple[tuple[int, int], ...],
    ops: list[tuple[int, tuple[Any, ...]]],
    weights: list[int] | None,
) -> None:
    """Outcomes, places, sheds, hand-offs (weighted pools' backfill and reservation
    included) and lease expiries of the scripts equal the model's."""
    harness.run(_scenario(harness, limit, ttl, capacity, guaranteed, ops, weights))


booking_enqueue = st.tuples(
    st.just("enqueue"),
    st.integers(0, 2),
    st.sampled_from(["aa", "bb", "cc", "dd", ""]),
    st.sampled_from([0, 99]),
    st.sampled_from([0.3, 1.0]),
)
booking_ops = st.lists(
    st.tuples(
        st.one_of(st.just(0), st.integers(0, 3_000_000), st.integers(0, 12_000_000)),
        st.one_of(
            booking_enqueue,
            booking_enqueue,
            booking_enqueue,
            st.tuples(st.just("release"), st.integers(0, 1_000)),
            st.tuples(st.just("leave"), st.integers(0, 1_000)),
            st.tuples(
                st.just("appoint"), st.integers(0, 2), st.sampled_from(["aa", "bb"]), st.just(1.0)
            ),
        ),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limit=st.integers(1, 2),
    capacity=st.integers(1, 3),
    guaranteed=st.sampled_from([(), ((0, 1),)]),
    ops=booking_ops,
)
# On the edge of its grace (due + 2 s exactly) an appointment is still kept.
@example(
    limit=1,
    capacity=1,
    guaranteed=(),
    ops=[
        (0, ("enqueue", 0, "aa", 99, 0.5)),
        (0, ("enqueue", 0, "bb", 99, 0.5)),
        (0, ("enqueue", 0, "cc", 99, 0.5)),
        (3_000_000, ("enqueue", 0, "cc", 99, 0.5)),
    ],
)
def test_appointments_match_the_pure_book(
    harness: Harness,
    limit: int,
    capacity: int,
    guaranteed: tuple[tuple[int, int], ...],
    ops: list[tuple[int, tuple[Any, ...]]],
) -> None:
    """Small pools with long holds and known callers: a line that is often full, so
    refusals book appointments and callers come back early, on time and too late."""
    harness.run(_scenario(harness, limit, 60.0, capacity, guaranteed, ops))


async def _scenario(
    harness: Harness,
    limit: int,
    ttl: float,
    capacity: int,
    guaranteed: tuple[tuple[int, int], ...],
    ops: list[tuple[int, tuple[Any, ...]]],
    weights: list[int] | None = None,
) -> None:
    backend = harness.backend
    key = StoreKey(f"q{next(harness.rules)}", "slots", "*")
    model = LineModel(limit, ttl, capacity, dict(guaranteed))
    micros = 1_760_000_000_000_000
    ids = itertools.count()
    #: ticket -> (its QueueCheck, its member in line) for every request that ever queued.
    queued: dict[str, tuple[QueueCheck, str]] = {}
    holders: list[LeaseCheck] = []
    for step, op in ops:
        micros += step
        now = micros / 1e6
        await backend.set_time(micros)
        kind = op[0]
        if kind == "enqueue":
            _, rank, fair, max_position, spacing = op
            n = next(ids)
            serial = (
                f"t{n}"
                if weights is None
                else leases.weighted_id(f"t{n}", weights[n % len(weights)])
            )
            lease = LeaseCheck(key, limit, ttl, queue.ticket_id(rank, serial))
            check = QueueCheck(lease, capacity, rank, fair, guaranteed, max_position, spacing)
            entry = await backend.enqueue([lease], check)
            waiter = backend.tickets.waiting.pop(lease.lease_id, None)
            member = waiter.member if waiter is not None else ""
            held = model.book.due.get(fair)
            expected = model.enqueue(lease.lease_id, rank, fair, max_position, spacing, now)
            assert (entry.outcome, entry.position, entry.length, entry.retry_in) == expected, op
            if spacing > 0 and fair:
                kept = held is not None and held[1] <= now <= held[1] + queue.grace_for(spacing)
                given = "a due" if kept else "an" if entry.retry_in else "no"
                event(f"appointments: {entry.outcome}, {given} appointment")
            if entry.outcome == "queued":
                queued[lease.lease_id] = (check, member)
            holders.append(lease)
        elif kind == "appoint":
            _, rank, fair, spacing = op
            lease = LeaseCheck(key, limit, ttl, queue.ticket_id(rank, f"t{next(ids)}"))
            check = QueueCheck(lease, capacity, rank, fair, guaranteed, capacity, spacing)
            assert await backend.appoint(check) == model.appoint(rank, fair, spacing, now), op
        elif kind == "release" and holders:
            lease = holders[op[1] % len(holders)]
            assert await backend.release(lease) == model.release(lease.lease_id, now), op
        elif kind == "leave" and queued:
            check, member = list(queued.values())[op[1] % len(queued)]
            got = await backend.tickets.leave_call(check.lease, member, release=True)
            assert got == model.leave(check.lease.lease_id, now), op
        elif kind == "poll" and queued:
            check, member = list(queued.values())[op[1] % len(queued)]
            left = op[2]
            got = await backend.tickets.wait_call(check.lease, member, left)
            expected_poll = model.poll(
                check.lease.lease_id, min(TICKET_TTL, left + TICKET_MARGIN), now
            )
            assert got == expected_poll, op
        await _assert_same_state(backend, model, key, now)


async def _assert_same_state(
    backend: ManualClockRedisBackend, model: LineModel, key: StoreKey, now: float
) -> None:
    """The line's order (sort keys, tickets), ticket expiries and live leases match."""
    line, tickets, _, meta_key = backend.keys.queue(key)
    members = [m.decode() for m in await backend.client.zrange(line, 0, -1)]
    got_line = [(m[:26], m.split("|", 2)[2]) for m in members]
    waiters = model.state.waiters if model.state is not None else []
    assert got_line == [(w.key, w.ticket) for w in waiters]
    expiries = await backend.client.zrange(tickets, 0, -1, withscores=True)
    assert {m.decode().split("|", 2)[2]: score for m, score in expiries} == model.expiry
    table = await backend.client.zrange(backend.keys.leases(key), 0, -1, withscores=True)
    live = {m.decode(): score for m, score in table if score > now}
    assert live == {lease: expiry for lease, expiry in model.table.items() if expiry > now}
    assert await backend.queue_length(key) == sum(1 for e in model.expiry.values() if e > now)
    assert await backend.in_use(key) == leases.live(model.table, now)
    passing = await backend.client.hmget(meta_key, "ph", "pp")
    if model.state is not None and model.state.passing:
        assert [v.decode() for v in passing] == [model.state.passing, str(model.state.passed)]
    else:
        assert passing == [None, None]
    due, ranks, meta = backend.keys.book(key)
    book = model.book
    got_due = await backend.client.zrange(due, 0, -1, withscores=True)
    assert {m.decode(): score for m, score in got_due} == {f: d for f, (_, d) in book.due.items()}
    got_ranks = await backend.client.hgetall(ranks)
    assert {f.decode(): int(r) for f, r in got_ranks.items()} == {
        f: r for f, (r, _) in book.due.items()
    }
    got_meta = {f.decode(): v.decode() for f, v in (await backend.client.hgetall(meta)).items()}
    assert {f[1:]: int(v) for f, v in got_meta.items() if f[0] == "c"} == {
        str(r): c for r, c in book.by_rank.items()
    }
    assert {f[1:]: float(v) for f, v in got_meta.items() if f[0] == "l"} == {
        str(r): t for r, t in book.last.items()
    }
