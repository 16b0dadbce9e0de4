"""This library on Redis with the token bucket only: like for like with the peers.

One decide script call per request and nothing to release. See
`ours_redis.py` for the URL, the key prefix and why the rules fail closed.
"""

from __future__ import annotations

import os

from _common import PATH, PROBE, hello, probe
from starlette.applications import Starlette
from starlette.routing import Route

from ratelimit import RateLimitMiddleware, RedisBackend, Rule, TokenBucket, keys

app = Starlette(routes=[Route(PATH, hello), Route(PROBE, probe)])
app.add_middleware(
    RateLimitMiddleware,
    backend=RedisBackend(os.environ["BENCH_REDIS_URL"], prefix=f"bench{os.getpid()}"),
    fail="closed",
    rules=[
        Rule(PATH, limits=[TokenBucket("1000000/second", key=keys.client_ip())]),
        Rule(PROBE, limits=[TokenBucket("1/minute", key=keys.client_ip())]),
    ],
)
