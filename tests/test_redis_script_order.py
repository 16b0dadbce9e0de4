"""A release is never overtaken by a later decision, even when Redis lost its scripts.

On a fresh Redis (first start, restart, failover) or after SCRIPT FLUSH, a posted
release answered NOSCRIPT used to be retried in the background and land after the
caller's next decision, so `Concurrency(1)` per caller refused the caller's own
back-to-back requests. Now every new connection loads the scripts before any
call, and a call answered NOSCRIPT is re-sent in its place in line.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import redis.asyncio
from _servers import RedisServer
from asgi_helpers import eventually, http_scope

from ratelimit import Concurrency, RateLimitMiddleware, RedisBackend, Rule, keys
from ratelimit._types import Message, Receive, Scope, Send

pytestmark = pytest.mark.redis

REQUESTS = 10


def per_caller(backend: RedisBackend, app: Any = None) -> RateLimitMiddleware:
    """One slot per caller (x-api-key); `app` (default: answers 200) behind it."""

    async def hello(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    rule = Rule("/gen", name="gen", limits=[Concurrency(1, key=keys.header("x-api-key"))])
    return RateLimitMiddleware(app or hello, rules=[rule], backend=backend, fail="closed")


async def call(app: RateLimitMiddleware) -> int:
    """One POST /gen of caller "alice" into the ASGI app: its status."""
    scope = http_scope("/gen", "POST", headers=[(b"x-api-key", b"alice")])
    status: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(int(message["status"]))

    await app(scope, receive, send)
    return status[0]


async def test_back_to_back_requests_on_a_fresh_redis_are_all_admitted(
    private_redis: RedisServer,
) -> None:
    """A fresh server knows no script: one caller's 10 sequential requests are all admitted."""
    app = per_caller(RedisBackend(private_redis.url))
    try:
        assert [await call(app) for _ in range(REQUESTS)] == [200] * REQUESTS
    finally:
        await app.aclose()


async def test_back_to_back_requests_across_script_flushes_are_all_admitted(
    private_redis: RedisServer,
) -> None:
    """SCRIPT FLUSH while each request holds its slot: its release, answered NOSCRIPT, still
    runs before the caller's next decision."""
    admin = redis.asyncio.Redis.from_url(private_redis.url)

    async def flushing(scope: Scope, receive: Receive, send: Send) -> None:
        await admin.script_flush()  # the release that follows finds no script
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = per_caller(RedisBackend(private_redis.url), flushing)
    try:
        assert [await call(app) for _ in range(REQUESTS)] == [200] * REQUESTS
    finally:
        await app.aclose()
        await admin.aclose()


def gone(lane: Any) -> bool:
    return lane is None or bool(lane.broken)


async def test_back_to_back_requests_after_a_restart_are_all_admitted(
    private_redis: RedisServer,
) -> None:
    """Redis restarted on the same port (no state, no scripts): the new connection loads the
    scripts first, and the caller's 10 sequential requests are all admitted."""
    backend = RedisBackend(private_redis.url, breaker_reset=0.1)
    app = per_caller(backend)
    try:
        assert await call(app) == 200
        for _ in range(3):
            private_redis.restart()
            lane = backend.guard.transport._lane  # type: ignore[attr-defined]
            await eventually(partial(gone, lane))  # the close is seen at once
            assert [await call(app) for _ in range(REQUESTS)] == [200] * REQUESTS
    finally:
        await app.aclose()


def test_a_resent_call_goes_as_eval_of_its_script_source() -> None:
    """A call re-sent after NOSCRIPT cannot meet NOSCRIPT again: it carries the source."""
    from ratelimit.backends.redis.lane import _as_eval, _script_source
    from ratelimit.backends.redis.resp import pack, pack_script_call
    from ratelimit.backends.redis.scripts import SCRIPTS

    script = SCRIPTS.release
    sources = dict([_script_source(pack("SCRIPT", "LOAD", script.source))])
    call = pack_script_call("EVALSHA", script.sha, ["k1", "k{2}"], ["lease-1", "ch"])
    assert _as_eval(call, sources) == pack_script_call(
        "EVAL", script.source, ["k1", "k{2}"], ["lease-1", "ch"]
    )
    assert _as_eval(call, {}) == call  # an unknown script goes as it was
    assert _as_eval(pack("PING"), sources) == pack("PING")
