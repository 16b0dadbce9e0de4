"""Fixtures for tests of a `Limiter` on each store: import them by name where used."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from ratelimit import Limiter, MemoryBackend, RedisBackend
from ratelimit.backends.base import Backend

#: Builds a fresh backend of the parametrized kind.
Factory = Callable[[], Backend]


@pytest.fixture(params=["memory", "redis"])
def make_backend(request: pytest.FixtureRequest) -> Factory:
    """A factory of MemoryBackend, or of RedisBackend on the session's (flushed) server."""
    if request.param == "memory":
        return MemoryBackend
    url = request.getfixturevalue("redis_url")
    return lambda: RedisBackend(url)


@pytest.fixture
async def closing() -> AsyncIterator[list[Limiter]]:
    """Limiters the test appends are closed afterwards, with their backends."""
    made: list[Limiter] = []
    yield made
    for limiter in made:
        await limiter.aclose()
        await limiter.backend.aclose()
