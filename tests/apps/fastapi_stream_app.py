"""A FastAPI app for a real uvicorn: a route whose own Concurrency limit holds a slot
while it streams, and a state probe."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse

from ratelimit import Concurrency, Limiter
from ratelimit.fastapi import Admission, RateLimit, Refused, refused_handler

limiter = Limiter()
one_stream = RateLimit(limiter, "stream", limits=[Concurrency(1)])
app = FastAPI(exception_handlers={Refused: refused_handler})


@app.get("/stream")
async def stream(admission: Admission = Depends(one_stream)) -> StreamingResponse:  # noqa: B008
    async def body() -> AsyncIterator[bytes]:
        for _ in range(40):  # 2 s
            yield b"chunk\n"
            await asyncio.sleep(0.05)

    return StreamingResponse(body(), headers=admission.headers)


@app.get("/state")
async def state() -> dict[str, int]:
    return {"in_flight": (await limiter.statistics("stream"))[0].in_flight}
