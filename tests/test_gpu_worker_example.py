"""examples/gpu_worker: an HTTP app (uvicorn) and GPU worker processes share one pool.

A real redis-server, the app under uvicorn and two worker processes of 8
consumers each: HTTP requests and queued jobs take slots of one fleet-wide
`Concurrency(8)`, and never more than 8 jobs run at once between them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from _servers import RedisServer, free_port

from examples.gpu_worker.shared import DONE, JOBS, PEAK, RUNNING

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def fleet(private_redis: RedisServer) -> Iterator[str]:
    """The app under uvicorn and two workers on `private_redis`; yields the app's URL."""
    env = {**os.environ, "REDIS_URL": private_redis.url, "PYTHONPATH": str(ROOT)}
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "examples.gpu_worker.app:app",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
        ),
        *(
            subprocess.Popen(
                [sys.executable, "-m", "examples.gpu_worker.worker", "--tasks", "8"],
                env=env,
                cwd=ROOT,
            )
            for _ in range(2)
        ),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise RuntimeError("uvicorn did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


async def test_http_and_workers_never_run_more_than_8_jobs_at_once(
    fleet: str, private_redis: RedisServer
) -> None:
    """80 queued jobs and 60 requests at once: all done, at most 8 running at any time."""
    store = redis.Redis.from_url(private_redis.url)
    store.rpush(JOBS, *(f"job-{i}" for i in range(80)))
    gate = asyncio.Semaphore(24)

    async with httpx.AsyncClient(base_url=fleet, timeout=60) as client:

        async def post() -> int:
            async with gate:
                return (await client.post("/v1/images")).status_code

        statuses = await asyncio.gather(*(post() for _ in range(60)))
    assert set(statuses) <= {200, 503}
    served = statuses.count(200)
    deadline = time.monotonic() + 60
    while int(store.hget(DONE, "worker") or 0) < 80:
        assert time.monotonic() < deadline, "the workers did not finish the queued jobs"
        await asyncio.sleep(0.05)
    assert int(store.hget(DONE, "http") or 0) == served > 0
    assert int(store.get(RUNNING) or 0) == 0
    peak = int(store.get(PEAK) or 0)
    assert 4 <= peak <= 8, f"{peak} jobs ran at once"
