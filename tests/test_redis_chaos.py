"""Chaos: bursts through the middleware while Redis is stopped and continued.

Fifty requests at once on `Concurrency(4, key=GLOBAL)` with a waiting line,
Redis SIGSTOPped for a second in the middle of each burst, three times. Some
decisions, enqueues, waits and releases then time out, are cancelled or run
late: none may answer 500, and once the last response is out every slot and
ticket must be given back within `DRAIN` seconds (the leases' ttl is 30 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
from _servers import RedisServer
from asgi_helpers import http_scope

from ratelimit import BackendError, Concurrency, RateLimitMiddleware, RedisBackend, Rule, keys
from ratelimit._types import Message, Receive, Scope, Send
from ratelimit.backends.base import StoreKey
from ratelimit.policy.rules import FailPolicy

pytestmark = pytest.mark.redis

BURST = 50
ROUNDS = 3
STOPPED = 1.0
#: Seconds after the last response within which every slot and ticket is back.
DRAIN = 2.0
SLOTS = StoreKey("gen", "gpu", "*")


async def work(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.sleep(0.05)  # holds its slot a while: the burst contends
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def call(app: RateLimitMiddleware) -> int:
    """One POST /gen whose client stays connected: its status (0 if none was sent)."""
    status: list[int] = []
    forever = asyncio.Event()
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            await forever.wait()
        sent = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(int(message["status"]))

    await app(http_scope("/gen", "POST"), receive, send)
    return status[0] if status else 0


async def burst(app: RateLimitMiddleware, pid: int) -> list[Any]:
    """BURST requests at once; Redis stopped for STOPPED s shortly after they start."""
    requests = [asyncio.ensure_future(call(app)) for _ in range(BURST)]
    await asyncio.sleep(0.02)
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(STOPPED)
    finally:
        os.kill(pid, signal.SIGCONT)
    return list(await asyncio.gather(*requests, return_exceptions=True))


@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_bursts_while_redis_stops_answer_no_500_and_give_every_slot_back(
    private_redis: RedisServer, fail: FailPolicy
) -> None:
    """Three bursts of 50 with Redis stopped 1 s in each: no 500, and in use and waiting
    drain to 0 within DRAIN seconds of the last response."""
    backend = RedisBackend(private_redis.url, timeout=0.2, breaker_reset=0.25)
    limit = Concurrency(4, key=keys.GLOBAL, name="gpu", queue=8, timeout=0.5)
    rule = Rule("/gen", name="gen", limits=[limit])
    app = RateLimitMiddleware(work, rules=[rule], backend=backend, fail=fail)
    pid = private_redis.pid
    assert pid is not None
    try:
        assert await call(app) == 200  # connected, scripts loaded
        outcomes: list[Any] = []
        for _ in range(ROUNDS):
            outcomes += await burst(app, pid)
        last = time.monotonic()
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert not errors
        assert set(outcomes) <= {200, 429, 503}, sorted(set(outcomes))
        while True:
            try:
                in_use = await backend.in_use(SLOTS)
                waiting = await backend.queue_length(SLOTS)
            except BackendError:  # the breaker may still be open: ask again
                in_use = waiting = -1
            if in_use == 0 and waiting == 0:
                break
            waited = time.monotonic() - last
            assert waited < DRAIN, f"{in_use} in use, {waiting} waiting {waited:.2f}s later"
            await asyncio.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGCONT)
        await app.aclose()
