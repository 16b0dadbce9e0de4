"""Requests that cannot be rated: a key, cost, priority or fair_key function failed,
or the JSON body a rule reads is malformed, cut short or too long.

The engine raises `CallableError` before asking the backend, so nothing was
consumed. The middleware answers 400 with `UNRATABLE` (a rule in shadow mode
lets the request through instead); the `Limiter` counts the outcome `invalid`
and logs the error (see `core.callables.CallableErrorLog`).
"""

from __future__ import annotations

from . import responses

#: Status, headers and body of the refusal. `about:blank` with the status phrase as its
#: title (RFC 9457: no registered type fits); the detail says what happened, never why
#: in detail (the exception and the request's data stay in the server's log).
UNRATABLE: tuple[int, responses.Headers, bytes] = (
    400,
    [(b"content-type", b"application/problem+json")],
    b'{"type":"about:blank","title":"Bad Request","status":400,'
    b'"detail":"The request could not be rated: its key, cost or priority could not be '
    b'computed from it."}',
)


def too_large(limit: int) -> tuple[int, responses.Headers, bytes]:
    """Status, headers and body of the refusal of a body longer than a rule reads (413)."""
    detail = f"The request body is longer than the {limit} bytes this endpoint reads to rate it."
    body = f'{{"type":"about:blank","title":"Content Too Large","status":413,"detail":"{detail}"}}'
    return 413, [(b"content-type", b"application/problem+json")], body.encode()
