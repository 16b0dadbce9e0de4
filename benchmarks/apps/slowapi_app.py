"""slowapi as its documentation sets it up for Starlette, memory storage.

`Limiter(key_func=get_remote_address)` on `app.state.limiter`, its 429
handler registered, and the `@limiter.limit(...)` decorator on the endpoint
(its default fixed-window strategy and `memory://` storage, made explicit).
"""

from __future__ import annotations

from _common import PATH, PROBE, hello, probe
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from starlette.applications import Starlette
from starlette.routing import Route

limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")

app = Starlette(
    routes=[
        Route(PATH, limiter.limit("1000000/second")(hello)),
        Route(PROBE, limiter.limit("1/minute")(probe)),
    ]
)
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
