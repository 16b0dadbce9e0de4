"""An app for end-to-end tests under a real uvicorn: limits, a long stream, and a state probe."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ratelimit import Concurrency, MemoryBackend, RateLimitMiddleware, Rule, TokenBucket, keys
from ratelimit.backends.base import StoreKey

backend = MemoryBackend()


async def generate(request: Request) -> Response:
    return PlainTextResponse("image")


async def stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(600):
            yield b"chunk\n"
            await asyncio.sleep(0.05)

    return StreamingResponse(body())


async def state(request: Request) -> Response:
    return JSONResponse({"stream_in_use": await backend.in_use(StoreKey("stream", "slot", "*"))})


app = Starlette(
    routes=[
        Route("/v1/images/generations", generate, methods=["POST"]),
        Route("/stream", stream),
        Route("/state", state),
    ]
)
app.add_middleware(
    RateLimitMiddleware,
    backend=backend,
    rules=[
        Rule(
            "/v1/images/generations",
            methods=["POST"],
            limits=[TokenBucket("3/minute", key=keys.header("x-api-key"), name="per-key")],
        ),
        Rule("/stream", limits=[Concurrency(1, key=keys.GLOBAL, name="slot")]),
    ],
)
