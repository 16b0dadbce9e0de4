"""Wake-ups for waiters: one subscription per backend to the channel its scripts PUBLISH on.

The queue scripts publish each hand-off ("g <ticket> ...") and each shed or
expired ticket ("s <ticket> ...") on `<prefix>:queue`. Each process holds one
`SUBSCRIBE` connection per backend and hands every message to the backend,
which wakes its own waiters by ticket id. On Redis Cluster a script's PUBLISH
reaches every node, so one subscription to any master hears the whole fleet.

A subscription is a convenience, never a dependency: it is opened lazily,
reopened (at most once per `retry_after` seconds) when it breaks, and a
message lost while it was down is found by the waiters' slow poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from redis import exceptions as rx

from .lane import Lane, retrieve
from .resp import pack
from .transport import PipelinedTransport

logger = logging.getLogger("ratelimit")


class _SubscriberLane(Lane):
    """A lane in subscribe mode: pushed messages go to `on_message`, replies to callers."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        *,
        on_message: Callable[[bytes], None],
    ) -> None:
        super().__init__(loop, timeout)
        self._on_message = on_message

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while True:
            reply = reader.gets()
            if reply is False:
                break
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                try:
                    self._on_message(reply[2])
                except Exception:  # a bad message must not break the subscription
                    logger.exception("ratelimit: could not dispatch a queue message")
                continue
            self._answered += 1
            waiting = self._waiting
            if not waiting:
                self._fail(rx.ConnectionError("Redis sent a reply nobody asked for"))
                return
            future = waiting.popleft()
            self._sent.popleft()
            if future.done():
                continue
            if isinstance(reply, rx.ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)


class Subscriber:
    """One `SUBSCRIBE channel` connection, opened by `ensure()` and reopened when it breaks.

    `locate` gives the URL to subscribe on (None: this backend cannot
    subscribe, e.g. TLS; waiters then rely on their poll alone).
    """

    def __init__(
        self,
        channel: str,
        locate: Callable[[], Awaitable[str | None]],
        on_message: Callable[[bytes], None],
        *,
        timeout: float,
        connect_timeout: float,
        retry_after: float,
    ) -> None:
        self.channel = channel
        self._locate = locate
        self._on_message = on_message
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        self._transport: PipelinedTransport | None = None
        self._lane: Lane | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_try = 0.0

    @property
    def subscribed(self) -> bool:
        """Whether messages are being received right now."""
        lane = self._lane
        return lane is not None and not lane.broken

    def ensure(self) -> None:
        """Start subscribing in the background unless subscribed or trying already."""
        loop = asyncio.get_running_loop()
        lane = self._lane
        if lane is not None and not lane.broken and lane.loop is loop:
            return
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        if loop.time() < self._next_try:
            return
        self._next_try = loop.time() + self.retry_after
        self._task = loop.create_task(self._subscribe())
        self._task.add_done_callback(retrieve)

    async def ready(self) -> None:
        """Wait for a subscription attempt under way (tests, benchmarks): no message
        published after this returns (subscribed) is missed."""
        task = self._task
        if task is not None:
            await asyncio.shield(task)

    async def _subscribe(self) -> None:
        try:
            url = await self._locate()
            if url is None:
                return
            old, self._transport = self._transport, None
            if old is not None:
                await old.aclose()
            transport = self._transport = PipelinedTransport(
                url,
                timeout=self.timeout,
                connect_timeout=self.connect_timeout,
                lane=partial(_SubscriberLane, on_message=self._on_message),
            )
            lane = await transport._connect()
            await lane.call(pack("SUBSCRIBE", self.channel))
            self._lane = lane
        except (rx.RedisError, OSError, asyncio.TimeoutError) as exc:
            # Waiters poll meanwhile; the next attempt comes with a later wait.
            logger.debug("ratelimit: queue subscription failed (%s); polling", exc)

    async def aclose(self) -> None:
        """Close the subscription."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        transport, self._transport = self._transport, None
        self._lane = None
        if transport is not None:
            await transport.aclose()


def parse_message(data: Any) -> tuple[str, list[str]]:
    """("granted" | "shed", ticket ids) of a published queue message."""
    text = data.decode() if isinstance(data, bytes) else str(data)
    kind, *tickets = text.split(" ")
    return ("granted" if kind == "g" else "shed"), tickets
