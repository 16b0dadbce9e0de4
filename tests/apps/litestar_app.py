"""A Litestar app for the real-uvicorn test: four routes under one "3/minute" rule."""

from __future__ import annotations

from litestar import Litestar, get

from ratelimit import Limiter, Rule, Window, keys
from ratelimit.litestar import RateLimitPlugin


@get("/v1/a")
async def route_a() -> str:
    return "a"


@get("/v1/b")
async def route_b() -> str:
    return "b"


@get("/v1/c")
async def route_c() -> str:
    return "c"


@get("/v1/d")
async def route_d() -> str:
    return "d"


@get("/health")
async def health() -> str:
    return "ok"


limiter = Limiter(
    [Rule("/v1/*", name="v1", limits=[Window("3/minute", key=keys.client_ip(), name="all")])]
)
app = Litestar([route_a, route_b, route_c, route_d, health], plugins=[RateLimitPlugin(limiter)])
