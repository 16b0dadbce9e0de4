"""The GPU worker: pulls jobs from a Redis list, each in a slot of the fleet's pool.

    REDIS_URL=redis://127.0.0.1:6379/0 python -m examples.gpu_worker.worker [--tasks 8]

Each of `--tasks` consumers pops a job and runs it inside
`async with limiter.acquire("images")`: it waits in the same line as HTTP
requests (the rule's only limit is global, so no caller key is needed), holds
its slot while the job runs (renewed if it runs long) and gives it back
after, also when the job fails or the worker is stopped. A refusal
(`RateLimited`: the line is full, or the wait would be too long) puts the job
back and waits `retry_after`.
"""

from __future__ import annotations

import argparse
import asyncio

import redis.asyncio as redis

from ratelimit import Limiter, RateLimited

from .shared import JOBS, images_limiter, redis_url, run_job


async def consume(limiter: Limiter, client: redis.Redis) -> None:
    while True:
        job = await client.blpop([JOBS], timeout=1)
        if job is None:
            continue
        try:
            async with limiter.acquire("images"):
                await run_job(client, "worker")
        except RateLimited as refused:
            await client.rpush(JOBS, job[1])
            await asyncio.sleep(refused.retry_after)


async def main(tasks: int) -> None:
    client = redis.Redis.from_url(redis_url())
    async with images_limiter() as limiter:
        await asyncio.gather(*(consume(limiter, client) for _ in range(tasks)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8, help="concurrent consumers")
    asyncio.run(main(parser.parse_args().tasks))
