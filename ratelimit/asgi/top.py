"""`top_app`: a JSON debug endpoint showing a `TopCallers`' heaviest callers.

Nothing serves it unless the app mounts it (off by default); mount it where
only operators reach it, since with `show_keys=True` it shows key text.

    app.mount("/debug/top", top_app(top))

Answer (one process's view; under several workers, the answering one's):
`{"pid": 123, "capacity": 64, "keys_shown": false, "tables": {"api-key":
{"total": 1500, "callers": [{"key": "9f..", "estimate": 900, "error": 0}]}}}`.
`?n=20` asks for more callers per table (at most the capacity). For the
whole fleet's view, see `RateLimitMiddleware(top=)` and `ratelimit top`.
"""

from __future__ import annotations

import json
import os
from urllib.parse import parse_qs

from .._types import ASGIApp, Receive, Scope, Send
from ..policy.top import TopCallers

__all__ = ["top_app"]


def top_app(top: TopCallers, n: int = 10) -> ASGIApp:
    """An ASGI app answering GET with `top`'s `n` heaviest callers per table, as JSON."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        count = n
        query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        if query.get("n", [""])[0].isdigit():
            count = min(int(query["n"][0]), top.capacity)
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
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app
