"""Holding concurrency leases for running requests: renewed together, released once.

An admitted request's leases are held in one table; one background loop
renews them all every lease/3 seconds while any is held. A grant is released
exactly once (a second release raises `LeaseError`); how long it was held
feeds the moving average of service time behind the waiting lines' estimates.
Cleanup that must outlive a cancelled request runs as background tasks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from typing import Any

from .._errors import LeaseError
from ..algorithms import queue
from ..backends.base import Backend, LeaseCheck, nowait_method
from .decision import EngineObserver, Grant
from .plan import LEASE, Plan

logger = logging.getLogger("ratelimit")


class Holding:
    """The leases one engine holds against `backend`, and its background cleanup."""

    def __init__(self, backend: Backend, observer: EngineObserver | None) -> None:
        self.backend = backend
        self.observer = observer
        #: The backend's synchronous twin of release, if it has one (NowaitBackend).
        self._release_nowait = nowait_method(backend, "release")
        #: Or its way of sending a release without awaiting the answer (PostingBackend).
        self._release_post = nowait_method(backend, "release", "post_release")
        #: Lease id -> lease, of every grant not yet released.
        self.held: dict[str, LeaseCheck] = {}
        #: Seconds between renewals: a third of the shortest lease of any rule.
        self.renew_every = math.inf
        self._renewer: asyncio.Task[None] | None = None
        self.background: set[asyncio.Task[Any]] = set()
        #: (rule, limit index) -> moving average of how long a slot is held, in seconds.
        self.service: dict[tuple[str, int], float] = {}

    def hold(self, leases: tuple[LeaseCheck, ...], plan: Plan) -> Grant:
        """Hold an admitted request's `leases` (renewed from now on) as its grant."""
        for lease in leases:
            self.held[lease.lease_id] = lease
        renewer = self._renewer
        if renewer is None or renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())
        return Grant(leases, False, time.monotonic(), plan)

    async def release(self, grant: Grant) -> None:
        """Free a grant's slots. Releasing the same grant twice raises `LeaseError`."""
        if self.release_nowait(grant):
            return
        self._let_go(grant)
        for lease in grant.leases:
            await self._release_lease(lease)

    def release_nowait(self, grant: Grant) -> bool:
        """`release`, done at once if the backend answers without waiting (`NowaitBackend`)
        or can send it without waiting for the answer (`PostingBackend`).

        False, having done nothing, when the caller must `await release(grant)`.
        """
        nowait = self._release_nowait
        if nowait is None:
            post = self._release_post
            # Released already: `release` raises, as a second release must.
            if post is None or grant.released or not post(grant.leases[0]):
                return False
            self._let_go(grant)
            for lease in grant.leases[1:]:
                if not post(lease):
                    self.spawn(self._release_lease(lease))
            return True
        self._let_go(grant)
        for lease in grant.leases:
            try:
                nowait(lease)
            except Exception:
                _release_failed(lease)
        return True

    def release_soon(self, grant: Grant) -> None:
        """Release without waiting: for `finally` blocks of cancelled or failed requests."""
        if grant.released:
            return
        self.spawn(self.release(grant))

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run `work` in the background (cleanup that must outlive a cancelled request)."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        task.add_done_callback(_log_failure)

    async def aclose(self) -> None:
        """Stop background work (the renewal loop and pending releases)."""
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
        if self._renewer is not None and not self._renewer.done():
            self._renewer.cancel()

    async def _release_lease(self, lease: LeaseCheck) -> None:
        try:
            await self.backend.release(lease)
        except Exception:
            _release_failed(lease)

    def _let_go(self, grant: Grant) -> None:
        """Mark `grant` released and stop renewing its leases."""
        if grant.released:
            raise LeaseError("this grant was already released")
        grant.released = True
        plan = grant.plan
        if plan is not None:
            # A slot's service time: the moving average behind wait estimates.
            held = time.monotonic() - grant.started
            service = self.service
            name = plan.rule.name
            for i, kind in enumerate(plan.kinds):
                if kind == LEASE:
                    service[name, i] = queue.ewma(service.get((name, i), 0.0), held)
        if self.observer is not None:
            self.observer.on_release(grant)
        for lease in grant.leases:
            self.held.pop(lease.lease_id, None)

    async def _renew_loop(self) -> None:
        """Renew every held lease each lease/3 seconds; exit when none are held."""
        every = self.renew_every
        while self.held:
            await asyncio.sleep(every)
            batch = list(self.held.values())
            if not batch:
                break
            try:
                alive = await self.backend.renew(batch)
            except Exception as exc:
                logger.warning("lease renewal failed (%s); retrying in %.1fs", exc, every)
                continue
            lost = [
                lease
                for lease, ok in zip(batch, alive, strict=True)
                if not ok and lease.lease_id in self.held
            ]
            if lost:
                logger.warning("%d lease(s) expired before renewal (store lost them)", len(lost))


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("ratelimit background cleanup failed: %r", task.exception())


def _release_failed(lease: LeaseCheck) -> None:
    # Never fail the response: the backend retries a release that got no answer
    # (Redis: once it answers again), and a lease expires by itself within its ttl.
    logger.warning(
        "could not release lease %s now; it is retried, or expires within %ss", lease.key, lease.ttl
    )
