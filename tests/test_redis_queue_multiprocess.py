"""One waiting line across 4 OS processes on one real Redis.

First, order: waiters are parked in the 4 processes in a known global order,
one slot, and each grantee releases its slot from its own process; the line
must admit them in exactly that order, each hand-off crossing processes.
Then load: 4 processes x 8 tasks enqueue, wait (some time out), hold and
release; the in-flight count never exceeds the limit, and afterwards no slot
is held and nobody waits.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import random
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest
import redis.asyncio

from ratelimit._errors import BackendError
from ratelimit.algorithms.queue import ticket_id
from ratelimit.backends.base import LeaseCheck, QueueCheck, StoreKey
from ratelimit.backends.redis import RedisBackend

pytestmark = [pytest.mark.redis, pytest.mark.slow]

PROCESSES = 4
SPAWN = multiprocessing.get_context("spawn")
SLOTS = StoreKey("mpq", "gpu", "*")
INFLIGHT = "mpq-test:inflight"


def _queued(name: str, limit: int, capacity: int = 64) -> QueueCheck:
    lease = LeaseCheck(SLOTS, limit, 10.0, ticket_id(0, name))
    return QueueCheck(lease, capacity, 0, "", (), capacity)


# -- order ------------------------------------------------------------------------------


def _order_worker(url: str, index: int, orders: Connection, results: Any) -> None:
    asyncio.run(_park_and_serve(url, index, orders, results))


async def _park_and_serve(url: str, index: int, orders: Connection, results: Any) -> None:
    """Enqueue each waiter the parent names, then serve: report a grant, hold, release."""
    backend = RedisBackend(url)
    parked: list[QueueCheck] = []
    try:
        while True:
            name = await asyncio.to_thread(orders.recv)
            if name is None:
                break
            q = _queued(name, 1)
            entry = await backend.enqueue([q.lease], q)
            assert entry.outcome == "queued", entry
            parked.append(q)
            orders.send(entry.position)
        await backend.tickets.subscriber.ready()
        orders.send("ready")

        async def serve(q: QueueCheck) -> None:
            outcome = await backend.wait(q, 30.0)
            results.put((index, q.lease.lease_id, outcome))
            await asyncio.sleep(0.005)
            await backend.release(q.lease)

        await asyncio.gather(*(serve(q) for q in parked))
    finally:
        await backend.aclose()


async def test_one_line_across_processes_admits_in_global_order(redis_url: str) -> None:
    """Waiters parked in 4 processes are admitted in their global arrival order, each
    release in one process handing the slot to the head waiter in another."""
    backend = RedisBackend(redis_url)
    holder = LeaseCheck(SLOTS, 1, 10.0, "holder")
    assert (await backend.decide([holder])).admitted
    results = SPAWN.Queue()
    pipes = [SPAWN.Pipe() for _ in range(PROCESSES)]
    procs = [
        SPAWN.Process(target=_order_worker, args=(redis_url, i, pipes[i][1], results))
        for i in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        expected: list[str] = []
        for k in range(3 * PROCESSES):  # round-robin over processes, shuffled per round
            i = (k * 3 + k // PROCESSES) % PROCESSES
            name = f"p{i}-w{k}"
            pipes[i][0].send(name)
            assert await asyncio.to_thread(pipes[i][0].recv) == k  # its place in line
            expected.append(ticket_id(0, name))
        for parent, _ in pipes:
            parent.send(None)
            assert await asyncio.to_thread(parent.recv) == "ready"
        assert await backend.release(holder)
        got = [await asyncio.to_thread(results.get, True, 30) for _ in expected]
        assert [ticket for _, ticket, _ in got] == expected
        assert {outcome for _, _, outcome in got} == {"granted"}
        handoffs = sum(1 for a, b in itertools.pairwise(got) if a[0] != b[0])
        assert handoffs >= len(expected) // 2  # releases crossed processes
        for proc in procs:
            await asyncio.to_thread(proc.join, 30)
        assert (await backend.in_use(SLOTS), await backend.queue_length(SLOTS)) == (0, 0)
    finally:
        await backend.aclose()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()


# -- load ---------------------------------------------------------------------------------


def _load_worker(url: str, barrier: Barrier, results: Any, limit: int) -> None:
    results.put(asyncio.run(_churn(url, barrier, limit)))


async def _churn(url: str, barrier: Barrier, limit: int) -> dict[str, Any]:
    backend = RedisBackend(url)
    counter = redis.asyncio.Redis.from_url(url)
    counts: dict[str, Any] = {"granted": 0, "admitted": 0, "timeout": 0, "refused": 0}
    counts.update(peak=0, lost=0, failures=[])
    await backend.in_use(SLOTS)
    await counter.ping()
    await asyncio.to_thread(barrier.wait, 60)
    deadline = time.monotonic() + 1.5
    pid = os.getpid()
    seq = 0

    async def task() -> None:
        nonlocal seq
        while time.monotonic() < deadline:
            seq += 1
            q = _queued(f"{pid}-{seq}", limit, capacity=24)
            try:
                entry = await backend.enqueue([q.lease], q)
                outcome = entry.outcome
                if outcome == "queued":
                    outcome = await backend.wait(q, random.choice([0.05, 2.0, 2.0]))
            except BackendError as exc:
                counts["failures"].append(repr(exc.__cause__))
                continue
            if outcome not in ("admitted", "granted"):
                counts["timeout" if outcome == "timeout" else "refused"] += 1
                continue
            counts[outcome] += 1
            inflight = await counter.incr(INFLIGHT)
            counts["peak"] = max(counts["peak"], inflight)
            await asyncio.sleep(random.uniform(0, 0.004))
            await counter.decr(INFLIGHT)
            if not await backend.release(q.lease):
                counts["lost"] += 1

    await asyncio.gather(*(task() for _ in range(8)))
    await counter.aclose()
    await backend.aclose()
    return counts


def test_limit_holds_and_no_slot_is_lost_with_queues_across_processes(redis_url: str) -> None:
    """4 processes churn one queued key: in flight never exceeds the limit, and
    afterwards nothing is held and nobody waits."""
    limit = 3
    barrier = SPAWN.Barrier(PROCESSES)
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_load_worker, args=(redis_url, barrier, results, limit))
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    total = {k: sum(o[k] for o in outcomes) for k in ("granted", "admitted", "timeout", "lost")}
    print(f"\n{total}, peak {max(o['peak'] for o in outcomes)}")
    assert [f for o in outcomes for f in o["failures"]] == []
    assert max(o["peak"] for o in outcomes) <= limit
    assert total["lost"] == 0
    assert total["granted"] > 50  # most admissions came through the line

    async def after() -> tuple[int, int]:
        backend = RedisBackend(redis_url)
        try:
            return await backend.in_use(SLOTS), await backend.queue_length(SLOTS)
        finally:
            await backend.aclose()

    assert asyncio.run(after()) == (0, 0)
