"""Who a request counts against: API keys, and the tier each key belongs to.

Callers send `x-api-key`. Keys that start with `paid-` belong to the paid tier;
every other key is free. The rate-limit config imports these functions by name
(`"examples.imagegen.keys:paid_key"`): each tier's token bucket is keyed by a
function that returns None for the other tier, so a caller meets exactly one
bucket, and the library's exemption rule does the routing.
"""

from __future__ import annotations

from typing import Literal

from starlette.types import Scope

Tier = Literal["free", "paid"]

#: The header that carries the caller's API key.
HEADER = b"x-api-key"
PAID_PREFIX = "paid-"


def api_key(scope: Scope) -> str | None:
    """The request's API key, or None when it has none (the app answers 401)."""
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            text = bytes(value).decode("latin-1").strip()
            return text or None
    return None


def tier_of(key: str) -> Tier:
    """The tier an API key belongs to."""
    return "paid" if key.startswith(PAID_PREFIX) else "free"


def paid_key(scope: Scope) -> str | None:
    """The key of a paid caller; None (exempt) for free and anonymous callers."""
    key = api_key(scope)
    return key if key is not None and tier_of(key) == "paid" else None


def free_key(scope: Scope) -> str | None:
    """The key of a free caller; None (exempt) for paid and anonymous callers."""
    key = api_key(scope)
    return key if key is not None and tier_of(key) == "free" else None


def priority(scope: Scope) -> int:
    """Queue priority as a number: paid callers (1) before free ones (0)."""
    key = api_key(scope)
    return 1 if key is not None and tier_of(key) == "paid" else 0


def tier(scope: Scope) -> Tier:
    """The request's class in the GPU pool's line ("paid" or "free", see `shares`)."""
    key = api_key(scope)
    return "paid" if key is not None and tier_of(key) == "paid" else "free"
