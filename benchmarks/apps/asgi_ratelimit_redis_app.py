"""asgi-ratelimit on Redis, as its README sets it up: `RedisBackend(StrictRedis(...))`.

Runs in its own venv: this `ratelimit` is asgi-ratelimit's module, not ours.
Its Lua fixed window, one script call per request (plus a `TTL` of its
blocking key). The URL comes from `BENCH_REDIS_URL`; its keys carry no
prefix, so the probe rule gets a zone per server process, which keeps each
fresh server's probe path fresh.
"""

from __future__ import annotations

import os
from typing import Any

from _common import PATH, PROBE, hello, probe
from redis.asyncio import StrictRedis
from starlette.applications import Starlette
from starlette.routing import Route

from ratelimit import RateLimitMiddleware, Rule
from ratelimit.backends.redis import RedisBackend


async def client_ip(scope: dict[str, Any]) -> tuple[str, str]:
    """The caller's identity and group: the socket peer, group "default"."""
    return scope["client"][0], "default"


app = Starlette(routes=[Route(PATH, hello), Route(PROBE, probe)])
app.add_middleware(
    RateLimitMiddleware,
    authenticate=client_ip,
    backend=RedisBackend(StrictRedis.from_url(os.environ["BENCH_REDIS_URL"])),
    config={
        rf"^{PATH}$": [Rule(second=1000000, zone=f"hello{os.getpid()}")],
        rf"^{PROBE}$": [Rule(minute=1, zone=f"probe{os.getpid()}")],
    },
)
