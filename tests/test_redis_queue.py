"""The waiting line on real Redis: order, shares, fairness, refusals, and nothing leaked.

Waiters are parked with `enqueue`; order is asserted from which ticket each
release admits, never from sleeps. Hand-offs reach waiters by pub/sub (a
second backend plays another worker), and a worker that stops polling loses
its tickets. The last test runs on the real 3-master cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ratelimit.algorithms.queue import ticket_id
from ratelimit.backends.base import BucketCheck, LeaseCheck, QueueBackend, QueueCheck, StoreKey
from ratelimit.backends.redis import RedisBackend
from ratelimit.backends.redis import calls as calls_module
from ratelimit.backends.redis import tickets as tickets_module

pytestmark = pytest.mark.redis

SLOTS = StoreKey("api", "gpu", "*")
CALLER = "0123456789abcdef0123456789abcdef"
TTL = 30.0


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    b = RedisBackend(redis_url)
    try:
        yield b
    finally:
        await b.aclose()


@pytest.fixture
async def other(redis_url: str) -> AsyncIterator[RedisBackend]:
    """A second backend on the same server: another worker."""
    b = RedisBackend(redis_url)
    try:
        yield b
    finally:
        await b.aclose()


def queued(
    name: str,
    *,
    limit: int = 1,
    rank: int = 0,
    fair: str = "",
    capacity: int = 10,
    guaranteed: tuple[tuple[int, int], ...] = (),
    max_position: int | None = None,
    key: StoreKey = SLOTS,
) -> QueueCheck:
    lease = LeaseCheck(key, limit, TTL, ticket_id(rank, name))
    bound = capacity if max_position is None else max_position
    return QueueCheck(lease, capacity, rank, fair, guaranteed, bound)


async def fill(backend: RedisBackend, limit: int, key: StoreKey = SLOTS) -> list[LeaseCheck]:
    """Take every slot with plain leases."""
    held = [LeaseCheck(key, limit, TTL, f"held-{i}") for i in range(limit)]
    for lease in held:
        assert (await backend.decide([lease])).admitted
    return held


async def admitted_order(
    backend: RedisBackend, other: RedisBackend, waiting: list[QueueCheck], held: LeaseCheck
) -> list[str]:
    """Release one slot at a time from `other`; the tickets the line admits, in order."""
    tasks = {q.lease.lease_id: asyncio.create_task(backend.wait(q, 5.0)) for q in waiting}
    order: list[str] = []
    current = held
    for _ in waiting:
        assert await other.release(current)
        done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        (task,) = done
        assert task.result() == "granted"
        name = next(t for t, candidate in tasks.items() if candidate is task)
        del tasks[name]
        order.append(name)
        current = next(q.lease for q in waiting if q.lease.lease_id == name)
    await other.release(current)
    return order


def test_redis_backend_satisfies_the_queue_protocol(backend: RedisBackend) -> None:
    """RedisBackend is a QueueBackend."""
    assert isinstance(backend, QueueBackend)


async def test_a_free_slot_admits_at_once_and_a_full_pool_queues(backend: RedisBackend) -> None:
    """Admitted while a slot is free; queued (position, length) once the pool is full."""
    first = queued("a")
    entry = await backend.enqueue([first.lease], first)
    assert (entry.outcome, entry.position, entry.length) == ("admitted", -1, 0)
    second = queued("b")
    entry = await backend.enqueue([second.lease], second)
    assert (entry.outcome, entry.position, entry.length) == ("queued", 0, 1)
    assert entry.verdict.results[0].admitted is False
    assert (await backend.queue_length(SLOTS), await backend.in_use(SLOTS)) == (1, 1)


async def test_nobody_passes_the_line(backend: RedisBackend, other: RedisBackend) -> None:
    """With a waiter in line, a plain decide refuses even when a slot frees up by expiry."""
    held = await fill(backend, 1)
    waiter = queued("w")
    assert (await backend.enqueue([waiter.lease], waiter)).outcome == "queued"
    newcomer = LeaseCheck(SLOTS, 2, TTL, "newcomer")  # a larger limit: a slot is free
    assert not (await other.decide([newcomer])).admitted
    await other.release(held[0])
    assert await backend.wait(waiter, 1.0) == "granted"


async def test_fifo_within_a_class(backend: RedisBackend, other: RedisBackend) -> None:
    """Waiters of one class are admitted in arrival order, each by a release elsewhere."""
    (held,) = await fill(backend, 1)
    waiting = [queued(f"w{i}") for i in range(4)]
    for q in waiting:
        assert (await backend.enqueue([q.lease], q)).outcome == "queued"
    order = await admitted_order(backend, other, waiting, held)
    assert order == [q.lease.lease_id for q in waiting]


async def test_higher_class_first(backend: RedisBackend, other: RedisBackend) -> None:
    """A rank-0 waiter that came last is admitted before earlier rank-1 waiters."""
    (held,) = await fill(backend, 1)
    waiting = [queued("free1", rank=1), queued("free2", rank=1), queued("paid", rank=0)]
    for q in waiting:
        await backend.enqueue([q.lease], q)
    order = await admitted_order(backend, other, waiting, held)
    assert order == [ticket_id(0, "paid"), ticket_id(1, "free1"), ticket_id(1, "free2")]


async def test_fairness_across_callers(backend: RedisBackend, other: RedisBackend) -> None:
    """One caller's backlog does not push another caller's first request behind it."""
    (held,) = await fill(backend, 1)
    waiting = [queued(f"a{i}", fair="aa") for i in range(3)] + [queued("b0", fair="bb")]
    for q in waiting:
        await backend.enqueue([q.lease], q)
    order = await admitted_order(backend, other, waiting, held)
    assert order == [ticket_id(0, n) for n in ("a0", "b0", "a1", "a2")]


async def test_guaranteed_share_goes_first_and_idle_capacity_is_borrowed(
    backend: RedisBackend,
) -> None:
    """A class under its guarantee gets the freed slot before an earlier, higher class."""
    shares = ((1, 1),)
    borrowers = [queued(f"paid{i}", limit=2, rank=0, guaranteed=shares) for i in range(2)]
    for q in borrowers:  # rank 0 borrows both slots, rank 1's share among them
        assert (await backend.enqueue([q.lease], q)).outcome == "admitted"
    paid = queued("paid-late", limit=2, rank=0, guaranteed=shares)
    free = queued("free", limit=2, rank=1, guaranteed=shares)
    await backend.enqueue([paid.lease], paid)
    await backend.enqueue([free.lease], free)
    waits = asyncio.gather(backend.wait(free, 2.0))
    await backend.release(borrowers[0].lease)
    assert await waits == ["granted"]
    assert await backend.queue_length(SLOTS) == 1


async def test_full_line_refuses_and_sheds_a_lower_class(backend: RedisBackend) -> None:
    """A full line refuses its own class; a higher class sheds the lowest waiter, who wakes."""
    await fill(backend, 1)
    low = [queued(f"low{i}", rank=1, capacity=2) for i in range(2)]
    for q in low:
        await backend.enqueue([q.lease], q)
    extra = queued("low-extra", rank=1, capacity=2)
    entry = await backend.enqueue([extra.lease], extra)
    assert (entry.outcome, entry.length) == ("full", 2)
    shed_wait = asyncio.create_task(backend.wait(low[1], 5.0))
    high = queued("high", rank=0, capacity=2)
    entry = await backend.enqueue([high.lease], high)
    assert (entry.outcome, entry.position, entry.length) == ("queued", 0, 2)
    assert await asyncio.wait_for(shed_wait, 1.0) == "shed"


async def test_too_long_refuses_and_consumes_nothing(backend: RedisBackend) -> None:
    """Past max_position the request is refused at once; its bucket keeps its units."""
    await fill(backend, 1)
    ahead = queued("ahead")
    await backend.enqueue([ahead.lease], ahead)
    bucket = BucketCheck(StoreKey("api", "tb", CALLER), 60.0, 5, 1)
    late = queued("late", max_position=0)
    entry = await backend.enqueue([bucket, late.lease], late)
    assert (entry.outcome, entry.position) == ("too_long", 1)
    assert entry.verdict.results[0].remaining == 5
    peek = await backend.decide([BucketCheck(bucket.key, 60.0, 5, 0)])
    assert peek.results[0].remaining == 5


async def test_another_check_refusing_consumes_nothing(backend: RedisBackend) -> None:
    """A spent bucket refuses the rule: nothing is queued."""
    await fill(backend, 1)
    bucket = BucketCheck(StoreKey("api", "tb", CALLER), 60.0, 1, 2)
    q = queued("w")
    entry = await backend.enqueue([bucket, q.lease], q)
    assert entry.outcome == "refused"
    assert await backend.queue_length(SLOTS) == 0


async def test_a_timed_out_waiter_leaves_the_line(backend: RedisBackend) -> None:
    """Timeout answers "timeout" and removes the ticket; slots and line are back to truth."""
    await fill(backend, 1)
    q = queued("w")
    await backend.enqueue([q.lease], q)
    assert await backend.wait(q, 0.2) == "timeout"
    assert (await backend.queue_length(SLOTS), await backend.in_use(SLOTS)) == (0, 1)


async def test_a_cancelled_waiter_leaves_and_gives_back_a_granted_slot(
    backend: RedisBackend, other: RedisBackend
) -> None:
    """Cancelled while waiting: the ticket leaves; a slot granted meanwhile is released."""
    (held,) = await fill(backend, 1)
    q = queued("w")
    await backend.enqueue([q.lease], q)
    task = asyncio.create_task(backend.wait(q, 5.0))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.gather(*backend.tickets.background)
    assert (await backend.queue_length(SLOTS), await backend.in_use(SLOTS)) == (0, 1)
    # Granted in Redis, then cancelled before it returned: the leave releases the slot.
    q2 = queued("w2")
    await backend.enqueue([q2.lease], q2)
    await other.release(held)
    backend.tickets.leave_later(q2.lease, backend.tickets.waiting[q2.lease.lease_id].member)
    await asyncio.gather(*backend.tickets.background)
    assert (await backend.queue_length(SLOTS), await backend.in_use(SLOTS)) == (0, 0)


async def test_a_dead_workers_tickets_expire(
    backend: RedisBackend, other: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that stops polling loses its place within the ticket ttl; the next waiter
    (in another worker) gets the slot instead."""
    monkeypatch.setattr(calls_module, "TICKET_TTL", 0.3)
    monkeypatch.setattr(tickets_module, "WAIT_POLL", 0.1)  # heartbeats well within the ttl
    (held,) = await fill(backend, 1)
    dead = queued("dead")
    await backend.enqueue([dead.lease], dead)  # nobody waits on it: its worker "died"
    alive = queued("alive")
    await other.enqueue([alive.lease], alive)
    waiting = asyncio.create_task(other.wait(alive, 5.0))
    await asyncio.sleep(0.4)
    await backend.release(held)
    assert await waiting == "granted"
    assert await other.queue_length(SLOTS) == 0


async def test_a_slot_freed_by_expiry_reaches_the_line_by_the_poll(backend: RedisBackend) -> None:
    """No release ever comes (the holder died): the waiter's own poll hands it the slot."""
    short = LeaseCheck(SLOTS, 1, 0.2, "short-lived")
    assert (await backend.decide([short])).admitted
    q = queued("w")
    await backend.enqueue([q.lease], q)
    assert await backend.wait(q, 3.0) == "granted"


async def test_split_slots_refund_the_bucket_when_the_line_refuses(redis_url: str) -> None:
    """Split by slot (as on a cluster): a full line refunds the per-caller bucket."""
    b = RedisBackend(redis_url, split_by_slot=True)
    try:
        await fill(b, 1)
        first = queued("first", capacity=1)
        bucket = BucketCheck(StoreKey("api", "tb", CALLER), 60.0, 5, 1)
        entry = await b.enqueue([bucket, first.lease], first)
        assert entry.outcome == "queued"
        assert entry.verdict.results[0].remaining == 4
        second = queued("second", capacity=1)
        entry = await b.enqueue([bucket, second.lease], second)
        assert entry.outcome == "full"
        assert entry.verdict.results[0].remaining == 4
    finally:
        await b.aclose()


async def test_a_release_on_the_cluster_wakes_a_waiter(redis_cluster_url: str) -> None:
    """On the 3-master cluster, a waiter is woken by a release from another connection."""
    a = RedisBackend(redis_cluster_url, cluster=True)
    b = RedisBackend(redis_cluster_url, cluster=True)
    try:
        (held,) = await fill(a, 1)
        q = queued("w")
        bucket = BucketCheck(StoreKey("api", "tb", CALLER), 60.0, 5, 1)
        assert (await a.enqueue([bucket, q.lease], q)).outcome == "queued"
        await a.tickets.subscriber.ready()
        task = asyncio.create_task(a.wait(q, 5.0))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await b.release(held)
        assert await task == "granted"
        assert loop.time() - started < tickets_module.WAIT_POLL  # pushed, not polled
        assert await a.in_use(SLOTS) == 1
    finally:
        await a.aclose()
        await b.aclose()


def test_a_waiter_is_woken_on_uvloop(redis_url: str) -> None:
    """The subscription works on uvloop (its transports are no asyncio.Transport)."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> str:
        a, b = RedisBackend(redis_url), RedisBackend(redis_url)
        try:
            (held,) = await fill(a, 1)
            q = queued("w")
            await a.enqueue([q.lease], q)
            await a.tickets.subscriber.ready()
            task = asyncio.create_task(a.wait(q, 5.0))
            await asyncio.sleep(0.05)
            started = asyncio.get_running_loop().time()
            await b.release(held)
            outcome = await task
            assert asyncio.get_running_loop().time() - started < tickets_module.WAIT_POLL
            return outcome
        finally:
            await a.aclose()
            await b.aclose()

    assert uvloop.run(main()) == "granted"
