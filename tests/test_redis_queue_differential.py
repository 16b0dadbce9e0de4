"""The queue scripts against `algorithms/queue.py`: same order, same sheds, same hand-offs.

Hypothesis generates sequences of clock steps and queue operations (enqueue
with a class and fair key, release of a held slot, a waiter leaving, a
waiter's poll) on one concurrency key. Each runs through `RedisBackend` on a
real server (its scripts on the manual clock) and through `LineModel`, which
is what the memory backend does with the pure queue algorithm, plus the ticket
expiry only Redis has (a waiter whose worker stops polling leaves the line).
After every step the line (sort keys and tickets, in order), the live leases
and their expiries must be equal.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from _servers import ManualClockRedisBackend, RedisServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ratelimit.algorithms import leases, queue
from ratelimit.backends.base import LeaseCheck, QueueCheck, StoreKey
from ratelimit.backends.redis.backend import TICKET_MARGIN, TICKET_TTL

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
        while self.state is not None and len(self.table) < self.limit:
            by_rank = queue.in_use_by_rank(self.table) if self.guaranteed else {}
            waiter = self.state.pop_next(by_rank, self.guaranteed)
            del self.expiry[waiter.ticket]
            self.table[waiter.ticket] = now + self.ttl
            if not self.state:
                self.state = None

    def enqueue(
        self, ticket: str, rank: int, fair: str, max_position: int, now: float
    ) -> tuple[str, int, int]:
        self._drop_expired(now)
        leases.prune(self.table, now)
        if len(self.table) < self.limit and self.state is None:
            self.table[ticket] = now + self.ttl
            return "admitted", -1, 0
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
        )
        if step.outcome != "queued":
            return step.outcome, step.position, step.length
        self.state = line
        if step.shed is not None:
            del self.expiry[step.shed.ticket]
        self.expiry[ticket] = now + TICKET_TTL
        self.hand_off(now)
        return "queued", step.position, step.length

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
            ),
            st.tuples(st.just("enqueue"), st.integers(0, 2), st.just("aa"), st.just(99)),
            st.tuples(st.just("release"), st.integers(0, 1_000)),
            st.tuples(st.just("leave"), st.integers(0, 1_000)),
            st.tuples(st.just("poll"), st.integers(0, 1_000), st.sampled_from([0.5, 3.0, 9.0])),
        ),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limit=st.integers(1, 3),
    ttl=st.sampled_from([0.5, 1.0, 3.0, 60.0]),
    capacity=st.integers(1, 5),
    guaranteed=st.sampled_from([(), ((0, 1),), ((0, 1), (1, 1)), ((1, 2),)]),
    ops=operations,
)
# Shares: a class at its guarantee (rank 1 holds 2 of 2) has no claim; the head goes first.
@example(
    limit=3,
    ttl=60.0,
    capacity=5,
    guaranteed=((1, 2),),
    ops=[
        (0, ("enqueue", 1, "aa", 99)),
        (0, ("enqueue", 1, "aa", 99)),
        (0, ("enqueue", 0, "aa", 99)),
        (0, ("enqueue", 0, "bb", 99)),
        (0, ("enqueue", 1, "bb", 99)),
        (0, ("release", 2)),
        (0, ("release", 0)),
    ],
)
def test_queue_scripts_match_the_pure_queue(
    harness: Harness,
    limit: int,
    ttl: float,
    capacity: int,
    guaranteed: tuple[tuple[int, int], ...],
    ops: list[tuple[int, tuple[Any, ...]]],
) -> None:
    """Outcomes, places, sheds, hand-offs and lease expiries of the scripts equal the model's."""
    harness.run(_scenario(harness, limit, ttl, capacity, guaranteed, ops))


async def _scenario(
    harness: Harness,
    limit: int,
    ttl: float,
    capacity: int,
    guaranteed: tuple[tuple[int, int], ...],
    ops: list[tuple[int, tuple[Any, ...]]],
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
            _, rank, fair, max_position = op
            lease = LeaseCheck(key, limit, ttl, queue.ticket_id(rank, f"t{next(ids)}"))
            check = QueueCheck(lease, capacity, rank, fair, guaranteed, max_position)
            entry = await backend.enqueue([lease], check)
            waiter = backend._tickets.pop(lease.lease_id, None)
            member = waiter.member if waiter is not None else ""
            expected = model.enqueue(lease.lease_id, rank, fair, max_position, now)
            assert (entry.outcome, entry.position, entry.length) == expected, op
            if entry.outcome == "queued":
                queued[lease.lease_id] = (check, member)
            holders.append(lease)
        elif kind == "release" and holders:
            lease = holders[op[1] % len(holders)]
            assert await backend.release(lease) == model.release(lease.lease_id, now), op
        elif kind == "leave" and queued:
            check, member = list(queued.values())[op[1] % len(queued)]
            got = await backend._leave_call(check.lease, member, release=True)
            assert got == model.leave(check.lease.lease_id, now), op
        elif kind == "poll" and queued:
            check, member = list(queued.values())[op[1] % len(queued)]
            left = op[2]
            got = await backend._wait_call(check.lease, member, left)
            expected_poll = model.poll(
                check.lease.lease_id, min(TICKET_TTL, left + TICKET_MARGIN), now
            )
            assert got == expected_poll, op
        await _assert_same_state(backend, model, key, now)


async def _assert_same_state(
    backend: ManualClockRedisBackend, model: LineModel, key: StoreKey, now: float
) -> None:
    """The line's order (sort keys, tickets), ticket expiries and live leases match."""
    line, tickets, _, _ = backend.keys.queue(key)
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
