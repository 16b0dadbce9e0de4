"""A pure ASGI middleware that does nothing but call the app: the floor of any middleware.

Added the way every limiter here is (`add_middleware`), so the cost of one more
layer in Starlette's stack is told apart from the cost of limiting.
"""

from __future__ import annotations

from typing import Any

from _common import PATH, PROBE, hello, probe
from starlette.applications import Starlette
from starlette.routing import Route


class PassThrough:
    """Hands every call to the app unchanged."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


app = Starlette(routes=[Route(PATH, hello), Route(PROBE, probe)])
app.add_middleware(PassThrough)
