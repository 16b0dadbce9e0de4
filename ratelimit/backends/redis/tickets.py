"""This process's waiters in Redis waiting lines: their tickets, wake-ups and leaving.

A waiter's ticket is registered before its enqueue call (a hand-off may be
published before the reply is read). A published message wakes it at once;
every `WAIT_POLL` s it also looks itself (wait.lua), which serves the line and
keeps its ticket alive. A cancelled or failing waiter leaves in a background
task that releases any slot granted meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from ..._errors import BackendError, BackendUnavailable
from ..base import Check, Entry, LeaseCheck, QueueCheck
from .calls import Calls
from .ghosts import Ghosts
from .guard import Guard, unreachable
from .pubsub import Subscriber, parse_message
from .sagas import Slots

logger = logging.getLogger("ratelimit")

#: Seconds between a waiter's polls of its line (wait.lua): the safety net under the
#: pub/sub wake-ups (a lost message, slots freed by a lease's expiry), and the
#: heartbeat that keeps its ticket alive.
WAIT_POLL = 0.5


class _Ticket:
    """A waiter of this process: its member in line, and the future a message settles."""

    __slots__ = ("future", "member")

    def __init__(self, future: asyncio.Future[str]) -> None:
        self.future = future
        #: The ticket's text in line (from enqueue.lua); "" until it is queued.
        self.member = ""


class Tickets:
    """The waiters of one backend, by ticket (lease) id, and the tasks finishing for them."""

    def __init__(
        self,
        guard: Guard,
        calls: Calls,
        slots: Slots,
        ghosts: Ghosts,
        *,
        subscribe_url: Callable[[], Awaitable[str | None]],
        timeout: float,
        connect_timeout: float,
    ) -> None:
        self.guard = guard
        self.calls = calls
        self.slots = slots
        self.ghosts = ghosts
        #: This process's waiters by ticket id.
        self.waiting: dict[str, _Ticket] = {}
        self.subscriber = Subscriber(
            calls.channel,
            subscribe_url,
            self._on_message,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retry_after=WAIT_POLL,
        )
        #: Leaves of cancelled waiters and retried releases, finishing in the background.
        self.background: set[asyncio.Task[Any]] = set()

    async def enqueue(self, checks: Sequence[Check], queue: QueueCheck) -> Entry:
        """Decide `checks` and get in line if only the lease lacks a slot (see `Slots.enqueue`)."""
        lease = queue.lease
        index = next((i for i, check in enumerate(checks) if check is lease), -1)
        if index < 0:
            index = list(checks).index(lease)
        ticket = _Ticket(asyncio.get_running_loop().create_future())
        # Registered before the call: a hand-off may be published before its reply is read.
        self.waiting[lease.lease_id] = ticket
        self.subscriber.ensure()
        try:
            entry, ticket.member = await self.slots.enqueue(
                checks, self.slots.groups(checks), index, queue
            )
        except BaseException:
            self.waiting.pop(lease.lease_id, None)
            raise
        if entry.outcome != "queued":
            self.waiting.pop(lease.lease_id, None)
        return entry

    async def wait(self, queue: QueueCheck, timeout: float) -> str:
        """Wait up to `timeout` s for the hand-off of a slot (see `QueueBackend.wait`).

        On timeout it leaves the line (if a slot came meanwhile, it keeps it).
        """
        lease = queue.lease
        ticket = self.waiting.get(lease.lease_id)
        if ticket is None or not ticket.member:
            return "shed"
        future = ticket.future
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not future.done():
                left = deadline - loop.time()
                if left <= 0:
                    break
                self.subscriber.ensure()
                await asyncio.wait((future,), timeout=min(left, WAIT_POLL))
                left = deadline - loop.time()
                if future.done() or left <= 0:
                    break
                state = await self.wait_call(lease, ticket.member, left)
                if state != 0:
                    return "granted" if state == 1 else "shed"
            if future.done():
                return future.result()
            left_as = await self.leave_call(lease, ticket.member, release=False)
            return "granted" if left_as == 1 else "timeout"
        except BaseException:
            self.leave_later(lease, ticket.member)
            raise
        finally:
            self.waiting.pop(lease.lease_id, None)

    async def wait_call(self, lease: LeaseCheck, member: str, left: float) -> int:
        """wait.lua: 1 granted, 0 waiting (ticket kept alive), -1 gone."""
        keys, args = self.calls.wait_args(lease, member, left)
        reply = await self.guard.call(self.calls.scripts.wait, keys, args)
        return int(reply[0])

    async def leave_call(self, lease: LeaseCheck, member: str, *, release: bool) -> int:
        """leave.lua: 0 left the line, 1 granted (kept), 2 granted (released), -1 gone."""
        keys, args = self.calls.leave_args(lease, member, release=release)
        return int(await self.guard.call(self.calls.scripts.leave, keys, args))

    def leave_later(self, lease: LeaseCheck, member: str) -> None:
        """Leave the line in a task of its own: the cancelled waiter's task cannot finish it."""
        self.in_background(self._leave_quietly(lease, member))

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in a task of its own, awaited by `aclose`."""
        task = asyncio.get_running_loop().create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def aclose(self) -> None:
        """Let background work finish; waiters still waiting get "shed" (their tickets
        expire in Redis by themselves)."""
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
        for ticket in self.waiting.values():
            if not ticket.future.done():
                ticket.future.set_result("shed")

    async def _leave_quietly(self, lease: LeaseCheck, member: str) -> None:
        try:
            await self.leave_call(lease, member, release=True)
        except BackendError as exc:
            logger.debug("ratelimit: could not leave a line (%s)", exc)
            cause = exc.__cause__
            if isinstance(exc, BackendUnavailable) or (cause is not None and unreachable(cause)):
                # Not sent, or not answered: the ticket, or the lease it was granted
                # meanwhile, is undone once Redis answers, not held for its ttl.
                self.ghosts.add(self.calls.undos((lease,)))

    def _on_message(self, data: bytes) -> None:
        """Wake this process's waiters named in a published hand-off or shed."""
        outcome, tickets = parse_message(data)
        waiting = self.waiting
        for ticket_id in tickets:
            ticket = waiting.get(ticket_id)
            if ticket is not None and not ticket.future.done():
                ticket.future.set_result(outcome)
