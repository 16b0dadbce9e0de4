"""This library with the token bucket only and `headers=False`: the peers' own terms.

Neither peer sends `RateLimit` header fields; this row is `ours_bucket.py`
without them, so the three limiters do the same work per request.
"""

from __future__ import annotations

from _common import PATH, PROBE, hello, probe
from starlette.applications import Starlette
from starlette.routing import Route

from ratelimit import MemoryBackend, RateLimitMiddleware, Rule, TokenBucket, keys

app = Starlette(routes=[Route(PATH, hello), Route(PROBE, probe)])
app.add_middleware(
    RateLimitMiddleware,
    backend=MemoryBackend(),
    headers=False,
    rules=[
        Rule(PATH, limits=[TokenBucket("1000000/second", key=keys.client_ip())]),
        Rule(PROBE, limits=[TokenBucket("1/minute", key=keys.client_ip())]),
    ],
)
