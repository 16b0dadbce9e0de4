"""What the HTTP app and the GPU worker share: one rule, one Redis, one job.

Both build their `Limiter` from `images_limiter()`: the same `Rule` on the
same Redis, so `Concurrency(8)` is one pool of 8 GPU slots for the whole
fleet, whichever process (an HTTP request or a queued job) takes a slot.

`run_job` stands for the GPU work. It counts the jobs running at once in
Redis (`INCR` on start, `DECR` on end, both atomic): the highest count any
start saw is the most jobs that ever ran together, which the CI test checks.
"""

from __future__ import annotations

import asyncio
import os

import redis.asyncio as redis

from ratelimit import Concurrency, Limiter, RedisBackend, Rule, keys

#: The shared rule: 8 GPU slots fleet-wide, up to 64 waiting up to 30 s.
IMAGES = Rule(
    "/v1/images",
    methods=["POST"],
    name="images",
    limits=[Concurrency(8, key=keys.GLOBAL, queue=64, timeout=30.0, name="gpu")],
)

#: Redis keys of the example's own bookkeeping (not the limiter's).
RUNNING, PEAK, DONE, JOBS = "example:running", "example:peak", "example:done", "example:jobs"

#: Sets PEAK to the running count if higher: one atomic step with the INCR.
_START = """
local n = redis.call('INCR', KEYS[1])
local peak = tonumber(redis.call('GET', KEYS[2]) or '0')
if n > peak then redis.call('SET', KEYS[2], n) end
return n
"""


def redis_url() -> str:
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def images_limiter() -> Limiter:
    """The fleet's limiter: the shared rule on the shared Redis."""
    return Limiter(rules=[IMAGES], backend=RedisBackend(redis_url()))


async def run_job(client: redis.Redis, who: str, seconds: float = 0.05) -> None:
    """One GPU job of `seconds`, counted in Redis while it runs."""
    await client.eval(_START, 2, RUNNING, PEAK)
    try:
        await asyncio.sleep(seconds)
    finally:
        await client.decr(RUNNING)
        await client.hincrby(DONE, who, 1)
