"""ASGI and callable aliases shared across layers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

#: A key function: maps a request scope to the caller's key, or None to exempt it.
KeyFunc: TypeAlias = Callable[[Scope], "str | Awaitable[str | None] | None"]
#: A cost: a constant, or a function of the scope (sync or async).
CostFunc: TypeAlias = Callable[[Scope], "int | Awaitable[int]"]
Clock: TypeAlias = Callable[[], float]
