"""This library on Redis: the `ours.py` rule with a `RedisBackend`.

A per-IP token bucket with a rate never reached plus a global concurrency
pool far larger than the load generator's connections: every request costs
one decide script call and, when its body is sent, one release call.
The Redis URL comes from `BENCH_REDIS_URL` (set by benchmarks/redis_decisions.py);
each server process gets its own key prefix, so a fresh server starts from
fresh state (the 1/minute probe path must admit once, then refuse). The
rules fail closed: a Redis failure answers 503, which the harness counts as
an error, so a failing backend can never pass for a fast one.
"""

from __future__ import annotations

import os

from _common import PATH, PROBE, hello, probe
from starlette.applications import Starlette
from starlette.routing import Route

from ratelimit import Concurrency, RateLimitMiddleware, RedisBackend, Rule, TokenBucket, keys

app = Starlette(routes=[Route(PATH, hello), Route(PROBE, probe)])
app.add_middleware(
    RateLimitMiddleware,
    backend=RedisBackend(os.environ["BENCH_REDIS_URL"], prefix=f"bench{os.getpid()}"),
    fail="closed",
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
