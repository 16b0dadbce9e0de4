"""This library: a realistic rule on the benchmarked path, memory backend.

A per-IP token bucket with a rate never reached plus a global concurrency
pool far larger than the load generator's connections, so every request is
admitted and the cost measured is the middleware's alone.
"""

from __future__ import annotations

from _common import PATH, PROBE, hello, probe
from starlette.applications import Starlette
from starlette.routing import Route

from ratelimit import Concurrency, MemoryBackend, RateLimitMiddleware, Rule, TokenBucket, keys

app = Starlette(routes=[Route(PATH, hello), Route(PROBE, probe)])
app.add_middleware(
    RateLimitMiddleware,
    backend=MemoryBackend(),
    rules=[
        Rule(
            PATH,
            limits=[
                TokenBucket("1000000/second", key=keys.client_ip()),
                Concurrency(10000, key=keys.GLOBAL),
            ],
        ),
        Rule(PROBE, limits=[TokenBucket("1/minute", key=keys.client_ip())]),
    ],
)
