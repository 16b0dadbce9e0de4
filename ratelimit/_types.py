"""ASGI and callable aliases shared across layers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, TypeAlias

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

#: A key function: maps a request scope to the caller's key, or None to exempt it.
KeyFunc: TypeAlias = Callable[[Scope], "str | Awaitable[str | None] | None"]
#: Units of `requests`, or units per dimension (see `policy.costs`).
CostValue: TypeAlias = "int | Mapping[str, int]"
#: A cost function of the scope, or of the scope and the JSON body (sync or async).
CostFunc: TypeAlias = (
    "Callable[[Scope], CostValue | Awaitable[CostValue]]"
    " | Callable[[Scope, Mapping[str, Any]], CostValue | Awaitable[CostValue]]"
)
Clock: TypeAlias = Callable[[], float]
