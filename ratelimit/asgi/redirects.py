"""Trailing-slash redirects cost nothing.

Rules ignore a trailing slash (so `/v1/models/` cannot slip past a rule for
`/v1/models`), but an app often answers the other spelling with a redirect
and nothing else: Starlette's `redirect_slashes` sends a 307 to the path with
the slash added or removed when no route matches as sent. Such a response
gives the request's token-bucket and window units back before it goes out, so
the client's follow-up request finds them there (concurrency slots are released
as the response ends).

Only a redirect to the request's own path on its own host, up to trailing
slashes, qualifies; any other redirect was the endpoint's answer and stays
charged. (An endpoint that redirects to a location taken from the request, an
open redirect, could be made to send such a redirect after doing its work.)
"""

from __future__ import annotations

import logging
from urllib.parse import unquote, urlsplit

from .._types import Message, Scope
from ..core.decision import Decision
from ..core.engine import Engine

logger = logging.getLogger("ratelimit")

#: Statuses of a plain redirect (303 "see other" answers a request that was handled).
REDIRECTS = frozenset({301, 302, 307, 308})


def slash_redirect(scope: Scope, start: Message) -> bool:
    """Whether response `start` redirects to the request's own path with only its
    trailing slash added or removed, on the request's host (the query is not compared)."""
    if start.get("status") not in REDIRECTS:
        return False
    location = host = None
    for name, value in scope.get("headers", ()):
        if name == b"host":
            host = bytes(value).decode("latin-1").lower()
            break
    for name, value in start.get("headers", ()):
        if name.lower() == b"location":
            location = urlsplit(bytes(value).decode("latin-1"))
            break
    if location is None or (location.netloc and host and location.netloc.lower() != host):
        return False
    path: str = scope["path"]
    bare = path.rstrip("/")
    # Starlette sends the path percent-encoded; a path that needed no encoding compares as is.
    for target in (location.path, unquote(location.path)):
        if target.startswith("/") and target != path and target.rstrip("/") == bare:
            return True
    return False


async def refund_if_slash_redirect(
    engine: Engine, decision: Decision, scope: Scope, start: Message
) -> None:
    """Refund `decision` (see `Engine.refund`) if response `start` is a trailing-slash
    redirect of its request. A refund that fails is logged; the response goes out regardless.
    """
    if not slash_redirect(scope, start):
        return
    try:
        await engine.refund(decision)
    except Exception as exc:
        logger.warning("ratelimit: could not refund a trailing-slash redirect (%r)", exc)
