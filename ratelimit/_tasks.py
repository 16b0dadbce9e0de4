"""Stopping background tasks, shared by the layers that run them (overrides, top callers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

logger = logging.getLogger("ratelimit")


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait for it to end, cancelling again if a cancellation was absorbed."""
    for _ in range(20):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
            return
    logger.warning("ratelimit: a background task did not stop: %r", task)
