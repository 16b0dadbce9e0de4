"""`top_app`: a JSON debug endpoint showing a `TopCallers`' heaviest callers.

Nothing serves it unless the app mounts it (off by default); mount it where
only operators reach it, since with `show_keys=True` it shows key text.

    app.mount("/debug/top", top_app(top))

Answer (one process's view; under several workers, the answering one's):
`{"pid": 123, "capacity": 64, "keys_shown": false, "tables": {"api-key":
{"total": 1500, "callers": [{"key": "9f..", "estimate": 900, "error": 0}]}}}`.
`?n=20` asks for more callers per table (a whole number; past the capacity it
reads as the capacity); anything else, or `n` given twice, is a 400. For the
whole fleet's view, see `RateLimitMiddleware(top=)` and `ratelimit top`.
"""

from __future__ import annotations

import json
import os

from .._errors import ConfigError
from .._types import ASGIApp, Receive, Scope, Send
from ..policy.top import TopCallers
from .admin import BadRequest, count_param, query_params, send_answer, send_bad_request

__all__ = ["top_app"]


def top_app(top: TopCallers, n: int = 10) -> ASGIApp:
    """An ASGI app answering GET with `top`'s `n` heaviest callers per table, as JSON."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError("n", "a positive integer", n)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        count = min(n, top.capacity)
        try:
            params = query_params(scope, ("n",))
            if "n" in params:
                count = count_param("n", params["n"], top.capacity)
        except BadRequest as exc:
            await send_bad_request(send, str(exc))
            return
        body = json.dumps(
            {
                "pid": os.getpid(),
                "capacity": top.capacity,
                "keys_shown": top.show_keys,
                "tables": {
                    name: {
                        "total": total,
                        "callers": [
                            {"key": c.item, "estimate": c.estimate, "error": c.error}
                            for c in callers
                        ],
                    }
                    for name, (total, callers) in top.top(count).items()
                },
            }
        ).encode()
        await send_answer(send, 200, b"application/json", body)

    return app
