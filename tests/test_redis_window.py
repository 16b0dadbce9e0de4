"""Window checks on Redis: one script call per decision, keys that expire, the Lua
against the pure algorithms bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio
from _servers import ManualClockRedisBackend, RedisServer
from asgi_helpers import http_scope
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratelimit import Concurrency, Rule, TokenBucket, Window, keys
from ratelimit.algorithms import window
from ratelimit.backends.base import StoreKey, WindowCheck
from ratelimit.backends.redis import RedisBackend
from ratelimit.core.engine import Engine

pytestmark = pytest.mark.redis

STRATEGIES = pytest.mark.parametrize("strategy", ["fixed", "sliding", "moving"])


def evalsha_calls(server: RedisServer) -> int:
    """EVALSHA calls the server has run so far (INFO commandstats)."""
    with redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2.0) as client:
        info = client.info("commandstats")
    return int(info.get("cmdstat_evalsha", {}).get("calls", 0))


@STRATEGIES
async def test_a_rule_with_window_bucket_and_concurrency_is_one_script_call(
    redis_server: RedisServer, redis_url: str, strategy: Any
) -> None:
    """One decision of Window + TokenBucket + Concurrency is exactly one EVALSHA, and the
    window's refusal leaves the bucket untouched."""
    rule = Rule(
        "/w",
        name=f"one-{strategy}",
        limits=[
            Window("2/minute", strategy=strategy, key=keys.client_ip()),
            TokenBucket("10/minute", key=keys.client_ip()),
            Concurrency(5, key=keys.client_ip()),
        ],
    )
    backend = RedisBackend(redis_url)
    engine = Engine([rule], backend)
    try:
        scope = http_scope("/w")
        decision = await engine.decide(rule, scope)  # loads the scripts, opens the connection
        assert decision.grant is not None
        await engine.release(decision.grant)
        before = evalsha_calls(redis_server)
        decision = await engine.decide(rule, scope)
        assert evalsha_calls(redis_server) - before == 1
        assert decision.allowed
        assert decision.grant is not None
        await engine.release(decision.grant)
        refused = await engine.decide(rule, scope)
        assert not refused.allowed
        assert [s.remaining for s in refused.states] == [0, 8, 5]  # bucket: 2 taken, not 3
    finally:
        await engine.aclose()
        await backend.aclose()


@STRATEGIES
async def test_window_keys_expire_when_the_window_is_empty_again(
    redis_url: str, strategy: Any
) -> None:
    """A window key carries a ttl of at most what its strategy needs (2 periods for sliding)."""
    backend = RedisBackend(redis_url, prefix=f"ttl-{strategy}")
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        key = StoreKey("r", "w", "0123456789abcdef0123456789abcdef")
        assert (await backend.decide([WindowCheck(key, 5, 60.0, strategy, 1, [])])).admitted
        name = backend.keys.window(key)
        ttl = await client.pttl(name)
        bound = 120_000 if strategy == "sliding" else 60_000
        assert 0 < ttl <= bound
        assert name.startswith(f"ttl-{strategy}:")
    finally:
        await client.aclose()
        await backend.aclose()


KEY = StoreKey("d", "w", "0123456789abcdef0123456789abcdef")
STEPS = st.lists(
    st.tuples(
        st.integers(0, 40_000_000),  # microseconds to advance
        st.sampled_from(["hit", "hit", "peek", "refund", "charge"]),
        st.integers(1, 3),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    strategy=st.sampled_from(["fixed", "sliding", "moving"]),
    limit=st.integers(1, 6),
    period=st.sampled_from([1.0, 7.5, 60.0]),
    steps=STEPS,
)
async def test_lua_windows_equal_the_pure_algorithms_bit_for_bit(
    redis_url: str, strategy: str, limit: int, period: float, steps: list[tuple[int, str, int]]
) -> None:
    """Same clock, same checks: decide.lua and refund.lua give what algorithms.window gives,
    refunds and charges (a settlement's debt, past the limit) included."""
    backend = ManualClockRedisBackend(redis_url, prefix="diffwin")
    step, undo, _ = window.STRATEGIES[strategy]
    micros = 1_760_000_000_000_000
    state: Any = None
    taken: list[WindowCheck] = []
    try:
        await backend.client.delete(backend.keys.window(KEY))
        for advance, op, cost in steps:
            micros += advance
            await backend.set_time(micros)
            sec, usec = divmod(micros, 1_000_000)
            now = sec + usec / 1e6
            if op == "refund":
                if taken:
                    check = taken.pop(0)
                    await backend.refund([check])
                    state = undo(state, now, check.cost, period, check.receipt[-1])
                continue
            if op == "charge":
                # A settlement's debt: units more for a hit made earlier, past the limit.
                if taken:
                    check = taken[0]
                    await backend.refund([check._replace(cost=-cost)])
                    state = undo(state, now, -cost, period, check.receipt[-1])
                    taken[0] = check._replace(cost=check.cost + cost)
                continue
            c = 0 if op == "peek" else cost
            check = WindowCheck(KEY, limit, period, strategy, c, [])
            got = (await backend.decide([check])).results[0]
            want = step(state, now, c, limit, period)
            assert (got.admitted, got.remaining, got.retry_after, got.reset_after) == (
                want.admitted,
                want.remaining,
                want.retry_after,
                want.reset_after,
            )
            if want.admitted and c:
                state = want.state
                assert check.receipt == [now]
                taken.append(check)
    finally:
        await backend.aclose()


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_a_waiter_that_times_out_gets_its_window_units_back(
    redis_url: str, where: str
) -> None:
    """A request that waited in line and was refused gives back the window units it took."""
    from ratelimit import MemoryBackend

    rule = Rule(
        "/q",
        name=f"waiter-{where}",
        limits=[
            Window("2/minute", strategy="moving", key=keys.client_ip()),
            Concurrency(1, queue=1, timeout=0.2, key=keys.GLOBAL),
        ],
    )
    backend: Any = MemoryBackend() if where == "memory" else RedisBackend(redis_url)
    engine = Engine([rule], backend)
    scope = http_scope("/q")
    try:
        holder = await engine.decide(rule, scope)
        assert holder.grant is not None
        waiter = await engine.decide(rule, scope)
        assert not waiter.allowed
        assert waiter.reason == "queue_timeout"
        await engine.release(holder.grant)
        # The waiter's unit came back: one of the two is left for this request.
        again = await engine.decide(rule, scope)
        assert again.allowed
        assert again.states[0].remaining == 0
        assert again.grant is not None
        await engine.release(again.grant)
    finally:
        await engine.aclose()
        await backend.aclose()
