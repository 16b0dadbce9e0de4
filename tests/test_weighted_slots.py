"""Weighted slots: `Concurrency(counts=...)`, where a request holds its cost in slots.

Through `Limiter` and the middleware on the memory backend, a real Redis and a
real 3-master Redis Cluster (the backend contract for weighted leases is in
test_backend_contract.py; the line's hand-off against its Lua in
test_redis_queue_differential.py). These pools count `requests`, the one
dimension an int cost has, so `acquire(cost=w)` holds w slots.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgi_helpers import http_scope
from prometheus_client import REGISTRY, CollectorRegistry
from test_limiter import make_backend

from ratelimit import (
    Concurrency,
    ConfigError,
    Limiter,
    MemoryBackend,
    Metrics,
    RateLimited,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    keys,
)
from ratelimit._types import Message, Receive, Scope, Send
from ratelimit.algorithms import queue
from ratelimit.algorithms.leases import weight_of, weighted_id
from ratelimit.core.decision import OVERSIZED, Given
from ratelimit.core.engine import Engine

BACKENDS = ["memory", "redis", "redis-cluster"]


def gpus(slots: int = 8, name: str = "images", **kw: Any) -> Rule:
    """A fleet-wide pool of `slots` GPUs, a request holding as many as it costs."""
    return Rule(
        f"/{name}",
        name=name,
        limits=[
            TokenBucket("1000/second", burst=1000, key=keys.header("x-key"), name="per-key"),
            Concurrency(slots, key=keys.GLOBAL, name="gpus", counts="requests", **kw),
        ],
    )


@pytest.fixture(params=BACKENDS)
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    if request.param != "memory":
        request.applymarker(pytest.mark.redis)
    rules = [
        gpus(8),
        gpus(4, "line", queue=8, timeout=20.0),
        Rule("/plain", name="plain", limits=[Concurrency(8)]),
    ]
    async with Limiter(rules=rules, backend=make_backend(request.param, request)) as lim:
        yield lim


async def in_flight(limiter: Limiter, rule: str = "images") -> int:
    return sum(s.in_flight for s in await limiter.statistics(rule, key="k"))


async def waiting(limiter: Limiter, rule: str) -> int:
    return sum(s.waiting for s in await limiter.statistics(rule, key="k"))


async def until(probe: Any, expected: int) -> None:
    """Poll `probe()` until it answers `expected` (hand-offs arrive in the background)."""
    for _ in range(400):
        if await probe() == expected:
            return
        await asyncio.sleep(0.01)
    assert await probe() == expected


# -- pure: ids and the line's policy ---------------------------------------------------


def test_a_weighted_id_carries_its_weight_and_a_plain_one_weighs_one() -> None:
    """The weight travels in the lease id; ids without the mark hold one slot."""
    assert weight_of(weighted_id("0003~abc-7", 4)) == 4
    assert weight_of("0003~abc-7") == weight_of("abc*x") == 1


def _line(*weights: int) -> queue.QueueState:
    state = queue.QueueState()
    for n, w in enumerate(weights):
        state.insert(0, "", weighted_id(f"t{n}", w))
    return state


def test_a_heavy_head_is_passed_by_one_pool_of_light_waiters_then_reserves() -> None:
    """Pool 4, all held by 4 others: a head of 3 lets light waiters take 4 freed slots
    past it, then keeps every freed slot until it fits; then the light ones go on."""
    state = _line(3, 1, 1, 1, 1, 1)
    held = [weighted_id(f"h{n}", 1) for n in range(4)]
    granted: list[str] = []
    for _ in range(4):  # each release frees one slot: a light waiter backfills it
        held.pop()
        got = [w.ticket for w in queue.hand_off(state, held, 4, {})]
        granted += got
        held += got
    assert granted == ["t1*1", "t2*1", "t3*1", "t4*1"]
    for _ in range(2):  # the budget is spent: freed slots wait for the head
        held.pop()
        assert queue.hand_off(state, held, 4, {}) == []
    held.pop()
    assert [w.ticket for w in queue.hand_off(state, held, 4, {})] == ["t0*3"]
    assert [w.ticket for w in queue.hand_off(state, ["t0*3"], 4, {})] == ["t5*1"]


def test_an_unweighted_line_hands_slots_over_in_order() -> None:
    """Without weights the hand-off is the plain order, one slot per waiter."""
    state = queue.QueueState()
    for n in range(3):
        state.insert(0, "", f"t{n}")
    assert [w.ticket for w in queue.hand_off(state, ["x"], 3, {})] == ["t0", "t1"]


def test_a_head_that_can_never_fit_reserves_nothing() -> None:
    """A head heavier than its (lowered) limit does not hold light waiters back."""
    state = _line(5, 1, 1, 1, 1, 1)
    got = queue.hand_off(state, [], 4, {})
    assert [w.ticket for w in got] == ["t1*1", "t2*1", "t3*1", "t4*1"]


# -- construction --------------------------------------------------------------------


def test_a_constant_cost_heavier_than_the_pool_fails_at_construction() -> None:
    """No request of the rule could ever be admitted: a ConfigError names the limit."""
    with pytest.raises(ConfigError, match=r"limits\[0\]\.limit: .*at least the 5 slots"):
        Rule("/x", limits=[Concurrency(4, counts="requests")], cost=5)
    with pytest.raises(ConfigError, match=r"limits\[0\]\.counts"):
        Rule("/x", limits=[Concurrency(4, counts="gpus")], cost=1)
    Rule("/x", limits=[Concurrency(4)], cost=5)  # unweighted: one slot whatever the cost


# -- through the Limiter, on every backend ------------------------------------------------


async def test_a_request_holds_its_weight_and_gives_it_back(limiter: Limiter) -> None:
    """Two requests of 4 fill a pool of 8; a third of 1 is refused; a release frees 4."""
    async with limiter.acquire("images", key="k", cost=4):
        async with limiter.acquire("images", key="k", cost=4):
            assert await in_flight(limiter) == 8
            with pytest.raises(RateLimited) as refused:
                async with limiter.acquire("images", key="k", cost=1):
                    pass
            assert (refused.value.decision.status, refused.value.decision.reason) == (503, None)
        assert await in_flight(limiter) == 4
        async with limiter.acquire("images", key="k", cost=4):
            assert await in_flight(limiter) == 8
    await until(lambda: in_flight(limiter), 0)


async def test_an_unweighted_pool_holds_one_slot_whatever_the_cost(limiter: Limiter) -> None:
    """Concurrency without counts= holds one slot per request, as before."""
    async with limiter.acquire("plain", cost=5):
        assert await in_flight(limiter, "plain") == 1


async def test_a_request_heavier_than_the_pool_is_refused_at_once(limiter: Limiter) -> None:
    """9 of 8 slots: refused without waiting in line, nothing consumed, no retry time."""
    for rule, cost in (("images", 9), ("line", 5)):
        with pytest.raises(RateLimited) as refused:
            async with limiter.acquire(rule, key="k", cost=cost):
                pass
        decision = refused.value.decision
        assert (decision.status, decision.reason, decision.retry_after) == (
            503,
            OVERSIZED,
            math.inf,  # never, as for a cost over a rate limit's capacity
        )
        assert decision.violated == ["gpus"]
    assert await in_flight(limiter) == await waiting(limiter, "line") == 0
    outcome = {"rule": "images", "limit": "gpus", "outcome": "rejected"}
    assert REGISTRY.get_sample_value("ratelimit_decisions_total", outcome)


async def test_a_heavy_waiter_is_not_starved_by_light_ones(limiter: Limiter) -> None:
    """Pool 4, held by four 1-slot requests; a 4-slot request waits, then 1-slot ones.
    Four light waiters take freed slots past it (one pool's worth), then it reserves
    the slots that free, is served, and the light ones behind it follow."""
    done: dict[str, asyncio.Event] = {}
    got: dict[str, asyncio.Event] = {}

    async def hold(name: str, cost: int) -> None:
        async with limiter.acquire("line", key="k", cost=cost):
            got[name].set()
            await done[name].wait()

    tasks = []

    async def start(name: str, cost: int, waiters: int = -1) -> None:
        done[name], got[name] = asyncio.Event(), asyncio.Event()
        tasks.append(asyncio.create_task(hold(name, cost)))
        if waiters < 0:
            await got[name].wait()
        else:  # joined the line: its place is fixed before the next one comes
            await until(lambda: waiting(limiter, "line"), waiters)

    async def release(name: str) -> None:
        done[name].set()
        await asyncio.sleep(0)

    try:
        for n in range(4):
            await start(f"h{n}", 1)
        await start("heavy", 4, waiters=1)
        for n in range(6):
            await start(f"l{n}", 1, waiters=n + 2)
        for n in range(4):  # each freed slot goes to a light waiter, past the heavy one
            await release(f"h{n}")
            await asyncio.wait_for(got[f"l{n}"].wait(), 5)
        assert not got["heavy"].is_set()
        for n in range(3):  # the budget is spent: freed slots are kept for the heavy one
            await release(f"l{n}")
            await until(lambda: in_flight(limiter, "line"), 3 - n)
        assert not got["l4"].is_set()
        assert await waiting(limiter, "line") == 3
        await release("l3")
        await asyncio.wait_for(got["heavy"].wait(), 5)
        assert await in_flight(limiter, "line") == 4
        await release("heavy")
        await asyncio.wait_for(got["l4"].wait(), 5)
        await asyncio.wait_for(got["l5"].wait(), 5)
        for n in (4, 5):
            await release(f"l{n}")
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await until(lambda: in_flight(limiter, "line"), 0)


# -- the engine and the faces (memory) ---------------------------------------------------


async def test_weight_zero_holds_nothing() -> None:
    """A request that costs nothing in the counted dimension holds no slot (no lease)."""
    engine = Engine([gpus(1)], MemoryBackend())
    decision = await engine.decide(engine.rules[0], {}, given=Given(("k", "k"), 0))
    assert decision.allowed
    assert decision.grant is None
    assert [s.exempt for s in decision.states] == [False, True]
    await engine.aclose()


async def test_in_flight_gauge_and_statistics_count_slots() -> None:
    """Metrics' in_flight and LimitStatistics count the slots a weighted request holds."""
    registry = CollectorRegistry()
    async with Limiter(rules=[gpus(8)], metrics=Metrics(registry)) as limiter:

        def gauge() -> float | None:
            return registry.get_sample_value(
                "ratelimit_in_flight", {"rule": "images", "limit": "gpus"}
            )

        async with limiter.acquire("images", key="k", cost=3):
            assert gauge() == 3.0
            assert await in_flight(limiter) == 3
        assert gauge() == 0.0


async def _call(app: RateLimitMiddleware, n: str) -> tuple[int, dict[bytes, bytes], Any]:
    start: dict[str, Any] = {}
    body = bytearray()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            body.extend(message.get("body", b""))

    await app(http_scope("/images", "POST", [(b"x-n", n.encode())]), receive, send)
    return int(start["status"]), dict(start.get("headers", [])), json.loads(body or b"null")


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_an_oversized_request_is_refused_without_a_retry_after() -> None:
    """The middleware answers 503 with no Retry-After (no wait would admit it), and a
    cost function that does not price the counted dimension is the request's 400."""

    def cost(scope: Scope) -> int:
        return int(dict(scope["headers"])[b"x-n"])

    weighted = Rule("/images", limits=[Concurrency(8, counts="requests")], cost=cost)
    app = RateLimitMiddleware(_ok, rules=[weighted])
    assert (await _call(app, "8"))[0] == 200
    status, headers, problem = await _call(app, "9")
    assert (status, b"retry-after" in headers) == (503, False)
    assert headers[b"x-should-retry"] == b"false"
    assert "never admitted" in problem["detail"]
    await app.aclose()
    unpriced = Rule("/images", limits=[Concurrency(8, counts="gpus")], cost=cost)
    app = RateLimitMiddleware(_ok, rules=[unpriced])
    assert (await _call(app, "2"))[0] == 400
    await app.aclose()
