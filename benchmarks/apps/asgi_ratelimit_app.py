"""asgi-ratelimit's memory backend, as its README sets it up.

Runs in its own venv: this `ratelimit` is asgi-ratelimit's module, not ours.
Its built-in `client_ip` auth refuses non-global addresses such as loopback,
so the auth function is the README's "write your own": the socket peer.
"""

from __future__ import annotations

from typing import Any

from _common import PATH, PROBE, hello, probe
from ratelimit.backends.simple import MemoryBackend
from starlette.applications import Starlette
from starlette.routing import Route

from ratelimit import RateLimitMiddleware, Rule


async def client_ip(scope: dict[str, Any]) -> tuple[str, str]:
    """The caller's identity and group: the socket peer, group "default"."""
    return scope["client"][0], "default"


app = Starlette(routes=[Route(PATH, hello), Route(PROBE, probe)])
app.add_middleware(
    RateLimitMiddleware,
    authenticate=client_ip,
    backend=MemoryBackend(),
    config={
        rf"^{PATH}$": [Rule(second=1000000)],
        rf"^{PROBE}$": [Rule(minute=1)],
    },
)
