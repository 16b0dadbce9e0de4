"""Rates are bounded to what every store can hold: the longest allowed works on Redis too."""

from __future__ import annotations

import pytest

from ratelimit import ConfigError, MemoryBackend, RedisBackend, TokenBucket, Window
from ratelimit.backends.base import Backend


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
