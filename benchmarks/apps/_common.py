"""The handler every variant serves, so only the middleware differs.

Apps in this folder are imported by uvicorn with `--app-dir benchmarks/apps`
as top-level modules (not as `benchmarks.apps.*`): the repository root must
stay off `sys.path`, or our `ratelimit/` would shadow asgi-ratelimit's.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

#: The benchmarked path: every variant limits it, with a rate never reached.
PATH = "/hello"
#: A path limited to one request a minute: the harness asks it twice and expects
#: a 429, proving the limiter is really in the request path.
PROBE = "/probe"


async def hello(request: Request) -> Response:
    """The benchmarked endpoint: a tiny JSON body."""
    return JSONResponse({"hello": "world"})


async def probe(request: Request) -> Response:
    """The probe endpoint (see `PROBE`)."""
    return JSONResponse({"probe": True})
