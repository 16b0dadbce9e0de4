"""The Redis backend (in progress in this session: see issue 3)."""

from __future__ import annotations

from typing import Any


class RedisBackend:
    """Placeholder replaced by the real Redis backend in this session."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("RedisBackend is being built")
