"""The HTTP face: `POST /v1/images` runs a GPU job in one of the fleet's 8 slots.

    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.gpu_worker.app:app

The middleware is the ASGI face of the same `Limiter` the worker uses
(`shared.images_limiter`): a request waits in the same line as queued jobs
and is refused with 503 when the line is full or its wait too long.
"""

from __future__ import annotations

import redis.asyncio as redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ratelimit import RateLimitMiddleware

from .shared import images_limiter, redis_url, run_job

limiter = images_limiter()
client = redis.Redis.from_url(redis_url())


async def generate(request: Request) -> JSONResponse:
    await run_job(client, "http")
    return JSONResponse({"done": True})


app = Starlette(routes=[Route("/v1/images", generate, methods=["POST"])])
app.add_middleware(RateLimitMiddleware, limiter=limiter)
