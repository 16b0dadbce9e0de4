"""Releases on Redis are sent, not awaited: a finished request frees its slot at once.

`RedisBackend.post_release` writes release.lua in the current loop turn's batch
and handles the answer as it is read. The engine uses it for every release it
can; these tests pin what that must keep: the slot is freed, in order with
later calls, across script flushes and on a cluster; a failure is counted and
logged; closing the backend first waits for releases already sent; and the
request itself never waits for the round trip.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from _servers import RedisServer
from asgi_helpers import Exchange, eventually, http_scope

from ratelimit import Concurrency, RateLimitMiddleware, RedisBackend, Rule, keys
from ratelimit._errors import BackendError, LeaseError
from ratelimit._types import Receive, Scope, Send
from ratelimit.backends.base import LeaseCheck, StoreKey
from ratelimit.core.engine import Engine

pytestmark = pytest.mark.redis

SLOTS = StoreKey("gen", "gpu", "*")


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    b = RedisBackend(redis_url, prefix="posted")
    try:
        yield b
    finally:
        await b.aclose()


def pool_rule(limit: int = 2) -> Rule:
    return Rule("/gen", name="gen", limits=[Concurrency(limit, key=keys.GLOBAL, name="gpu")])


async def held(backend: RedisBackend) -> int:
    return await backend.in_use(SLOTS)


async def load_release_script(backend: RedisBackend) -> None:
    """Have the server know release.lua (a fresh one answers a first EVALSHA with NOSCRIPT,
    and a posted release then retries in the background, after later calls)."""
    assert await backend.release(LeaseCheck(SLOTS, 1, 1.0, "never-held")) is False


async def until_free(backend: RedisBackend, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while await held(backend) != 0:
        assert time.monotonic() < deadline, "the slot was never released"
        await asyncio.sleep(0.01)


async def test_the_engine_posts_releases_on_redis_and_the_slot_is_free(
    backend: RedisBackend,
) -> None:
    """`release_nowait` sends the release without awaiting it; the next call sees the slot free."""
    await load_release_script(backend)
    engine = Engine([pool_rule()], backend)
    decision = await engine.decide(engine.rules[0], http_scope("/gen"))
    assert decision.allowed
    assert decision.grant is not None
    assert await held(backend) == 1
    assert engine.release_nowait(decision.grant) is True
    assert decision.grant.released
    # Same connection, so in order: the release ran before this count.
    assert await held(backend) == 0
    with pytest.raises(LeaseError):
        await engine.release(decision.grant)


async def test_no_live_connection_or_an_unclosed_breaker_means_the_release_is_awaited(
    redis_url: str,
) -> None:
    """Nothing is posted before a connection exists, nor while the breaker is not closed."""
    backend = RedisBackend(redis_url, prefix="posted")
    lease = LeaseCheck(SLOTS, 2, 10.0, "a")
    try:
        assert backend.post_release(lease) is False  # never connected yet
        assert (await backend.decide([lease])).admitted
        for _ in range(backend.breaker.failures):
            backend.breaker.failure()
        assert backend.breaker.state == "open"
        assert backend.post_release(lease) is False
    finally:
        await backend.aclose()


async def test_a_posted_release_reloads_flushed_scripts(
    backend: RedisBackend, redis_url: str
) -> None:
    """A NOSCRIPT answer to a posted release retries through `release`, which reloads it."""
    lease = LeaseCheck(SLOTS, 2, 10.0, "a")
    assert (await backend.decide([lease])).admitted
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        await admin.script_flush()
    finally:
        await admin.aclose()
    assert backend.post_release(lease) is True
    await until_free(backend)


async def test_closing_the_backend_waits_for_releases_already_posted(redis_url: str) -> None:
    """Releases posted right before `aclose` still reach Redis, the one still waiting to be
    written included (the first goes out at once to an idle server, the second waits)."""
    backend = RedisBackend(redis_url, prefix="posted")
    first, second = LeaseCheck(SLOTS, 2, 10.0, "a"), LeaseCheck(SLOTS, 2, 10.0, "b")
    await load_release_script(backend)
    assert (await backend.decide([first])).admitted
    assert (await backend.decide([second])).admitted
    assert backend.post_release(first) is True
    assert backend.post_release(second) is True
    await backend.aclose()
    other = RedisBackend(redis_url, prefix="posted")
    try:
        assert await held(other) == 0
    finally:
        await other.aclose()


async def test_a_posted_release_that_fails_is_counted_and_retried(
    private_redis: RedisServer,
) -> None:
    """A release whose answer never comes counts against the breaker and is sent again until
    Redis answers: the slot is free soon after Redis runs again, not after its ttl."""
    backend = RedisBackend(private_redis.url, prefix="posted", timeout=0.1)
    lease = LeaseCheck(SLOTS, 2, 10.0, "a")
    assert private_redis.pid is not None
    try:
        assert (await backend.decide([lease])).admitted
        os.kill(private_redis.pid, signal.SIGSTOP)
        try:
            assert backend.post_release(lease) is True
            await eventually(lambda: backend.breaker._failures >= 1)
            assert len(backend.ghosts) == 1
        finally:
            os.kill(private_redis.pid, signal.SIGCONT)
        await until_free(backend)
    finally:
        await backend.aclose()


async def test_a_finished_response_does_not_wait_for_its_slots_release(
    private_redis: RedisServer,
) -> None:
    """The request ends when its body is sent, even while Redis is too stalled to answer the
    release; the slot is freed once Redis runs again."""
    backend = RedisBackend(private_redis.url, prefix="posted", timeout=3.0)
    pid = private_redis.pid
    assert pid is not None

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        os.kill(pid, signal.SIGSTOP)  # Redis stalls after the decision, before the release
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    middleware = RateLimitMiddleware(app, backend=backend, rules=[pool_rule()])
    exchange = Exchange(middleware, http_scope("/gen"))
    try:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(exchange.start(), 2.5)
            elapsed = time.perf_counter() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert exchange.status == 200
        assert exchange.body == b"done"
        assert elapsed < 1.0
        assert len(middleware.engine.holding.held) == 0
        await until_free(backend)
    finally:
        await middleware.aclose()


async def test_a_posted_release_frees_the_slot_on_a_cluster(redis_cluster_url: str) -> None:
    """On Redis Cluster the release is posted to the node of the lease's slot."""
    backend = RedisBackend(redis_cluster_url, prefix="posted", cluster=True)
    engine = Engine([pool_rule(1)], backend)
    try:
        first = await engine.decide(engine.rules[0], http_scope("/gen"))
        assert first.allowed
        assert first.grant is not None
        assert not (await engine.decide(engine.rules[0], http_scope("/gen"))).allowed
        assert engine.release_nowait(first.grant) is True
        await until_free(backend)
        again = await engine.decide(engine.rules[0], http_scope("/gen"))
        assert again.allowed
        assert again.grant is not None
        await engine.release(again.grant)
    finally:
        await engine.aclose()
        await backend.aclose()


async def test_every_slot_is_freed_when_many_requests_end_at_once(backend: RedisBackend) -> None:
    """Fifty concurrent requests through the middleware leave no slot held."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = RateLimitMiddleware(app, backend=backend, rules=[pool_rule(100)])
    exchanges = [Exchange(middleware, http_scope("/gen")) for _ in range(50)]
    await asyncio.gather(*(e.start() for e in exchanges))
    assert [e.status for e in exchanges] == [200] * 50
    await eventually(lambda: len(middleware.engine.holding.held) == 0)
    await until_free(backend)


async def test_a_call_made_while_closing_fails_and_opens_no_connection(redis_url: str) -> None:
    """While `aclose` waits for posted releases, a new call fails at once instead of
    opening a connection that would outlive the backend; after it, calls connect again."""
    backend = RedisBackend(redis_url, prefix="posted")
    lease = LeaseCheck(SLOTS, 2, 10.0, "a")
    await load_release_script(backend)
    assert (await backend.decide([lease])).admitted
    assert backend.post_release(lease) is True
    closing = asyncio.ensure_future(backend.aclose())
    await asyncio.sleep(0)  # aclose is now waiting for the release's answer
    with pytest.raises(BackendError):
        await backend.decide([LeaseCheck(SLOTS, 2, 10.0, "b")])
    await closing
    assert backend.guard.transport._lane is None  # type: ignore[attr-defined]
    try:
        assert await held(backend) == 0  # a later call connects again
    finally:
        await backend.aclose()


async def test_a_cancelled_close_still_closes_the_connection(private_redis: RedisServer) -> None:
    """Cancelling `aclose` while it waits for a stalled Redis leaves no socket open."""
    backend = RedisBackend(private_redis.url, prefix="posted", timeout=5.0)
    lease = LeaseCheck(SLOTS, 2, 10.0, "a")
    assert private_redis.pid is not None
    assert (await backend.decide([lease])).admitted
    lane = backend.guard.transport._lane  # type: ignore[attr-defined]
    os.kill(private_redis.pid, signal.SIGSTOP)
    try:
        assert backend.post_release(lease) is True
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(backend.aclose(), 0.2)
        assert lane.broken
        assert backend.guard.transport._lane is None  # type: ignore[attr-defined]
    finally:
        os.kill(private_redis.pid, signal.SIGCONT)


async def test_a_write_that_raises_fails_the_calls_not_the_request(
    backend: RedisBackend,
) -> None:
    """A connection whose write raises (closed under us, its loss not yet seen) fails the
    calls made on it: a posted release is sent again on a new connection and a decision is a
    BackendError; no exception reaches the code that made the call."""
    lease = LeaseCheck(SLOTS, 2, 10.0, "a")
    assert (await backend.decide([lease])).admitted
    lane = backend.guard.transport._lane  # type: ignore[attr-defined]

    def closed(data: bytes) -> None:
        raise RuntimeError("the handler is closed")

    lane._transport.write = closed
    assert backend.post_release(lease) is True  # no exception into the response
    assert lane.broken
    # The next decision opens a fresh connection; the release is sent again on one.
    assert (await backend.decide([LeaseCheck(SLOTS, 2, 10.0, "b")])).admitted
    await eventually(lambda: len(backend.ghosts) == 0)
    assert await held(backend) == 1  # "b" only
