"""Backend call metrics on a real Redis: latency and errors by operation."""

from __future__ import annotations

import httpx
from _servers import RedisServer
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ratelimit import (
    Concurrency,
    Metrics,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
    keys,
)


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_redis_calls_are_timed_and_failures_counted_by_operation(
    private_redis: RedisServer,
) -> None:
    """Script calls land in ratelimit_backend_seconds{operation}; a dead Redis counts errors."""
    registry = CollectorRegistry()
    backend = RedisBackend(private_redis.url, prefix="metrics-test")
    rules = [
        Rule(
            "/gen",
            limits=[
                TokenBucket("100/second", key=keys.client_ip(), name="rate"),
                Concurrency(4, key=keys.GLOBAL, name="gpu"),
            ],
        )
    ]
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/gen", ok)]),
        rules=rules,
        backend=backend,
        metrics=Metrics(registry),
        fail="open",
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for _ in range(5):
            assert (await c.get("/gen")).status_code == 200
        decide = sample(registry, "ratelimit_backend_seconds_count", operation="decide")
        assert decide == 5
        assert (sample(registry, "ratelimit_backend_seconds_count", operation="release") or 0) >= 1
        assert sample(registry, "ratelimit_backend_errors_total", operation="decide") == 0
        private_redis.stop()
        for _ in range(5):
            assert (await c.get("/gen")).status_code == 200  # fail open, never a 500
    errors = sample(registry, "ratelimit_backend_errors_total", operation="decide")
    assert errors == 5  # refused connections, then the open breaker: one error per decision
    failed_open = sample(
        registry, "ratelimit_decisions_total", rule="gen", limit="", outcome="failed_open"
    )
    assert failed_open == 5
    await app.aclose()
