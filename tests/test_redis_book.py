"""Appointments on real Redis: a refusal's appointment is kept, fleet-wide.

Most tests run the production scripts on the manual clock (the book's times
are then exact); the last one runs two OS processes on the server's clock:
an appointment one worker gives is honoured by another.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator

import pytest
from _servers import ManualClockRedisBackend

from ratelimit.algorithms.queue import grace_for, ticket_id
from ratelimit.backends.base import BucketCheck, LeaseCheck, QueueCheck, StoreKey
from ratelimit.backends.redis import RedisBackend

pytestmark = pytest.mark.redis

SLOTS = StoreKey("api", "gpu", "*")
T0 = 1_760_000_000_000_000  # microseconds: whole seconds, so due times are exact
SPACING = 1.0
_names = iter(range(1_000_000))


@pytest.fixture
async def clocked(redis_url: str) -> AsyncIterator[ManualClockRedisBackend]:
    b = ManualClockRedisBackend(redis_url)
    await b.set_time(T0)
    try:
        yield b
    finally:
        await b.aclose()


def request(
    fair: str, *, rank: int = 0, capacity: int = 1, spacing: float = SPACING, limit: int = 1
) -> QueueCheck:
    lease = LeaseCheck(SLOTS, limit, 60.0, ticket_id(rank, f"r{next(_names)}"))
    return QueueCheck(lease, capacity, rank, fair, (), capacity, spacing)


async def enqueue(backend: RedisBackend, q: QueueCheck) -> tuple[str, int, float]:
    entry = await backend.enqueue([q.lease], q)
    return entry.outcome, entry.length, entry.retry_in


async def full_line(backend: RedisBackend, *, rank: int = 0) -> None:
    """One slot held, one waiter (no fair key): a line of capacity 1 is full."""
    assert (await backend.decide([LeaseCheck(SLOTS, 1, 60.0, "held")])).admitted
    assert (await enqueue(backend, request("", rank=rank)))[0] == "queued"


async def test_a_refused_known_caller_gets_an_appointment(
    clocked: ManualClockRedisBackend,
) -> None:
    """A full line refuses with an appointment (line length + 1) * spacing away; without
    a fair key or a spacing there is none."""
    await full_line(clocked)
    assert await enqueue(clocked, request("cc")) == ("full", 1, 2.0)
    assert await enqueue(clocked, request("")) == ("full", 1, 0.0)
    assert await enqueue(clocked, request("dd", spacing=0.0)) == ("full", 1, 0.0)


async def test_keeping_the_appointment_joins_a_full_line(
    clocked: ManualClockRedisBackend,
) -> None:
    """Back on time, the caller joins the line past its capacity; the book is then empty
    and its keys are gone."""
    await full_line(clocked)
    assert (await enqueue(clocked, request("cc")))[2] == 2.0
    await clocked.set_time(T0 + 2_000_000)
    assert await enqueue(clocked, request("cc")) == ("queued", 2, 0.0)
    assert await clocked.client.exists(*clocked.keys.book(SLOTS)) == 0


async def test_an_early_return_gets_the_same_appointment(
    clocked: ManualClockRedisBackend,
) -> None:
    """Back too early: refused "too_long" with the same appointment, not a later one."""
    await full_line(clocked)
    assert (await enqueue(clocked, request("cc")))[2] == 2.0
    await clocked.set_time(T0 + 500_000)
    assert await enqueue(clocked, request("cc")) == ("too_long", 1, 1.5)


async def test_a_lapsed_appointment_is_dropped(clocked: ManualClockRedisBackend) -> None:
    """Not kept within its grace, an appointment lapses: the late caller is refused as a
    newcomer and booked afresh; the book's keys never outlive its last grace."""
    spacing = 0.5  # due in 1 s, lapsed 2 s later: the waiter's ticket (5 s) still holds
    await full_line(clocked)
    assert (await enqueue(clocked, request("cc", spacing=spacing)))[2] == 1.0
    due_key = clocked.keys.book(SLOTS)[0]
    asked = await clocked.client.hget("ratelimit-test:ttl", due_key)
    assert asked is not None
    lapses = 1.0 + grace_for(spacing)
    assert 1000 * lapses <= int(asked) <= 1000 * (lapses + 2)
    await clocked.set_time(T0 + int(lapses * 1e6) + 1)
    assert await enqueue(clocked, request("cc", spacing=spacing)) == ("full", 1, 1.0)
    assert await clocked.client.zcard(due_key) == 1


async def test_a_paid_newcomer_is_not_booked_behind_free_appointments(
    clocked: ManualClockRedisBackend,
) -> None:
    """Free appointments outstanding: a free newcomer is booked after them, a paid one
    goes to the line (shedding the free waiter)."""
    await full_line(clocked, rank=1)
    assert await enqueue(clocked, request("f1", rank=1)) == ("full", 1, 2.0)
    assert await enqueue(clocked, request("f2", rank=1)) == ("too_long", 1, 3.0)
    assert await enqueue(clocked, request("paid", rank=0)) == ("queued", 1, 0.0)


async def test_a_timed_out_waiter_is_given_an_appointment(
    clocked: ManualClockRedisBackend,
) -> None:
    """appoint: after the line's own wait; none without a fair key or a spacing."""
    await full_line(clocked)
    gave_up = request("cc")
    assert await clocked.appoint(gave_up) == 2.0
    assert await clocked.appoint(gave_up) == 2.0  # asking again: the same one
    assert await clocked.appoint(request("dd")) == 3.0
    assert await clocked.appoint(request("")) == 0.0
    assert await clocked.appoint(request("ee", spacing=0.0)) == 0.0


async def test_split_slots_carry_the_appointment_and_refund_the_bucket(redis_url: str) -> None:
    """Split by slot (as on a cluster): the refusal keeps its appointment, the per-caller
    bucket on another slot gets its unit back."""
    b = RedisBackend(redis_url, split_by_slot=True)
    try:
        await full_line(b)
        bucket = BucketCheck(StoreKey("api", "tb", "cafe"), 60.0, 5, 1)
        q = request("cafe")
        entry = await b.enqueue([bucket, q.lease], q)
        assert entry.outcome == "full"
        assert 1.0 < entry.retry_in <= 2.0
        assert entry.verdict.results[0].remaining == 5
    finally:
        await b.aclose()


async def test_the_book_runs_on_the_cluster(redis_cluster_url: str) -> None:
    """On the 3-master cluster every key a script touches is declared and on one slot:
    enqueue refuses with an appointment, appoint gives one, the caller keeps its own."""
    b = RedisBackend(redis_cluster_url, cluster=True)
    try:
        await full_line(b)
        entry = await b.enqueue([(q := request("cafe")).lease], q)
        assert entry.outcome == "full"
        assert 1.0 < entry.retry_in <= 2.0
        assert 0.0 < await b.appoint(request("cafe")) <= entry.retry_in
        assert 2.0 < await b.appoint(request("beef")) <= 3.0
    finally:
        await b.aclose()


# -- two processes, one book --------------------------------------------------------

SPAWN = multiprocessing.get_context("spawn")


def _refused_elsewhere(url: str, out: multiprocessing.SimpleQueue[float]) -> None:
    """Another worker: the caller's request is refused there, with an appointment."""

    async def run() -> float:
        backend = RedisBackend(url)
        try:
            q = request("cafe", spacing=0.5)
            entry = await backend.enqueue([q.lease], q)
            assert entry.outcome == "full"
            return entry.retry_in
        finally:
            await backend.aclose()

    out.put(asyncio.run(run()))


@pytest.mark.slow
async def test_an_appointment_given_in_one_process_is_kept_in_another(redis_url: str) -> None:
    """The book is the fleet's: the caller comes back to another worker and joins the
    full line there."""
    backend = RedisBackend(redis_url)
    try:
        await full_line(backend)
        out: multiprocessing.SimpleQueue[float] = SPAWN.SimpleQueue()
        child = SPAWN.Process(target=_refused_elsewhere, args=(redis_url, out))
        child.start()
        await asyncio.to_thread(child.join, 60)
        assert child.exitcode == 0
        retry_in = out.get()
        assert 0.5 < retry_in <= 1.0 + 1e-9  # (1 waiting + 1) * 0.5 s, less time elapsed
        early = request("cafe", spacing=0.5)
        assert (await backend.enqueue([early.lease], early)).outcome == "too_long"
        await asyncio.sleep(retry_in)
        back = request("cafe", spacing=0.5)
        entry = await backend.enqueue([back.lease], back)
        assert (entry.outcome, entry.length) == ("queued", 2)
    finally:
        await backend.aclose()
