"""An upload endpoint behind a one-slot waiting line, for the back-pressure test under uvicorn."""

from __future__ import annotations

import asyncio
import hashlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ratelimit import Concurrency, MemoryBackend, RateLimitMiddleware, Rule, keys
from ratelimit.backends.base import StoreKey

backend = MemoryBackend()
SLOT = StoreKey("upload", "slot", "*")
#: Set by POST /open: the request holding the slot (`?hold=1`) then finishes.
gate = asyncio.Event()


async def upload(request: Request) -> Response:
    """Digest the body as it streams in; `?hold=1` holds the slot until /open."""
    if request.query_params.get("hold"):
        await gate.wait()
        return PlainTextResponse("held")
    digest, size = hashlib.sha256(), 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return JSONResponse({"bytes": size, "sha256": digest.hexdigest()})


async def open_gate(request: Request) -> Response:
    gate.set()
    return PlainTextResponse("open")


async def state(request: Request) -> Response:
    return JSONResponse(
        {"in_use": await backend.in_use(SLOT), "waiting": await backend.queue_length(SLOT)}
    )


app = Starlette(
    routes=[
        Route("/upload", upload, methods=["POST"]),
        Route("/open", open_gate, methods=["POST"]),
        Route("/state", state),
    ]
)
app.add_middleware(
    RateLimitMiddleware,
    backend=backend,
    rules=[
        Rule(
            "/upload",
            limits=[Concurrency(1, key=keys.GLOBAL, queue=4, timeout=60.0, name="slot")],
        )
    ],
)
