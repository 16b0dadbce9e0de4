"""One slot per caller on the Redis at $RATELIMIT_REDIS_URL, for tests under a real uvicorn.

POST /gen holds the caller's (x-api-key) one `Concurrency` slot while it runs;
with `?flush=1` it runs SCRIPT FLUSH meanwhile, so the release that follows
finds no script on the server. GET /health is not limited (it never touches Redis).
"""

from __future__ import annotations

import os

import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ratelimit import Concurrency, RateLimitMiddleware, RedisBackend, Rule, keys

URL = os.environ["RATELIMIT_REDIS_URL"]
admin = redis.asyncio.Redis.from_url(URL)


async def generate(request: Request) -> Response:
    if request.query_params.get("flush"):
        await admin.script_flush()
    return PlainTextResponse("image")


async def health(request: Request) -> Response:
    return PlainTextResponse("up")


app = Starlette(
    routes=[Route("/gen", generate, methods=["POST"]), Route("/health", health)],
)
app.add_middleware(
    RateLimitMiddleware,
    backend=RedisBackend(URL, breaker_reset=0.2),
    fail="closed",
    rules=[Rule("/gen", limits=[Concurrency(1, key=keys.header("x-api-key"))])],
)
