"""A small image-generation API protected by ratelimit, and a client that shows a 429.

`python -m examples.quickstart` starts the app under uvicorn on a free loopback
port (in-memory backend), sends a few requests as one API key and prints each
answer with its rate-limit header fields. `examples.quickstart:app` is the app.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ratelimit import Concurrency, RateLimitMiddleware, Rule, TokenBucket, keys


async def generate(request: Request) -> Response:
    """Pretend to render an image: stream a few progress chunks, then the result."""

    async def chunks() -> object:
        for step in range(3):
            await asyncio.sleep(0.05)
            yield f'{{"progress": {step + 1}/3}}\n'.encode()

    return StreamingResponse(chunks(), media_type="application/x-ndjson")  # type: ignore[arg-type]


async def models(request: Request) -> Response:
    return JSONResponse({"models": ["tiny-diffusion"]})


app = Starlette(
    routes=[
        Route("/v1/images/generations", generate, methods=["POST"]),
        Route("/v1/models", models),
    ]
)
app.add_middleware(
    RateLimitMiddleware,
    rules=[
        Rule(
            "/v1/images/generations",
            methods=["POST"],
            limits=[
                TokenBucket(
                    "5/minute", burst=3, key=keys.header("x-api-key"), name="images-per-key"
                ),
                Concurrency(2, key=keys.GLOBAL, name="gpus"),
            ],
        ),
    ],
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _show(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        print(f"{'#':>2}  {'status':>6}  {'retry-after':>11}  ratelimit")
        for i in range(5):
            r = await client.post("/v1/images/generations", headers={"x-api-key": "demo-key"})
            print(
                f"{i + 1:>2}  {r.status_code:>6}  {r.headers.get('retry-after', '-'):>11}  "
                f"{r.headers.get('ratelimit', '-')}"
            )
        print(f"\npolicy: {r.headers.get('ratelimit-policy')}")
        print(f"body of the last answer: {r.text}")


async def main() -> int:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.01)
    try:
        await _show(port)
    finally:
        server.should_exit = True
        await serving
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
