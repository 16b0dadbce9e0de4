"""Caller text is not kept in bulk: huge keys (1 MB header values) leave memory bounded."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest
from asgi_helpers import http_scope

from ratelimit import (
    Concurrency,
    MemoryBackend,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    TopCallers,
    keys,
)
from ratelimit.core.engine import Engine

MiB = 1024 * 1024


def _huge(i: int) -> bytes:
    """A distinct 1 MB header value (servers such as uvicorn with httptools accept them)."""
    return b"%08d" % i + b"x" * MiB


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    return None


def _traced_growth(before: int) -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before


@pytest.mark.parametrize(
    "limits",
    [
        [TokenBucket("5/minute", key=keys.header("x-k"))],
        [TokenBucket("5/minute", key=keys.header("x-k")), Concurrency(2, key=keys.header("x-k"))],
    ],
    ids=["one-bucket", "bucket-and-slot"],
)
async def test_400_distinct_1mb_keys_keep_memory_growth_under_10_mib(limits: list[Any]) -> None:
    """Through the middleware on memory, 400 callers with 1 MB keys add < 10 MiB of memory."""
    app = RateLimitMiddleware(_ok, rules=[Rule("/x", limits=limits)], backend=MemoryBackend())
    await app(http_scope("/x", headers=[(b"x-k", b"warm")]), _receive, _send)
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(400):
            await app(http_scope("/x", headers=[(b"x-k", _huge(i))]), _receive, _send)
        growth = _traced_growth(before)
    finally:
        tracemalloc.stop()
        await app.aclose()
    assert growth < 10 * MiB, f"{growth / MiB:.1f} MiB"


async def test_a_short_key_is_cached_and_a_huge_one_is_not() -> None:
    """The hot path is unchanged for ordinary keys: their entry is cached and reused."""
    rule = Rule("/x", limits=[TokenBucket("5/minute", key=keys.header("x-k"))])
    engine = Engine([rule], MemoryBackend())
    cache = engine.plan(rule).caches[0]
    await engine.decide(rule, http_scope("/x", headers=[(b"x-k", b"alice")]))
    assert list(cache) == ["alice"]
    entry = cache["alice"]
    await engine.decide(rule, http_scope("/x", headers=[(b"x-k", b"alice")]))
    assert cache["alice"] is entry
    first = await engine.decide(rule, http_scope("/x", headers=[(b"x-k", _huge(1))]))
    assert list(cache) == ["alice"]
    # Not cached, still counted against its own state: the same caller's second request.
    second = await engine.decide(rule, http_scope("/x", headers=[(b"x-k", _huge(1))]))
    assert first.results[0].remaining == second.results[0].remaining + 1


async def test_top_callers_showing_keys_keep_huge_keys_short() -> None:
    """With show_keys, a 1 MB caller key is kept as a prefix and a digest: bounded and distinct."""
    top = TopCallers(capacity=64, show_keys=True)
    key = top.track(keys.header("x-k"), "k")
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(400):
            key(http_scope("/x", headers=[(b"x-k", _huge(i))]))
        growth = _traced_growth(before)
    finally:
        tracemalloc.stop()
    assert growth < 10 * MiB, f"{growth / MiB:.1f} MiB"
    _, counted = top.top(5)["k"]
    assert len({c.item for c in counted}) == 5
    assert all(c.item.startswith("00000") and len(c.item) < 200 for c in counted)
