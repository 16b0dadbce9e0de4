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


#: Set by POST /line/open: the request holding the line's one slot then finishes.
line_gate = asyncio.Event()


async def line(request: Request) -> Response:
    body = await request.body()
    await line_gate.wait()
    return PlainTextResponse(b"served:" + body)


async def line_open(request: Request) -> Response:
    line_gate.set()
    return PlainTextResponse("open")


async def state(request: Request) -> Response:
    line_key = StoreKey("line", "slot", "*")
    return JSONResponse(
        {
            "stream_in_use": await backend.in_use(StoreKey("stream", "slot", "*")),
            "line_in_use": await backend.in_use(line_key),
            "line_waiting": await backend.queue_length(line_key),
        }
    )


app = Starlette(
    routes=[
        Route("/v1/images/generations", generate, methods=["POST"]),
        Route("/stream", stream),
        Route("/line", line, methods=["POST"]),
        Route("/line/open", line_open, methods=["POST"]),
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
        Rule(
            "/line",
            methods=["POST"],
            limits=[Concurrency(1, key=keys.GLOBAL, queue=4, timeout=30.0, name="slot")],
        ),
    ],
)
