"""An image endpoint whose cost is the body's `n`, for the chunked-upload tests under uvicorn."""

from __future__ import annotations

import hashlib
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ratelimit import Limiter, RateLimitMiddleware, Rule, TokenBucket, keys
from ratelimit._types import Scope

#: Requests the endpoint ran.
served = 0


def images(scope: Scope, body: dict[str, Any]) -> Any:
    return body.get("n", 1)


async def generate(request: Request) -> Response:
    """Digest the body the app received."""
    global served
    served += 1
    data = await request.body()
    return JSONResponse({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})


async def state(request: Request) -> Response:
    """Requests served, and the units left in alice's bucket."""
    peek = await limiter.peek("images", key="alice", cost=1)
    return JSONResponse({"served": served, "remaining": peek.states[0].remaining})


app = Starlette(routes=[Route("/v1/images", generate, methods=["POST"]), Route("/state", state)])
limiter = Limiter(
    rules=[
        Rule(
            "/v1/images",
            methods=["POST"],
            limits=[TokenBucket("1/hour", burst=64, key=keys.header("x-api-key"))],
            cost=images,
            name="images",
        )
    ],
)
app.add_middleware(RateLimitMiddleware, limiter=limiter)
