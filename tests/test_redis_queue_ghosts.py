"""Ghost tickets: an enqueue whose reply was lost leaves nobody's ticket in line only briefly.

A request that finds the one slot held joins the line (enqueue.lua). If that
call's reply is late or lost (Redis slower than the timeout, SIGSTOPped, the
request cancelled mid-call), Redis may still put its ticket in line, and nobody
waits on it. Before the fix, the holder's release then handed the slot to that
ticket as a lease of the full lease time (30 s): everyone was refused. Tickets
expire only TICKET_TTL (5 s) after their last heartbeat, so each test releases
the holder well within that, and asserts a new request is admitted by Redis
within `BOUND` seconds.

The same holds for a holder that finishes while the breaker is open: its
release, refused without reaching Redis, used to be dropped (the slot then
stayed taken for the whole lease time after Redis answered again).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from _servers import RedisServer, debug_sleep
from asgi_helpers import http_scope

from ratelimit import BackendError, Concurrency, RateLimitMiddleware, RedisBackend, Rule, keys
from ratelimit._types import Message, Receive, Scope, Send
from ratelimit.backends.base import Check, Entry, QueueCheck, StoreKey
from ratelimit.backends.redis.calls import TICKET_TTL
from ratelimit.policy.rules import FailPolicy

pytestmark = pytest.mark.redis

#: Seconds after the holder lets go within which a new request must be admitted (the
#: ghost ticket, granted the slot, would hold it for the 30 s lease; expire after 5 s).
BOUND = 1.5
POLICIES: list[FailPolicy] = ["open", "closed", "local"]
SLOTS = StoreKey("gen", "gpu", "*")


class HookedBackend(RedisBackend):
    """A RedisBackend that runs `before_enqueue` (once) right before its next enqueue call:
    the test stalls Redis there, so that exact call's reply is the one lost."""

    before_enqueue: Callable[[], Awaitable[None]] | None = None

    async def enqueue(self, checks: Sequence[Check], queue: QueueCheck) -> Entry:
        hook, self.before_enqueue = self.before_enqueue, None
        if hook is not None:
            await hook()
        return await super().enqueue(checks, queue)


class Pool:
    """`Concurrency(1, GLOBAL, queue=4)` around an app whose "hold" requests wait for `gate`."""

    def __init__(self, backend: RedisBackend, fail: FailPolicy) -> None:
        self.gate = asyncio.Event()
        limit = Concurrency(1, key=keys.GLOBAL, name="gpu", queue=4, timeout=0.2)
        rule = Rule("/gen", name="gen", limits=[limit])
        self.app = RateLimitMiddleware(self.serve, rules=[rule], backend=backend, fail=fail)
        self.backend = backend

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["query_string"] == b"hold":
            await self.gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(self, hold: bool = False) -> tuple[int, dict[bytes, bytes]]:
        """One POST /gen (held until `gate` with `hold`): status and headers."""
        start: dict[str, Any] = {}
        sent = False
        forever = asyncio.Event()

        async def receive() -> Message:
            nonlocal sent
            if sent:
                await forever.wait()  # the client stays connected
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)

        scope = http_scope("/gen", "POST")
        if hold:
            scope["query_string"] = b"hold"
        await self.app(scope, receive, send)
        return int(start["status"]), dict(start.get("headers", []))

    async def admitted_by_redis(self) -> bool:
        """One request: True if Redis decided it (breaker closed, no failure) and admitted it."""
        status, headers = await self.call()
        decided = self.backend.breaker.state == "closed" and not self.app.limiter.failing
        return decided and status == 200 and b"ratelimit" in headers

    async def ready(self) -> None:
        """One request admitted by Redis (connected), its slot free again, and enqueue.lua
        loaded, as on a server long up (a late call answered NOSCRIPT would not run)."""
        await self.backend.client.script_load(self.backend.scripts.enqueue.source)
        assert await self.admitted_by_redis()
        deadline = time.monotonic() + 5.0
        while await self.backend.in_use(SLOTS):
            assert time.monotonic() < deadline, "the first request's slot was never released"
            await asyncio.sleep(0.01)

    async def holding(self) -> asyncio.Task[tuple[int, dict[bytes, bytes]]]:
        """A request admitted by Redis that holds the slot until `gate` is set."""
        holder = asyncio.ensure_future(self.call(hold=True))
        deadline = time.monotonic() + 5.0
        while await self.backend.in_use(SLOTS) != 1:
            assert time.monotonic() < deadline, "the holder never got the slot"
            await asyncio.sleep(0.01)
        return holder

    async def answering(self) -> None:
        """Wait until a call goes through to Redis (a probe closes an open breaker)."""
        deadline = time.monotonic() + 5.0
        while True:
            try:
                await self.backend.in_use(SLOTS)
            except BackendError:
                assert time.monotonic() < deadline, "Redis never answered again"
                await asyncio.sleep(0.02)
            else:
                return

    async def assert_admitted_soon(self) -> None:
        """Poll until Redis admits a request; fail past BOUND seconds."""
        started = time.monotonic()
        while not await self.admitted_by_redis():
            waited = time.monotonic() - started
            assert waited < BOUND, f"the slot was still taken {waited:.2f}s later"
            await asyncio.sleep(0.02)

    async def let_go_and_assert_admitted_soon(
        self, holder: asyncio.Task[tuple[int, dict[bytes, bytes]]]
    ) -> None:
        """Once Redis answers (the breaker closed: the holder's release is posted), let the
        holder finish, then poll until Redis admits a request, within BOUND."""
        await self.answering()
        self.gate.set()
        status, headers = await holder
        assert status == 200
        assert b"ratelimit" in headers, "the holder was not decided by Redis"
        await self.assert_admitted_soon()


def test_the_bound_is_well_under_a_tickets_lifetime() -> None:
    """The tests tell an undone ghost ticket from one that merely expired."""
    assert BOUND + 1.5 < TICKET_TTL


@pytest.mark.parametrize("fail", POLICIES)
async def test_an_enqueue_that_outlasts_the_timeout_leaves_no_ticket_to_take_the_slot(
    debug_redis: RedisServer, fail: FailPolicy
) -> None:
    """DEBUG SLEEP past the timeout while a request joins the line: once Redis runs the late
    enqueue and the holder lets go, the slot is not kept by the ticket nobody waits on."""
    backend = HookedBackend(debug_redis.url, timeout=0.2, breaker_reset=0.25)
    pool = Pool(backend, fail)
    sleeping: list[asyncio.Future[bytes]] = []

    async def stall() -> None:
        sleeping.append(await debug_sleep(debug_redis, 0.8))

    try:
        await pool.ready()
        holder = await pool.holding()
        backend.before_enqueue = stall
        status, _ = await pool.call()  # refused by Redis, then its enqueue times out
        assert sleeping, "the request never joined the line"
        assert status == (503 if fail == "closed" else 200)
        await sleeping[0]  # Redis answers again, and runs the late enqueue
        await pool.let_go_and_assert_admitted_soon(holder)
    finally:
        pool.gate.set()
        await pool.app.aclose()


async def test_an_enqueue_sent_to_a_stopped_redis_leaves_no_ticket_to_take_the_slot(
    private_redis: RedisServer,
) -> None:
    """SIGSTOP while a request joins the line, SIGCONT past its timeout: Redis runs the
    enqueue late; the slot the holder lets go is not kept by that ticket."""
    backend = HookedBackend(private_redis.url, timeout=0.2, breaker_reset=0.25)
    pool = Pool(backend, "closed")
    pid = private_redis.pid
    assert pid is not None

    async def stop() -> None:
        os.kill(pid, signal.SIGSTOP)

    try:
        await pool.ready()
        holder = await pool.holding()
        backend.before_enqueue = stop
        try:
            status, _ = await pool.call()
            assert status == 503
            await asyncio.sleep(0.3)  # Redis stays stopped a while: undos fail meanwhile
        finally:
            os.kill(pid, signal.SIGCONT)
        await pool.let_go_and_assert_admitted_soon(holder)
    finally:
        os.kill(pid, signal.SIGCONT)
        pool.gate.set()
        await pool.app.aclose()


async def test_a_request_cancelled_while_joining_the_line_leaves_no_ticket_to_take_the_slot(
    debug_redis: RedisServer,
) -> None:
    """An outer wait_for cancels a request while its enqueue waits in Redis: once Redis runs
    it, that ticket does not keep the slot the holder lets go."""
    backend = HookedBackend(debug_redis.url, timeout=3.0, breaker_reset=0.25)
    pool = Pool(backend, "closed")
    sleeping: list[asyncio.Future[bytes]] = []

    async def stall() -> None:
        sleeping.append(await debug_sleep(debug_redis, 0.5))

    try:
        await pool.ready()
        holder = await pool.holding()
        backend.before_enqueue = stall
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.call(), 0.25)
        assert sleeping, "the request never joined the line"
        await sleeping[0]
        await pool.let_go_and_assert_admitted_soon(holder)
    finally:
        pool.gate.set()
        await pool.app.aclose()


@pytest.mark.parametrize("fail", POLICIES)
async def test_a_release_refused_by_the_open_breaker_frees_the_slot_once_redis_answers(
    private_redis: RedisServer, fail: FailPolicy
) -> None:
    """Redis stalls, a decision times out (the breaker opens), the holder finishes meanwhile:
    its release, refused by the breaker, is done once Redis answers, not 30 s later."""
    # One timeout opens the breaker (under a surge, many calls time out at once).
    backend = RedisBackend(private_redis.url, timeout=0.2, breaker_failures=1, breaker_reset=0.25)
    pool = Pool(backend, fail)
    pid = private_redis.pid
    assert pid is not None
    try:
        await pool.ready()
        holder = await pool.holding()
        os.kill(pid, signal.SIGSTOP)
        try:
            await pool.call()  # its decide times out: the breaker opens
            assert backend.breaker.state != "closed"
            pool.gate.set()
            status, _ = await holder  # its release is refused or times out
            assert status == 200
            await asyncio.sleep(0.3)  # Redis stays stopped past the breaker's reset
        finally:
            os.kill(pid, signal.SIGCONT)
        await pool.assert_admitted_soon()
    finally:
        os.kill(pid, signal.SIGCONT)
        pool.gate.set()
        await pool.app.aclose()
