"""Costs and keys read from the JSON request body: the contract, and parsing it.

A rule's cost function that takes two positional parameters, `(scope, body)`,
reads the body: `body` is the request's JSON object, parsed once (a `dict`).
`keys.body_field(name)` keys a limit by a top-level field of it (per-model
limits). The face (the middleware) reads the body of a request whose rule
needs it, up to the rule's `body_limit` bytes, parses it with `parse` and
keeps it in the scope under `SCOPE_KEY`; the app then receives it unchanged.
A body that is not a JSON object makes the request unratable (400), never free.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

from .._types import Scope

#: Bytes of body read at most by default (1 MiB): past it the request is refused (413).
BODY_LIMIT = 1 << 20
#: Where the face keeps the parsed body in the request's scope (the app may read it too).
SCOPE_KEY = "ratelimit.body"


def takes_body(func: Callable[..., Any]) -> bool:
    """Whether a cost function reads the body: it takes `(scope, body)`, two positional
    parameters without defaults (or `*args` after the scope). Decided once, at rule
    construction, from its signature; one whose signature is unreadable takes `(scope)`."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return False
    required = 0
    for param in signature.parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            return required <= 1
        if (
            param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
            and param.default is param.empty
        ):
            required += 1
    return required >= 2


def reads_body(key: object) -> bool:
    """Whether a key function reads the parsed body (`keys.body_field`)."""
    return bool(getattr(key, "reads_body", False))


def parse(data: bytes, content_type: str | None) -> dict[str, Any]:
    """The request's JSON object from its body bytes and `content-type` (None: absent).

    Raises ValueError saying what is wrong: a declared type other than JSON
    (`application/json` or `*/*+json`), bytes that are not JSON, or JSON that
    is not an object. A missing content-type is read as JSON, as FastAPI does.
    """
    if content_type is not None:
        media = content_type.partition(";")[0].strip().lower()
        if media != "application/json" and not (
            media.startswith("application/") and media.endswith("+json")
        ):
            raise ValueError(f"has content-type {media!r}, not application/json")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; RecursionError is deep nesting.
        raise ValueError(f"is not JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise ValueError(f"is JSON {type(value).__name__}, not an object")
    return value


def body_of(scope: Scope) -> Mapping[str, Any]:
    """The parsed body the face kept in `scope`; KeyError when it read none."""
    body: Mapping[str, Any] = scope[SCOPE_KEY]
    return body
