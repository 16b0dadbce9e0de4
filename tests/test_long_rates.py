"""Rates are bounded to what every store can hold: the longest allowed works on Redis too."""

from __future__ import annotations

import pytest

from ratelimit import ConfigError, Limiter, MemoryBackend, RedisBackend, Rule, TokenBucket, Window
from ratelimit.backends.base import Backend
from ratelimit.policy.limits import Limit


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return MemoryBackend()
    return RedisBackend(request.getfixturevalue("redis_url"))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TokenBucket("10/1000000000 years"), r"^rate: expected a rate over a period of at"),
        (lambda: Window("2/1000000000 years"), r"^rate: expected a rate over a period of at most"),
        (lambda: TokenBucket("1/year", burst=200), r"^burst: expected at most 100 years"),
    ],
)
def test_a_rate_longer_than_a_store_holds_fails_at_construction(build, message) -> None:  # type: ignore[no-untyped-def]
    """Past the store's time range Redis would refuse every decision (fail="open": free)."""
    with pytest.raises(ConfigError, match=message):
        build()


@pytest.mark.parametrize(
    "limit",
    [
        TokenBucket("1/100 years"),
        TokenBucket("1/year", burst=100),
        Window("1/100 years", strategy="fixed"),
        Window("1/100 years", strategy="sliding"),
        Window("1/100 years", strategy="moving"),
    ],
    ids=["bucket", "bucket-burst", "fixed", "sliding", "moving"],
)
async def test_the_longest_allowed_rate_is_enforced_by_every_backend(
    backend: Backend, limit: Limit
) -> None:
    """The store decides (never a backend failure): the quota, then a 429, on fail="closed"."""
    rule = Rule("/long", limits=[limit], fail="closed")
    async with Limiter(rules=[rule], backend=backend) as limiter:
        allowed = 0
        for _ in range(150):
            decision = await limiter.check(rule.name, key="caller")
            if not decision.allowed:
                assert decision.status == 429
                assert decision.reason is None  # refused by the limit, not by fail="closed"
                break
            allowed += 1
        expected = limit.burst if isinstance(limit, TokenBucket) else 1
        assert allowed == expected
        await backend.aclose()
