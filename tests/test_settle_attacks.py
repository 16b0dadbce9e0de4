"""Settling under attack: actual costs at the edges of what is valid, settlements a
cancellation interrupts, and stores that must agree with each other.

Each test pins a way a settlement once lost or leaked units, or hung the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _limiters import Factory
from asgi_helpers import Exchange, http_scope

from ratelimit import (
    Limiter,
    MemoryBackend,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
    Window,
    keys,
)
from ratelimit.backends.base import Backend
from ratelimit.policy.costs import MAX_COST
from ratelimit.policy.effective import resolve
from ratelimit.policy.overrides import Override


async def limiter_of(
    make_backend: Factory, closing: list[Limiter], *limits: Any, cost: Any
) -> Limiter:
    limiter = Limiter([Rule(name="chat", limits=list(limits), cost=cost)], backend=make_backend(),
                      metrics=None)  # fmt: skip
    await limiter.start()
    closing.append(limiter)
    return limiter


@pytest.mark.parametrize("actual", [10**12, MAX_COST])
async def test_a_debt_far_past_any_expiry_redis_takes_is_still_charged(
    make_backend: Factory, closing: list[Limiter], actual: int
) -> None:
    """A bucket's debt of `actual` units at one per 8640 s is due in up to 10**20 s: its
    key's expiry once reached Redis as "7.8e+23" ms, which it refuses, and the whole
    charge was dropped (memory took it)."""
    limiter = await limiter_of(
        make_backend, closing,
        TokenBucket("10/day", burst=10, key=keys.GLOBAL, counts="output_tokens"),
        cost={"output_tokens": 5},
    )  # fmt: skip
    decision = await limiter.check("chat")
    assert decision.allowed
    assert await decision.settle({"output_tokens": actual})
    refused = await limiter.check("chat", cost={"output_tokens": 1})
    assert not refused.allowed
    # Due when the debt (actual - 10 units past a full bucket, then 1 more) is paid off.
    assert refused.states[0].retry_after == pytest.approx((actual - 9) * 8640.0, rel=1e-9)


async def test_a_moving_window_is_charged_at_most_its_limit_past_what_a_request_holds(
    make_backend: Factory, closing: list[Limiter]
) -> None:
    """A moving window keeps an entry per unit: a debt of 10**8 units once pushed 10**8
    entries one by one in one script (Redis blocked for 40 s; 2**53 never ends). Charged
    its limit, it refuses everything for the period, as the larger debt would."""
    limiter = await limiter_of(
        make_backend, closing,
        Window("1000/hour", strategy="moving", key=keys.GLOBAL, counts="output_tokens"),
        cost={"output_tokens": 10},
    )  # fmt: skip
    decision = await limiter.check("chat")
    assert await decision.settle({"output_tokens": 10**6})
    (check,) = decision.checks
    assert check.cost == 10 + 1000  # what the store holds for it: at most the limit more
    refused = await limiter.check("chat", cost={"output_tokens": 1})
    assert not refused.allowed
    assert refused.states[0].remaining == 0
    assert refused.states[0].retry_after == pytest.approx(3600.0, abs=1.0)
    # Settling down counts from what it holds: back to nothing.
    assert await decision.settle({"output_tokens": 0})
    assert (await limiter.check("chat", cost={"output_tokens": 1000})).allowed


@pytest.mark.parametrize("where", ["memory", "redis", "redis-cluster"])
async def test_a_stream_settling_in_its_finally_settles_when_the_client_disconnects(
    request: pytest.FixtureRequest, closing: list[Limiter], where: str
) -> None:
    """The documented endpoint settles in its stream's `finally`, "also when the client
    goes away". Then Starlette cancels the stream's task group, and anyio cancels every
    await in the `finally`: the settlement was cancelled with it after its first call, so
    on a cluster the fleet-wide slot kept the whole reservation while the decision counted
    it settled. The settlement lands on every slot; the cancellation goes on."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    produced = 0
    streaming = asyncio.Event()

    async def generate(request: Request) -> StreamingResponse:
        grant = request.state.ratelimit

        async def tokens() -> AsyncIterator[bytes]:
            nonlocal produced
            try:
                for _ in range(1000):
                    produced += 1
                    yield b"tok "
                    if produced == 5:
                        streaming.set()
                    await asyncio.sleep(0.005)
            finally:
                await grant.settle({"output_tokens": produced})

        return StreamingResponse(tokens())

    # A per-caller and a fleet-wide limit: two hash slots, two calls, on a cluster.
    rule = Rule("/generate", limits=[
        Window("1000/hour", key=keys.client_ip(), name="caller", counts="output_tokens"),
        Window("1000/hour", key=keys.GLOBAL, name="fleet", counts="output_tokens"),
    ], cost=lambda scope: {"output_tokens": 500})  # fmt: skip
    backend: Backend = MemoryBackend()
    if where == "redis":
        backend = RedisBackend(request.getfixturevalue("redis_url"))
    elif where == "redis-cluster":
        backend = RedisBackend(request.getfixturevalue("redis_cluster_url"), cluster=True)
    limiter = Limiter([rule], backend=backend, metrics=None)
    await limiter.start()
    closing.append(limiter)
    app = Starlette(routes=[Route("/generate", generate, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    exchange = Exchange(app, http_scope("/generate", "POST"))
    task = exchange.start()
    await streaming.wait()
    exchange.disconnect()
    await asyncio.wait_for(task, 5)
    await asyncio.gather(*limiter.engine.holding.background)
    assert exchange.status == 200
    assert 5 <= produced < 1000
    peek = await limiter.peek("generate", "127.0.0.1", cost={"output_tokens": 1})
    assert [s.remaining for s in peek.states] == [1000 - produced] * 2



@pytest.mark.parametrize(
    "limit",
    [
        TokenBucket("1000/hour", key=keys.GLOBAL, name="fleet", counts="output_tokens"),
        Window("1000/hour", key=keys.GLOBAL, name="fleet", counts="output_tokens"),
    ],
    ids=["bucket", "window"],
)
async def test_an_override_of_a_token_limits_rate_still_counts_tokens(
    make_backend: Factory, closing: list[Limiter], limit: Any
) -> None:
    """An operator halves a token limit's rate in a surge. The override rebuilt the
    limit without its `counts`, so it counted requests: 500 tokens an hour became 500
    requests of any size (a request of 400 tokens took 1)."""
    limiter = await limiter_of(make_backend, closing, limit, cost={"output_tokens": 400})
    override = Override("chat", "fleet", rate="500/hour", expires_at=None)
    limiter._apply_overrides(resolve(limiter.engine.rules, [override], time.time()))
    assert (await limiter.check("chat")).allowed
    refused = await limiter.check("chat")
    assert not refused.allowed
    assert refused.states[0].remaining == 100


@pytest.mark.parametrize("rate", ["1000/minute", "1000/day"], ids=["tightened", "loosened"])
async def test_a_settlement_after_an_override_changed_the_period_keeps_the_window_counted(
    make_backend: Factory, closing: list[Limiter], rate: str
) -> None:
    """An operator changes a window's rate while a stream runs. Its settlement gave its
    units back on the window's old period, which read the window the new rule counts
    in as another one: the sliding window's state was rewritten for the old period, and
    every unit the requests since the override took was forgotten (free admissions)."""
    limiter = await limiter_of(
        make_backend, closing,
        Window("1000/hour", strategy="sliding", key=keys.GLOBAL, name="fleet",
               counts="output_tokens"),
        cost={"output_tokens": 100},
    )  # fmt: skip
    streaming = await limiter.check("chat")
    assert streaming.allowed
    override = Override("chat", "fleet", rate=rate, expires_at=None)
    limiter._apply_overrides(resolve(limiter.engine.rules, [override], time.time()))
    assert (await limiter.check("chat", cost={"output_tokens": 900})).allowed
    assert await streaming.settle({"output_tokens": 0})
    peek = await limiter.peek("chat", cost={"output_tokens": 1})
    assert peek.states[0].remaining == 100
