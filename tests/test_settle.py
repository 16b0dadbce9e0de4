"""Reserve, then settle: an admitted request's actual cost replaces its estimate.

On memory and a real Redis: refunds give back exactly the excess reserved
(to the window it was taken in), debts charge past the limit and later
requests wait them out, dimensions left out keep their reservation, a second
settle sets the total again, a reservation never settled expires like any
other. Rules with several dimensions decide each limit on its own units in
one script call per hash slot, and settle in one more.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from _limiters import Factory
from _servers import RedisClusterServers, command

from ratelimit import (
    ConfigError,
    Limiter,
    MemoryBackend,
    Quota,
    RateLimited,
    RedisBackend,
    Rule,
    TokenBucket,
    Window,
    keys,
)
from ratelimit.backends.base import StoreKey

#: Output tokens per day: one unit back every 86.4 s, so a test sees no refill.
DAILY = "1000/day"
INTERVAL = 86.4



def chat_rule(*limits: Any, cost: Any = None) -> Rule:
    return Rule(
        name="chat",
        limits=list(limits),
        cost=cost or {"input_tokens": 1, "output_tokens": 1},
    )


async def limiter_of(make_backend: Factory, *limits: Any, cost: Any = None) -> Limiter:
    limiter = Limiter([chat_rule(*limits, cost=cost)], backend=make_backend(), metrics=None)
    await limiter.start()
    return limiter




async def remaining(limiter: Limiter, key: str = "k") -> int:
    """The chat rule's first limit's available quota for `key`, consuming nothing."""
    decision = await limiter.peek("chat", key, cost={"output_tokens": 1})
    return decision.states[0].remaining


@pytest.mark.parametrize(
    "limit",
    [
        TokenBucket(DAILY, key=keys.GLOBAL, counts="output_tokens"),
        Window("1000/hour", key=keys.GLOBAL, counts="output_tokens"),
        Window("1000/hour", strategy="sliding", key=keys.GLOBAL, counts="output_tokens"),
        Window("1000/hour", strategy="moving", key=keys.GLOBAL, counts="output_tokens"),
        Quota(1000, per="day", key=keys.GLOBAL, counts="output_tokens"),
    ],
    ids=["bucket", "fixed", "sliding", "moving", "quota"],
)
async def test_a_settle_gives_back_exactly_what_was_reserved_beyond_the_actual_cost(
    make_backend: Factory, closing: list[Limiter], limit: Any
) -> None:
    limiter = await limiter_of(make_backend, limit)
    closing.append(limiter)
    async with limiter.acquire("chat", cost={"output_tokens": 300}) as decision:
        assert await remaining(limiter) == 700
        assert await decision.settle({"output_tokens": 120})
        assert await remaining(limiter) == 880
    # Settling again sets the total again: up, then down to nothing.
    assert await decision.settle({"output_tokens": 200})
    assert await remaining(limiter) == 800
    assert await decision.settle({"output_tokens": 0})
    assert await remaining(limiter) == 1000


@pytest.mark.parametrize(
    "limit",
    [
        Window("1000/hour", key=keys.GLOBAL, counts="output_tokens"),
        Window("1000/hour", strategy="sliding", key=keys.GLOBAL, counts="output_tokens"),
        Window("1000/hour", strategy="moving", key=keys.GLOBAL, counts="output_tokens"),
        Quota(1000, per="day", key=keys.GLOBAL, counts="output_tokens"),
    ],
    ids=["fixed", "sliding", "moving", "quota"],
)
async def test_a_window_in_debt_refuses_until_its_count_is_back_under_the_limit(
    make_backend: Factory, closing: list[Limiter], limit: Any
) -> None:
    limiter = await limiter_of(make_backend, limit)
    closing.append(limiter)
    async with limiter.acquire("chat", cost={"output_tokens": 600}) as big:
        pass
    async with limiter.acquire("chat", cost={"output_tokens": 400}) as small:
        pass
    assert await big.settle({"output_tokens": 900})  # 300 over the estimate: 1300 counted
    assert await remaining(limiter) == 0
    with pytest.raises(RateLimited):
        async with limiter.acquire("chat", cost={"output_tokens": 1}):
            pass
    # The debt is counted exactly: 300 given back leave nothing free, 301 one unit.
    assert await small.settle({"output_tokens": 100})
    assert await remaining(limiter) == 0
    assert await big.settle({"output_tokens": 899})
    assert await remaining(limiter) == 1


async def test_a_bucket_in_debt_makes_later_requests_wait_it_out(
    make_backend: Factory, closing: list[Limiter]
) -> None:
    limiter = await limiter_of(
        make_backend, TokenBucket(DAILY, key=keys.GLOBAL, counts="output_tokens")
    )
    closing.append(limiter)
    async with limiter.acquire("chat", cost={"output_tokens": 1000}) as decision:
        pass
    assert await decision.settle({"output_tokens": 1250})  # 250 units of debt
    with pytest.raises(RateLimited) as refused:
        async with limiter.acquire("chat", cost={"output_tokens": 10}):
            pass
    # Room for 10 units comes back once the debt and the 10 have refilled.
    assert refused.value.decision.states[0].retry_after == pytest.approx(
        (250 + 10) * INTERVAL, abs=1.0
    )


async def test_dimensions_left_out_of_the_actual_cost_keep_their_reservation(
    make_backend: Factory, closing: list[Limiter]
) -> None:
    limiter = await limiter_of(
        make_backend,
        Window("1000/hour", key=keys.GLOBAL, name="in", counts="input_tokens"),
        Window("1000/hour", key=keys.GLOBAL, name="out", counts="output_tokens"),
        Window("5000/hour", key=keys.GLOBAL, name="both", counts={"input_tokens": 1,
                                                                 "output_tokens": 4}),
        Window("10/hour", key=keys.GLOBAL, name="rpm"),
        cost={"input_tokens": 1, "output_tokens": 1},
    )  # fmt: skip
    closing.append(limiter)
    cost = {"input_tokens": 100, "output_tokens": 500}
    async with limiter.acquire("chat", cost=cost) as decision:
        assert await decision.settle({"output_tokens": 50})
    states = (await limiter.peek("chat", cost={"input_tokens": 0, "output_tokens": 0})).states
    assert [s.remaining for s in states] == [900, 950, 5000 - 100 - 4 * 50, 9]
    # Requests are a dimension like any other: the request counted twice now.
    assert await decision.settle({"requests": 2})
    states = (await limiter.peek("chat", cost={"input_tokens": 0, "output_tokens": 0})).states
    assert [s.remaining for s in states] == [900, 950, 4700, 8]
    # A bare int for a cost per dimension is refused (812 tokens would settle requests).
    with pytest.raises(ConfigError, match="per dimension"):
        await decision.settle(812)
    states = (await limiter.peek("chat", cost={"input_tokens": 0, "output_tokens": 0})).states
    assert [s.remaining for s in states] == [900, 950, 4700, 8]


async def test_an_unsettled_reservation_expires_with_its_window(
    make_backend: Factory, closing: list[Limiter]
) -> None:
    limiter = await limiter_of(
        make_backend, Window("100/second", key=keys.GLOBAL, counts="output_tokens")
    )
    closing.append(limiter)
    async with limiter.acquire("chat", cost={"output_tokens": 100}):
        pass  # never settled
    assert await remaining(limiter) == 0
    await asyncio.sleep(1.1)
    assert await remaining(limiter) == 100


async def test_each_limit_takes_the_units_of_the_dimensions_it_counts(
    make_backend: Factory, closing: list[Limiter]
) -> None:
    """Requests, input and output tokens per key and tokens fleet-wide, decided together:
    the limit that runs out refuses, naming itself, and nothing is taken."""
    limiter = await limiter_of(
        make_backend,
        TokenBucket("60/minute", name="rpm"),
        TokenBucket("4000/minute", name="itpm", counts="input_tokens"),
        TokenBucket("800/minute", name="otpm", counts="output_tokens"),
        Window("100000/hour", key=keys.GLOBAL, name="fleet",
               counts={"input_tokens": 1, "output_tokens": 1}),
    )  # fmt: skip
    closing.append(limiter)
    cost = {"input_tokens": 1500, "output_tokens": 300}
    for _ in range(2):
        async with limiter.acquire("chat", "alice", cost=cost):
            pass
    zero = {"input_tokens": 0, "output_tokens": 0}
    states = (await limiter.peek("chat", "alice", cost=zero)).states
    assert [s.remaining for s in states] == [58, 1000, 200, 100000 - 3600]
    with pytest.raises(RateLimited) as refused:
        async with limiter.acquire("chat", "alice", cost=cost):
            pass
    assert refused.value.decision.violated == ["itpm", "otpm"]
    assert refused.value.decision.status == 429
    states = (await limiter.peek("chat", "alice", cost=zero)).states
    assert [s.remaining for s in states] == [58, 1000, 200, 100000 - 3600]
    # Another key has its own buckets; the fleet's window is shared.
    async with limiter.acquire("chat", "bob", cost=cost):
        pass
    states = (await limiter.peek("chat", "bob", cost=zero)).states
    assert [s.remaining for s in states] == [59, 2500, 500, 100000 - 5400]


async def test_a_cost_missing_a_counted_dimension_is_an_error_never_free(
    make_backend: Factory, closing: list[Limiter]
) -> None:
    limiter = await limiter_of(
        make_backend, TokenBucket("100/minute", key=keys.GLOBAL, counts="output_tokens")
    )
    closing.append(limiter)
    with pytest.raises(ConfigError, match="output_tokens"):
        async with limiter.acquire("chat", cost={"input_tokens": 5}):
            pass
    with pytest.raises(ConfigError, match="requests"):
        async with limiter.acquire("chat", cost={"requests": 0, "output_tokens": 5}):
            pass
    async with limiter.acquire("chat", cost={"output_tokens": 5}) as decision:
        for bad in (-1, {"output_tokens": -3}, {"output_tokens": 1.5}, "5", True):
            with pytest.raises(ConfigError, match="actual"):
                await decision.settle(bad)  # type: ignore[arg-type]
    assert await remaining(limiter) == 95  # the bad settles changed nothing


def test_a_rule_whose_constant_cost_lacks_a_counted_dimension_says_how_to_fix_it() -> None:
    """The default cost (1 request) prices no token: refused at start-up, naming the limit's
    field and the cost to give."""
    with pytest.raises(ConfigError) as refused:
        Rule(name="chat", limits=[TokenBucket("100/minute", counts="output_tokens")])
    assert refused.value.field == "limits[0].counts"
    assert 'cost={"output_tokens": 1}' in str(refused.value)


class FailingRefunds(MemoryBackend):
    """A store that decides but cannot take a settlement (its connection just died)."""

    async def refund(self, checks: Any) -> None:
        raise ConnectionError("gone")


async def test_a_settle_the_store_cannot_take_leaves_the_reservation_and_says_so(
    closing: list[Limiter], caplog: pytest.LogCaptureFixture
) -> None:
    limiter = await limiter_of(
        FailingRefunds, Window("1000/hour", key=keys.GLOBAL, counts="output_tokens")
    )
    closing.append(limiter)
    async with limiter.acquire("chat", cost={"output_tokens": 300}) as decision:
        assert not await decision.settle({"output_tokens": 100})
    assert "settling rule 'chat' failed" in caplog.text
    assert await remaining(limiter) == 700
    # The decision holds what the store holds: settling again sends the whole change.
    assert [c.cost for c in decision.checks] == [300]  # type: ignore[union-attr]


async def test_a_refused_decision_has_nothing_to_settle(
    make_backend: Factory, closing: list[Limiter]
) -> None:
    limiter = await limiter_of(
        make_backend, Window("10/hour", key=keys.GLOBAL, counts="output_tokens")
    )
    closing.append(limiter)
    assert (await limiter.check("chat", cost={"output_tokens": 8})).allowed
    refused = await limiter.check("chat", cost={"output_tokens": 3})
    assert not refused.allowed
    # Settled, it would give back its 3 (or charge 5 more): the window keeps the 8.
    assert await refused.settle({"output_tokens": 0})
    assert await refused.settle({"output_tokens": 8})
    assert await remaining(limiter) == 2


# -- one script call per hash slot ------------------------------------------------------


def evalsha_calls(ports: list[int]) -> int:
    total = 0
    for port in ports:
        for line in command(port, "INFO", "commandstats").decode().splitlines():
            if line.startswith("cmdstat_evalsha:"):
                total += int(line.split("calls=")[1].split(",")[0])
    return total


def dimensional_rule() -> Rule:
    return chat_rule(
        TokenBucket("60/minute", name="rpm"),
        TokenBucket("40000/minute", name="itpm", counts="input_tokens"),
        TokenBucket("8000/minute", name="otpm", counts="output_tokens"),
        Window("1000000/hour", name="tpd", counts={"input_tokens": 1, "output_tokens": 1}),
        Window("1000000/hour", key=keys.GLOBAL, name="fleet",
               counts={"input_tokens": 1, "output_tokens": 1}),
    )  # fmt: skip


@pytest.mark.redis
@pytest.mark.parametrize("where", ["redis", "redis-cluster"])
async def test_a_rule_of_several_dimensions_is_one_script_call_per_hash_slot(
    where: str, request: pytest.FixtureRequest
) -> None:
    """Per-key limits share a slot, the fleet-wide one has its own: one call on a single
    server for the decision and one for the settlement; two of each on a cluster."""
    if where == "redis":
        url = request.getfixturevalue("redis_url")
        ports = [int(url.rsplit(":", 1)[1].split("/")[0])]
        backend = RedisBackend(url)
        slots = 1
    else:
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        url = request.getfixturevalue("redis_cluster_url")
        ports = [node.port for node in cluster.nodes]
        backend = RedisBackend(url, cluster=True)
        slots = 2
    limiter = Limiter([dimensional_rule()], backend=backend, metrics=None)
    cost = {"input_tokens": 900, "output_tokens": 700}
    try:
        async with limiter.acquire("chat", "warm", cost=cost) as warm:  # load the scripts
            await warm.settle({"output_tokens": 10})
        before = evalsha_calls(ports)
        async with limiter.acquire("chat", "alice", cost=cost) as decision:
            decided = evalsha_calls(ports)
            assert await decision.settle({"output_tokens": 100})
        settled = evalsha_calls(ports)
        assert (decided - before, settled - decided) == (slots, slots)
        zero = {"input_tokens": 0, "output_tokens": 0}
        states = (await limiter.peek("chat", "alice", cost=zero)).states
        left = [s.remaining for s in states[1:]]
        # The buckets refill (666 and 133 units a second): a few units at most meanwhile.
        assert 40000 - 900 <= left[0] <= 40000 - 900 + 50
        assert 8000 - 100 <= left[1] <= 8000 - 100 + 10
        assert left[2:] == [1000000 - 1000, 1000000 - 1000 - 910]
    finally:
        await limiter.aclose()
        await backend.aclose()


def test_redis_commandstats_parse_sees_the_calls(redis_url: str) -> None:
    """The counter above reads what Redis counts (else the test could not fail)."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    before = evalsha_calls([port])
    with redis.Redis.from_url(redis_url) as client:
        sha = client.script_load("return 1")
        client.evalsha(sha, 0)
    assert evalsha_calls([port]) == before + 1


# -- the faces ----------------------------------------------------------------------------


def test_an_endpoint_settles_through_request_state_at_the_end_of_its_stream() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from ratelimit import RateLimitMiddleware

    async def generate(request: Request) -> StreamingResponse:
        grant = request.state.ratelimit

        async def tokens() -> AsyncIterator[bytes]:
            produced = 0
            try:
                for _ in range(7):
                    produced += 1
                    yield b"tok "
            finally:
                await grant.settle({"output_tokens": produced})

        return StreamingResponse(tokens())

    rule = Rule(
        "/generate",
        limits=[Window("100/hour", key=keys.GLOBAL, counts="output_tokens")],
        cost=lambda scope: {"output_tokens": 50},
    )
    limiter = Limiter([rule], backend=MemoryBackend(), metrics=None)
    app = Starlette(routes=[Route("/generate", generate, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    with TestClient(app) as client:
        answers = [client.post("/generate") for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4  # 2 fit unsettled; 14 settled
        assert answers[0].text == "tok " * 7
        assert answers[0].headers["ratelimit"] == '"window";r=50;t=3600'
        # Sent before the stream, so before its settlement: 100 - 4 * 7 - 50 = 22 left.
        last = client.post("/generate")
        assert last.headers["ratelimit"].startswith('"window";r=22;')


def test_a_fastapi_route_settles_through_its_admission() -> None:
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from ratelimit.fastapi import Admission, RateLimit

    limiter = Limiter(
        [Rule(name="images", limits=[Window("10/hour", key=keys.GLOBAL, counts="images")],
              cost={"images": 4})],
        backend=MemoryBackend(),
        metrics=None,
    )  # fmt: skip
    app = FastAPI()
    limited = Depends(RateLimit(limiter, "images"))

    @app.post("/images")
    async def images(admission: Admission = limited) -> dict[str, int]:
        assert admission.decision is not None
        await admission.decision.settle({"images": 1})  # only one could be made
        return {"made": 1}

    with TestClient(app) as client:
        # Each reserves 4 and keeps 1: seven fit (the seventh from 6 to 10); unsettled, two.
        assert [client.post("/images").status_code for _ in range(7)] == [200] * 7
        assert client.post("/images").status_code == 503  # a fleet-wide (shared) limit



async def test_metrics_count_the_units_settlements_gave_back_and_charged() -> None:
    from prometheus_client import CollectorRegistry

    from ratelimit import Metrics

    registry = CollectorRegistry()
    limiter = Limiter(
        [chat_rule(Window("1000/hour", key=keys.GLOBAL, name="out", counts="output_tokens"))],
        backend=MemoryBackend(),
        metrics=Metrics(registry),
    )
    async with limiter.acquire("chat", cost={"output_tokens": 300}) as first:
        await first.settle({"output_tokens": 120})
    async with limiter.acquire("chat", cost={"output_tokens": 100}) as second:
        await second.settle({"output_tokens": 150})
    await second.settle({"output_tokens": 140})

    def settled(change: str) -> float | None:
        labels = {"rule": "chat", "limit": "out", "change": change}
        return registry.get_sample_value("ratelimit_settled_units_total", labels)

    assert (settled("refunded"), settled("charged")) == (180 + 10, 50)
    await limiter.aclose()


@pytest.mark.redis
async def test_a_settle_that_lands_in_one_hash_slot_but_not_another_is_not_sent_twice(
    redis_url: str,
) -> None:
    """Per-key and fleet-wide limits live in two hash slots (two calls): when the fleet's
    call fails, the per-key change has landed, and settling again sends only the rest."""
    backend = RedisBackend(redis_url, split_by_slot=True)
    limiter = Limiter(
        [chat_rule(Window("1000/hour", name="key", counts="output_tokens"),
                   Window("1000/hour", key=keys.GLOBAL, name="fleet", counts="output_tokens"))],
        backend=backend,
        metrics=None,
    )  # fmt: skip
    fleet = backend.keys.window(StoreKey("chat", "fleet", "*"))
    try:
        async with limiter.acquire("chat", "alice", cost={"output_tokens": 300}) as decision:
            pass
        await backend.client.delete(fleet)
        await backend.client.hset(fleet, "x", "1")  # the fleet's script call now fails
        assert not await decision.settle({"output_tokens": 100})
        await backend.client.delete(fleet)
        assert await decision.settle({"output_tokens": 100})
        zero = {"input_tokens": 0, "output_tokens": 0}
        states = (await limiter.peek("chat", "alice", cost=zero)).states
        assert [s.remaining for s in states] == [900, 1000]
    finally:
        await limiter.aclose()
        await backend.aclose()
