"""An app for fault tests under a real uvicorn: one rule on the Redis at $RATELIMIT_REDIS_URL."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ratelimit import RateLimitMiddleware, RedisBackend, Rule, TokenBucket, keys


async def generate(request: Request) -> Response:
    return PlainTextResponse("image")


app = Starlette(routes=[Route("/gen", generate, methods=["POST"])])
app.add_middleware(
    RateLimitMiddleware,
    backend=RedisBackend(os.environ["RATELIMIT_REDIS_URL"], breaker_reset=0.2),
    fail="closed",
    rules=[Rule("/gen", limits=[TokenBucket("1/hour", burst=3, key=keys.header("x-api-key"))])],
)
