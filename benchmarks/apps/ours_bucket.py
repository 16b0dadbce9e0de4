"""This library with the token bucket only: like for like with the peers.

The peers measured here offer no concurrency limit, so this row isolates
what the `Concurrency` pool of `ours.py` costs on top of the rate limit.
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
    rules=[
        Rule(PATH, limits=[TokenBucket("1000000/second", key=keys.client_ip())]),
        Rule(PROBE, limits=[TokenBucket("1/minute", key=keys.client_ip())]),
    ],
)
