"""An app served under `uvicorn --root-path /api`: one limited route, one unlimited probe."""

from __future__ import annotations

from collections import Counter

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ratelimit import RateLimitMiddleware, Rule, TokenBucket, keys

#: Endpoint runs by name, read through GET /ran.
ran: Counter[str] = Counter()


async def models(request: Request) -> Response:
    ran["models"] += 1
    return PlainTextResponse("models")


async def runs(request: Request) -> Response:
    return JSONResponse({"models": ran["models"], "root_path": request.scope["root_path"]})


app = Starlette(routes=[Route("/v1/models", models), Route("/ran", runs)])
app.add_middleware(
    RateLimitMiddleware,
    rules=[
        Rule(
            "/v1/models",
            methods=["GET"],
            limits=[TokenBucket("3/minute", burst=3, key=keys.client_ip(), name="models")],
        )
    ],
)
