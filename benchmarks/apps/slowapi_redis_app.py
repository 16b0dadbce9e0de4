"""slowapi on Redis, as its documentation sets it up: `slowapi_app.py` with `storage_uri`.

Its storage is `limits`' synchronous Redis storage, so every check blocks
the event loop for one round trip. The URL comes from `BENCH_REDIS_URL`; a
key prefix per server process keeps each fresh server's probe path fresh.
"""

from __future__ import annotations

import os

from _common import PATH, PROBE, hello, probe
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from starlette.applications import Starlette
from starlette.routing import Route

limiter = Limiter(
    key_func=get_remote_address,
    storage_uri=os.environ["BENCH_REDIS_URL"],
    key_prefix=f"bench{os.getpid()}",
)

app = Starlette(
    routes=[
        Route(PATH, limiter.limit("1000000/second")(hello)),
        Route(PROBE, limiter.limit("1/minute")(probe)),
    ]
)
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
