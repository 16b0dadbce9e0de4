"""Ghost leases: undoing script calls whose outcome this process never learned.

A decide or enqueue call whose reply is late or lost (a timeout, a dropped
connection, a caller cancelled while the call was in flight) may still run on
Redis: its lease, or its ticket in line, is then held by nobody, and a
`Concurrency(1)` would refuse everyone for the whole lease time. The backend
hands each lease id such a call proposed to `Ghosts`, which runs forget.lua for
it (take the ticket out of line, free the lease, hand free slots to the line's
head; a no-op for an id that is not there):

- at once, posted on the live connection if there is one: written after the
  call that may have run, so Redis runs it after that call (a cancelled caller);
- else, and after any failure, every `RETRY` seconds through the backend's
  breaker, until Redis answers (the next connection);
- and once more `AGAIN` seconds after the first success: a new connection's
  call may be read before the old connection's buffered one, once Redis runs
  again after a stall.

A ghost that Redis never answers for its lease's ttl plus `MARGIN` is given up
(the lease, if it was recorded, expires by itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from ..._errors import BackendError
from .lane import Done
from .scripts import Script

logger = logging.getLogger("ratelimit")

#: Seconds between attempts while Redis does not answer.
RETRY = 0.1
#: Seconds between the first successful undo and the second.
AGAIN = 0.5
#: Seconds past a lease's ttl to keep trying while Redis does not answer at all.
MARGIN = 60.0
#: Ghosts kept at most (an outage before the breaker opens makes a few per call in flight).
MAX_GHOSTS = 10_000

#: One ghost's forget.lua call: KEYS, ARGV and the lease's ttl in seconds.
Undo = tuple[list[str], list[str], float]


class _Ghost:
    __slots__ = ("args", "due", "give_up", "keys", "undone")

    def __init__(self, keys: list[str], args: list[str], give_up: float) -> None:
        self.keys = keys
        self.args = args
        self.give_up = give_up
        #: When to try next (loop time); infinite while a posted attempt is in flight.
        self.due = 0.0
        #: Successful undos so far (two are needed: see the module docstring).
        self.undone = 0


class Ghosts:
    """The ghosts of one backend, and the background task that undoes them.

    `call` awaits a script call through the backend's breaker (raising
    BackendError); `post` sends one on the live connection without waiting
    (False when there is none: see `Transport.post`).
    """

    def __init__(
        self,
        script: Callable[[], Script],
        call: Callable[[Script, list[str], list[str]], Awaitable[Any]],
        post: Callable[[Script, Sequence[str], Sequence[str], Done], bool],
    ) -> None:
        self._script = script
        self._call = call
        self._post = post
        self._pending: set[_Ghost] = set()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, undos: Sequence[Undo]) -> None:
        """Undo these calls' ids: now on the live connection if any, then until it works."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        script = self._script()
        for keys, args, ttl in undos:
            if len(self._pending) >= MAX_GHOSTS:
                logger.debug("ratelimit: too many unanswered leases to undo; this one expires")
                break
            ghost = _Ghost(keys, args, now + ttl + MARGIN)
            self._pending.add(ghost)
            if self._post(script, keys, args, partial(self._posted, ghost)):
                ghost.due = float("inf")
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = loop.create_task(self._run())

    async def aclose(self) -> None:
        """Stop retrying; one last attempt for each ghost left (Redis may answer now)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        pending, self._pending = self._pending, set()
        if pending:
            await asyncio.gather(*(self._undo(g) for g in pending), return_exceptions=True)

    def _posted(self, ghost: _Ghost, reply: Any, error: BaseException | None) -> None:
        if error is None:
            self._succeeded(ghost)
        else:
            ghost.due = 0.0  # the task tries again through the breaker

    def _succeeded(self, ghost: _Ghost) -> None:
        ghost.undone += 1
        if ghost.undone >= 2:
            self._pending.discard(ghost)
        else:
            ghost.due = asyncio.get_running_loop().time() + AGAIN

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            now = loop.time()
            due = [ghost for ghost in self._pending if ghost.due <= now]
            if due:
                await asyncio.gather(*(self._undo(ghost) for ghost in due))
            await asyncio.sleep(RETRY)

    async def _undo(self, ghost: _Ghost) -> None:
        try:
            await self._call(self._script(), ghost.keys, ghost.args)
        except BackendError as exc:
            now = asyncio.get_running_loop().time()
            if now > ghost.give_up:
                self._pending.discard(ghost)
                logger.warning(
                    "ratelimit: could not undo an unanswered lease (%s); it expires by itself", exc
                )
            else:
                ghost.due = now + RETRY
        else:
            self._succeeded(ghost)
