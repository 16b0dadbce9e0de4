"""RedisBackend on uvloop, the event loop uvicorn picks whenever it is installed."""

from __future__ import annotations

import asyncio

import pytest
from _servers import RedisServer

from ratelimit import RedisBackend
from ratelimit.backends.base import BucketCheck, StoreKey

uvloop = pytest.importorskip("uvloop")


def test_decisions_answer_on_uvloop(redis_server: RedisServer) -> None:
    """Decisions on a uvloop loop get answers (a transport check once stranded them)."""

    async def main() -> list[bool]:
        backend = RedisBackend(redis_server.url, prefix="uvloop-test")
        check = BucketCheck(StoreKey("r", "tb", "c"), 60.0, 2, 1)
        try:
            verdicts = [await asyncio.wait_for(backend.decide([check]), 2.0) for _ in range(3)]
        finally:
            await backend.aclose()
        return [v.admitted for v in verdicts]

    assert uvloop.run(main()) == [True, True, False]
