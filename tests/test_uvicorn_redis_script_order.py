"""Under a real uvicorn, a release is never overtaken by the caller's next decision.

The report: on a fresh Redis, after SCRIPT FLUSH or a restart, a posted release
answered NOSCRIPT was retried in the background and landed after the caller's
next request was decided, so `Concurrency(1)` per caller refused the caller's
own back-to-back requests (3-5 times in 5 restarts under uvicorn). Each test
sends one caller's requests one after another over one keep-alive connection
to tests/apps/redis_per_caller_app.py and asserts every one is admitted.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 10


@pytest.fixture
def client(private_redis: RedisServer) -> Iterator[httpx.Client]:
    """A client of a fresh uvicorn serving the per-caller app on the test's own Redis."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}",
        "RATELIMIT_REDIS_URL": private_redis.url,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "apps.redis_per_caller_app:app", "--port", str(port),
         "--host", "127.0.0.1", "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    http.get("/health")
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, "uvicorn exited"
                    assert time.monotonic() < deadline, "uvicorn did not start"
                    time.sleep(0.05)
            yield http
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def statuses(http: httpx.Client, n: int = REQUESTS, flush: bool = False) -> list[int]:
    """The statuses of `n` sequential POST /gen of caller "alice"."""
    params = {"flush": "1"} if flush else {}
    return [
        http.post("/gen", headers={"x-api-key": "alice"}, params=params).status_code
        for _ in range(n)
    ]


def test_back_to_back_requests_on_a_fresh_redis_are_all_admitted(client: httpx.Client) -> None:
    """A fresh server knows no script: one caller's 10 sequential requests are all admitted."""
    assert statuses(client) == [200] * REQUESTS


def test_back_to_back_requests_with_script_flushes_between_them_are_all_admitted(
    client: httpx.Client, private_redis: RedisServer
) -> None:
    """SCRIPT FLUSH before each request (on a connection kept open, so it comes at once after
    the response): its decide and the previous request's release find no script."""
    got = []
    with redis.Redis(port=private_redis.port) as admin:
        for _ in range(3 * REQUESTS):
            admin.script_flush()
            got += statuses(client, 1)
    assert got == [200] * len(got)


def test_back_to_back_requests_with_script_flushes_while_held_are_all_admitted(
    client: httpx.Client,
) -> None:
    """SCRIPT FLUSH while each request holds its slot: its release finds no script."""
    assert statuses(client, 3 * REQUESTS, flush=True) == [200] * (3 * REQUESTS)


def test_back_to_back_requests_after_redis_restarts_are_all_admitted(
    client: httpx.Client, private_redis: RedisServer
) -> None:
    """Redis restarted on the same port 5 times: after each, 10 sequential requests admitted."""
    for restart in range(5):
        private_redis.restart()
        assert statuses(client) == [200] * REQUESTS, f"after restart {restart + 1}"
