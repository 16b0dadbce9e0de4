"""Litestar: one `Limiter` for the whole app, registered as a plugin.

    from litestar import Litestar
    from ratelimit import Limiter, Rule, Window, keys
    from ratelimit.litestar import RateLimitPlugin

    limiter = Limiter(rules=[Rule("/v1/*", limits=[Window("600/minute", key=keys.client_ip())])])
    app = Litestar(route_handlers=[...], plugins=[RateLimitPlugin(limiter)])

Why a plugin: Litestar builds app-, router- and controller-level middleware
once per route handler (its OpenAPI pages included), and that middleware
never sees the ASGI lifespan. `DefineMiddleware(RateLimitMiddleware, rules=...)`
would give every handler a limiter of its own, so a limit would count per
handler; `RateLimitMiddleware` refuses to be built that way. The plugin
registers the middleware over one limiter, outermost of the app's middleware,
starts the limiter at start-up and closes it at shutdown.

`import ratelimit` does not import this module (nor Litestar).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from litestar.config.app import AppConfig
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPluginProtocol

from ._errors import ConfigError
from .asgi.middleware import RateLimitMiddleware, RefuseHook
from .core.limiter import Limiter

__all__ = ["RateLimitPlugin"]


class RateLimitPlugin(InitPluginProtocol):
    """Apply one `Limiter`'s rules to every route of a Litestar app, and own its lifetime.

    `on_refuse` and `headers` mean what they mean for `RateLimitMiddleware`.
    The limiter starts at the app's start-up (or on the first request, if the
    app is served without a lifespan) and is closed at its shutdown, once:
    share it with code that outlives the app only through
    `DefineMiddleware(RateLimitMiddleware, limiter=limiter)`, closing it yourself.
    """

    def __init__(
        self,
        limiter: Limiter,
        *,
        on_refuse: RefuseHook | None = None,
        headers: bool | None = None,
    ) -> None:
        if not isinstance(limiter, Limiter):
            raise ConfigError("limiter", "a ratelimit Limiter, e.g. Limiter(rules=[...])", limiter)
        #: The one limiter of the app: every route's middleware is its face.
        self.limiter = limiter
        self.on_refuse = on_refuse
        self.headers = headers
        self._closed = False

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Put the middleware first (outermost) and the limiter's start and close in the
        app's lifespan hooks (the close last, after the app's own shutdown hooks)."""
        # Litestar types ASGI apps with its own TypedDicts; ours are plain dicts at runtime.
        middleware = DefineMiddleware(
            cast("Callable[..., Any]", RateLimitMiddleware),
            limiter=self.limiter,
            on_refuse=self.on_refuse,
            headers=self.headers,
        )
        app_config.middleware.insert(0, middleware)
        app_config.on_startup.append(self.limiter.start)
        app_config.on_shutdown.append(self._close)
        return app_config

    async def _close(self) -> None:
        """Close the limiter at the app's shutdown; a second shutdown does nothing."""
        if self._closed:
            return
        self._closed = True
        await self.limiter.aclose()
