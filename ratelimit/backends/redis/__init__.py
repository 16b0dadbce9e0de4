"""The Redis backend: atomic Lua scripts on the server's clock, keys safe for Redis Cluster."""

from __future__ import annotations

from .backend import RedisBackend as RedisBackend

__all__ = ["RedisBackend"]
