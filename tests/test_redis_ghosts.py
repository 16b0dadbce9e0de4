"""Ghost leases: a decision whose reply was late or lost leaves no slot taken once Redis answers.

Redis may run a decide whose reply never reaches its caller (the reply is late,
the connection is dropped, the caller is cancelled): the lease it records is held
by nobody. Under `Concurrency(1, key=keys.GLOBAL)` that refused everyone for the
whole lease time (30 s) after Redis answered again, whatever the fail policy.
Each test makes such a ghost on a real redis-server and asserts that, within
`BOUND` seconds of Redis answering again, a request is admitted by Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import pytest
from _servers import RedisClusterServers, RedisServer, command, debug_sleep
from asgi_helpers import eventually, http_scope

from ratelimit import Concurrency, RateLimitMiddleware, RedisBackend, Rule, TokenBucket, keys
from ratelimit._types import Message, Receive, Scope, Send
from ratelimit.backends.base import StoreKey
from ratelimit.core.engine import Engine
from ratelimit.policy.keys import digest
from ratelimit.policy.rules import FailPolicy

pytestmark = pytest.mark.redis

#: Seconds after Redis answers again within which the pool must admit (generous: the
#: requirement is about a second; the ghost's lease would hold it for 30).
BOUND = 1.5
POLICIES: list[FailPolicy] = ["open", "closed", "local"]
SLOTS = StoreKey("gen", "gpu", "*")


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def pool(backend: RedisBackend, fail: FailPolicy, weight: int = 0) -> RateLimitMiddleware:
    """`hello` behind one fleet-wide slot, with a lease time far past the test's bound;
    with `weight`, a weighted pool of that many slots, each request holding all of them."""
    if weight:
        gpu = Concurrency(weight, key=keys.GLOBAL, name="gpu", counts="requests")
        rule = Rule("/gen", name="gen", limits=[gpu], cost=weight)
    else:
        rule = Rule("/gen", name="gen", limits=[Concurrency(1, key=keys.GLOBAL, name="gpu")])
    return RateLimitMiddleware(hello, rules=[rule], backend=backend, fail=fail)


async def call(app: RateLimitMiddleware) -> tuple[int, dict[bytes, bytes]]:
    """One POST /gen into the ASGI app: status and headers."""
    start: dict[str, Any] = {}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)

    await app(http_scope("/gen", "POST"), receive, send)
    return int(start["status"]), dict(start.get("headers", []))


async def admitted_by_redis(app: RateLimitMiddleware, backend: RedisBackend) -> bool:
    """One request: True if Redis decided it (no failure, breaker closed) and admitted it."""
    status, headers = await call(app)
    decided = backend.breaker.state == "closed" and not app.limiter.failing
    return decided and status == 200 and b"ratelimit" in headers


async def assert_admitted_soon(app: RateLimitMiddleware, backend: RedisBackend) -> float:
    """Poll until Redis admits a request; fail past BOUND seconds. Returns the seconds taken."""
    started = time.monotonic()
    while not await admitted_by_redis(app, backend):
        waited = time.monotonic() - started
        assert waited < BOUND, f"the slot was still taken {waited:.2f}s after Redis answered"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def until_free(backend: RedisBackend) -> None:
    deadline = time.monotonic() + 5.0
    while await backend.in_use(SLOTS):
        assert time.monotonic() < deadline, "the slot was never released"
        await asyncio.sleep(0.01)


def lane_written(backend: RedisBackend) -> bool:
    """Whether the backend's connection has a call written and not answered yet."""
    lane = backend.guard.transport._lane  # type: ignore[attr-defined]
    return lane is not None and lane._written > lane._answered


@pytest.mark.parametrize("fail", POLICIES)
async def test_a_decision_that_outlasts_the_timeout_leaves_no_slot_taken(
    debug_redis: RedisServer, fail: FailPolicy
) -> None:
    """DEBUG SLEEP longer than the timeout: the late decide's lease is undone once Redis wakes."""
    backend = RedisBackend(debug_redis.url, timeout=0.2, breaker_reset=0.25)
    app = pool(backend, fail)
    try:
        assert await admitted_by_redis(app, backend)  # connected, scripts loaded
        sleeping = await debug_sleep(debug_redis, 0.8)
        status, _ = await call(app)  # times out: the policy answers
        assert status == (503 if fail == "closed" else 200)
        await sleeping  # Redis answers again, and runs the late decide
        await assert_admitted_soon(app, backend)
    finally:
        await app.aclose()


async def test_a_weighted_ghost_gives_back_its_weight(debug_redis: RedisServer) -> None:
    """A late decide of a lease holding 4 of 4 slots: undone, all 4 are free again."""
    backend = RedisBackend(debug_redis.url, timeout=0.2, breaker_reset=0.25)
    app = pool(backend, "closed", weight=4)
    try:
        assert await admitted_by_redis(app, backend)
        sleeping = await debug_sleep(debug_redis, 0.8)
        assert (await call(app))[0] == 503
        await sleeping
        await assert_admitted_soon(app, backend)
        await until_free(backend)
    finally:
        await app.aclose()


@pytest.mark.parametrize("fail", POLICIES)
async def test_a_decision_sent_to_a_stopped_redis_leaves_no_slot_taken(
    private_redis: RedisServer, fail: FailPolicy
) -> None:
    """SIGSTOP, a decide that times out, SIGCONT: Redis runs it late; its lease is undone."""
    backend = RedisBackend(private_redis.url, timeout=0.2, breaker_reset=0.25)
    app = pool(backend, fail)
    pid = private_redis.pid
    assert pid is not None
    try:
        assert await admitted_by_redis(app, backend)
        os.kill(pid, signal.SIGSTOP)
        try:
            status, _ = await call(app)
            assert status == (503 if fail == "closed" else 200)
            await asyncio.sleep(0.3)  # Redis stays stopped a while: retries fail meanwhile
        finally:
            os.kill(pid, signal.SIGCONT)
        await assert_admitted_soon(app, backend)
    finally:
        await app.aclose()


@pytest.mark.parametrize("fail", POLICIES)
async def test_a_decision_whose_connection_is_killed_leaves_no_slot_taken(
    debug_redis: RedisServer, fail: FailPolicy
) -> None:
    """CLIENT KILL while a decide is pending: whether it lands before the decide's reply or
    before the release that followed it, the slot is free soon after Redis answers."""
    backend = RedisBackend(debug_redis.url, timeout=3.0, breaker_reset=0.25)
    app = pool(backend, fail)
    try:
        assert await admitted_by_redis(app, backend)
        sleeping = await debug_sleep(debug_redis, 0.5)
        request = asyncio.ensure_future(call(app))
        await eventually(lambda: lane_written(backend), 5.0)  # the decide is in Redis's input
        # Read after the decide once Redis wakes: it lands before the decide's reply or
        # before the release that follows it.
        kill_all = ("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        kill = asyncio.ensure_future(
            asyncio.to_thread(command, debug_redis.port, *kill_all, timeout=10)
        )
        status, _ = await request
        assert status == 200 or (status == 503 and fail == "closed")
        with contextlib.suppress(OSError):  # the sleeping client is killed too
            await sleeping
        await kill
        await assert_admitted_soon(app, backend)
    finally:
        await app.aclose()


@pytest.mark.parametrize("fail", POLICIES)
async def test_a_request_cancelled_mid_decision_leaves_no_slot_taken(
    debug_redis: RedisServer, fail: FailPolicy
) -> None:
    """An outer wait_for cancels the request while its decide waits in Redis: undone after it."""
    backend = RedisBackend(debug_redis.url, timeout=3.0, breaker_reset=0.25)
    app = pool(backend, fail)
    try:
        assert await admitted_by_redis(app, backend)
        sleeping = await debug_sleep(debug_redis, 0.5)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(call(app), 0.1)
        await sleeping
        await assert_admitted_soon(app, backend)
    finally:
        await app.aclose()


async def test_a_cancelled_decision_on_a_cluster_leaves_no_slot_taken(
    redis_cluster: RedisClusterServers, redis_cluster_url: str
) -> None:
    """On Redis Cluster a ghost is undone on the node of its slot too."""
    backend = RedisBackend(redis_cluster_url, cluster=True, timeout=3.0)
    rule = Rule("/gen", name="gen", limits=[Concurrency(1, key=keys.GLOBAL, name="gpu")])
    engine = Engine([rule], backend)
    node = redis_cluster.node_of(backend.keys.leases(SLOTS))
    assert node.pid is not None
    try:
        first = await engine.decide(engine.rules[0], http_scope("/gen"))
        assert first.allowed
        assert first.grant is not None
        await engine.release(first.grant)
        await until_free(backend)  # the release ran before the node stops
        os.kill(node.pid, signal.SIGSTOP)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(engine.decide(engine.rules[0], http_scope("/gen")), 0.1)
        finally:
            os.kill(node.pid, signal.SIGCONT)
        started = time.monotonic()
        while True:
            decision = await engine.decide(engine.rules[0], http_scope("/gen"))
            if decision.allowed:
                break
            assert time.monotonic() - started < BOUND, "the ghost's slot was still taken"
            await asyncio.sleep(0.02)
        assert decision.grant is not None
        await engine.release(decision.grant)
    finally:
        await engine.aclose()
        await backend.aclose()


async def test_a_cancelled_decision_across_slots_gives_back_the_slots_it_took(
    redis_cluster: RedisClusterServers, redis_cluster_url: str
) -> None:
    """A caller cancelled while a later slot is pending keeps no units of the slots before."""
    backend = RedisBackend(redis_cluster_url, cluster=True, timeout=3.0)
    rule = Rule(
        "/gen",
        name="gen",
        limits=[
            TokenBucket("1/hour", burst=1, key=keys.header("x-key"), name="per-key"),
            Concurrency(1, key=keys.GLOBAL, name="gpu"),
        ],
    )
    engine = Engine([rule], backend)
    pool = redis_cluster.node_of(backend.keys.leases(SLOTS))
    assert pool.pid is not None
    # A caller whose bucket lives on another node than the pool: its slot is decided first.
    caller = next(
        text
        for text in (f"caller-{n}" for n in range(100))
        if redis_cluster.node_of(backend.keys.bucket(StoreKey("gen", "per-key", digest(text))))
        is not pool
    )
    scope = http_scope("/gen", headers=[(b"x-key", caller.encode())])
    try:
        # Connected to every node before the pool's stops: another caller takes and gives back.
        warm = await engine.decide(engine.rules[0], http_scope("/gen", headers=[(b"x-key", b"w")]))
        assert warm.grant is not None
        await engine.release(warm.grant)
        await until_free(backend)
        os.kill(pool.pid, signal.SIGSTOP)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(engine.decide(engine.rules[0], scope), 0.3)
        finally:
            os.kill(pool.pid, signal.SIGCONT)
        started = time.monotonic()
        while True:
            decision = await engine.decide(engine.rules[0], scope)
            if decision.allowed:
                break
            assert "per-key" not in decision.violated, "the cancelled caller's unit stayed taken"
            assert time.monotonic() - started < BOUND, "the pool's ghost slot was still taken"
            await asyncio.sleep(0.02)
        assert decision.grant is not None
        await engine.release(decision.grant)
    finally:
        await engine.aclose()
        await backend.aclose()
