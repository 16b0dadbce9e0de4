"""The Redis backend: one Lua script call per decision and hash slot, on the server's clock.

Every state change is a script (see the `.lua` files beside this module), so
concurrent workers on many machines never read-modify-write from Python and
never disagree about time.

Every failure raises `BackendError`, whose `__cause__` tells what happened
(deciding what to do then is the policy's job):

- `redis.exceptions.ConnectionError`: refused, reset or closed (Redis is down or
  restarting); raised at once, no timeout is spent.
- `redis.exceptions.TimeoutError`: no reply `timeout` seconds after the call was
  written, or no connection within `connect_timeout` (Redis hung or unreachable).
- `redis.exceptions.ResponseError`: Redis answered with an error (OOM, BUSY, READONLY).

Every call goes through a `CircuitBreaker` (`backend.breaker`). Only failures
to reach Redis count against it (connection errors, timeouts); an error reply
proves Redis alive. Once open, calls raise `BackendUnavailable` at once,
without touching the network, so a dead Redis costs each request microseconds
instead of a connection attempt or a timeout. After `breaker_reset` seconds
one call probes; when Redis answers again (scripts reloaded on `NOSCRIPT`) the
breaker closes and decisions resume by themselves. Each state change is logged
once on the "ratelimit" logger, never once per request.

Redis Cluster: `RedisBackend("redis://node1:7000,node2:7001", cluster=True)`
(any reachable nodes; the rest are discovered by redis-py's `RedisCluster`,
which keeps the slot map). Each script call goes to the node serving its
keys' slot, pipelined on one connection per node like a single server's, and
follows MOVED/ASK redirects (see `transport`). TLS (`rediss://`) and a
passed-in `RedisCluster` send calls through redis-py itself, one connection
per call in flight. A rule is decided with one script call per hash slot:
the keys of one rule and one caller share a hash tag, so a per-caller check
set is one call, and shared (`*`) keys are another; if a later slot refuses,
earlier slots are refunded. Nothing in a script touches a key it was not
given, so no call can ever be cross-slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING, Any, ClassVar

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

from ..._errors import BackendError, BackendUnavailable, ConfigError
from ..base import BucketCheck, Check, Entry, LeaseCheck, QueueCheck, StoreKey, Verdict
from ..breaker import CircuitBreaker
from .calls import Calls, parse_decide, parse_one
from .cluster import ClusterTransport
from .connect import DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, connect, seconds
from .ghosts import Ghosts
from .guard import CALL_ERRORS, BackendObserver, Guard, make_breaker, unreachable
from .keyspace import Keyspace
from .sagas import Slots
from .scripts import SCRIPTS, ScriptSet
from .tickets import Tickets
from .transport import PipelinedTransport

if TYPE_CHECKING:
    from .admin import RedisAdmin
    from .overrides import RedisOverrideStore
    from .top import RedisTopStore

logger = logging.getLogger("ratelimit")

#: Error replies to a posted call that the awaited path knows how to recover from.
_RETRIED_REPLIES = ("NOSCRIPT", "MOVED", "ASK")


class RedisBackend:
    """Limiter state in Redis, shared by every worker that names the same URL and prefix.

    `url` is a redis-py URL (`redis://`, `unix://`, `rediss://`); with
    `cluster=True`, `redis://` or `rediss://` naming one or more nodes of a
    Redis Cluster (`redis://[user:password@]host:port[,host:port...]`,
    database 0). `prefix` starts
    every key. `timeout` bounds the wait for a
    reply once the request is written, `connect_timeout` the opening of a
    connection (with AUTH and SELECT), in seconds. Concurrent script calls share
    writes on one connection (see `transport`); TLS
    URLs and a passed-in `client` (a `redis.asyncio.Redis`, left open by
    `aclose`) go through redis-py instead, one call at a time. Nothing retries:
    a failure is reported once, at once. `split_by_slot` decides each hash slot
    of a rule in its own script call, as Redis Cluster requires (`cluster=True`
    implies it, as does passing a `RedisCluster` as `client`); on one server a
    rule is decided in one call, atomically.

    `breaker_failures` failures to reach Redis in a row (connection errors and
    timeouts; calls that fail together, like a batch on one broken connection,
    count once) open the circuit breaker for `breaker_reset` seconds; or pass a
    `breaker` of your own. Its state is `backend.breaker.state` ("closed",
    "open", "half_open"), which `Metrics` exports as `ratelimit_breaker_open`.
    """

    #: The scripts this backend runs: the production clock. Tests subclass with a manual one.
    scripts: ClassVar[ScriptSet] = SCRIPTS

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "ratelimit",
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        client: Redis | RedisCluster | None = None,
        split_by_slot: bool = False,
        cluster: bool = False,
        breaker_failures: int = 3,
        breaker_reset: float = 1.0,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError("url", 'a Redis URL like "redis://127.0.0.1:6379/0"', url)
        self.url = url
        self.keys = Keyspace(prefix)
        self.prefix = prefix
        self.timeout = seconds("timeout", timeout)
        self.connect_timeout = seconds("connect_timeout", connect_timeout)
        if not isinstance(cluster, bool):
            raise ConfigError("cluster", "true or false", cluster)
        #: Whether the store is a Redis Cluster (one script call per hash slot).
        self.cluster = cluster or isinstance(client, RedisCluster)
        self.split_by_slot = bool(split_by_slot) or self.cluster
        made = connect(
            url,
            client=client,
            cluster=self.cluster,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            scripts=self.scripts,
        )
        #: The redis-py client: script calls that cannot be pipelined, admin reads.
        self.client: Redis | RedisCluster = made.client
        self._owns_client = made.owns_client
        #: Gates every call: open after repeated failures to reach Redis (see `guard`).
        self.breaker = make_breaker(breaker, breaker_failures, breaker_reset)
        #: The one way calls reach Redis: the breaker, the observers, errors wrapped.
        self.guard = Guard(made.transport, self.breaker, url)
        #: Every script call's KEYS and ARGV, packed calls kept (see `calls`).
        self.calls = Calls(self.keys, self.scripts)
        #: Where the queue scripts publish hand-offs and sheds (one channel per prefix).
        self.channel = self.calls.channel
        self.slots = Slots(self.guard, self.calls, split=self.split_by_slot)
        #: Leases proposed by calls whose outcome is unknown, being undone (see `ghosts`).
        self.ghosts = Ghosts(
            lambda: self.scripts.forget,
            lambda script, keys, args: self.guard.call(script, keys, args),
            lambda script, keys, args, done: self.guard.transport.post(script, keys, args, done),
        )
        #: This process's waiters in line (see `tickets`).
        self.tickets = Tickets(
            self.guard,
            self.calls,
            self.slots,
            self.ghosts,
            subscribe_url=self._subscribe_url,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
        )
        #: True while `aclose` runs: a posted release that fails is not retried then.
        self._closing = False

    def __repr__(self) -> str:
        cluster = ", cluster=True" if self.cluster else ""
        return f"RedisBackend({self.url!r}, prefix={self.prefix!r}{cluster})"

    def add_observer(self, observer: BackendObserver) -> None:
        """Tell `observer` of every call to Redis: its operation (the script's name), its
        seconds and its error, if any. How `Metrics` times calls and counts errors."""
        self.guard.add_observer(observer)

    # -- the Backend protocol ---------------------------------------------------

    async def decide(self, checks: Sequence[Check]) -> Verdict:
        """All-or-nothing over `checks`: one script call per hash slot (one call on one server)."""
        if not checks:
            return Verdict(True, ())
        if len(checks) == 1 and checks[0].__class__ is BucketCheck:
            # The commonest rule: the same call for a caller every time, packed once.
            keys, args, packed = self.calls.buckets.get(checks[0]) or self.calls.bucket(checks[0])
            # `guard.call` in pieces, awaited here: a coroutine less on every decision.
            guard = self.guard
            script = self.scripts.decide
            future = guard.send(packed)
            if future is None:
                return parse_one(await guard.call(script, keys, args, packed))
            started = perf_counter() if guard.observe is not None else 0.0
            try:
                reply = await future
            except CALL_ERRORS as exc:
                reply = await guard.recover(script, keys, args, exc, started)
            else:
                guard.succeeded(script.name, started)
            return parse_one(reply)
        try:
            if self.split_by_slot and len(checks) > 1:
                groups = self.slots.groups(checks)
                if len(groups) > 1:
                    return await self.slots.decide(checks, groups)
            reply = await self.guard.call(self.scripts.decide, *self.calls.decide(checks))
        except BaseException as exc:
            self._haunted(checks, exc)
            raise
        verdict, results = parse_decide(reply, checks)
        return Verdict(verdict, tuple(results))

    async def refund(self, checks: Sequence[Check]) -> None:
        """Give back what an admitted `decide` of `checks` took, one call per slot
        (a released slot goes to its line's head, if anyone waits)."""
        await self.slots.refund(checks, self.slots.groups(checks))

    async def renew(self, leases: Sequence[LeaseCheck]) -> list[bool]:
        """Extend each live lease to now + its ttl, one call per slot; False for a lost lease."""
        alive = [False] * len(leases)
        for group in self.slots.groups(leases):
            keys, args = self.calls.renew_args([leases[i] for i in group])
            reply = await self.guard.call(self.scripts.renew, keys, args)
            for i, ok in zip(group, reply, strict=True):
                alive[i] = ok == 1
        return alive

    async def release(self, lease: LeaseCheck) -> bool:
        """Free a lease's slot; False if it was not held (released before, or expired)."""
        try:
            reply = await self.guard.call(self.scripts.release, *self.calls.release(lease))
        except BaseException as exc:
            if isinstance(exc, BackendUnavailable) and not self._closing:
                # Not sent (the breaker is open), and the slot is held: freed once Redis
                # answers, not when its lease expires.
                self.ghosts.add(self.calls.undos((lease,)))
            else:
                self._haunted((lease,), exc)  # not known to have run: undone until it is
            raise
        return bool(reply == 1)

    def post_release(self, lease: LeaseCheck) -> bool:
        """`release`, sent now and not awaited (see `PostingBackend`); False when it
        must be awaited instead (no live connection, or the breaker is not closed).

        The answer is handled as it is read: an error counts for the breaker and
        is logged (the lease expires within its ttl); NOSCRIPT, MOVED and ASK
        replies retry through `release`, which reloads scripts and follows slots.
        """
        if self.breaker.state != "closed":
            return False
        keys, args, packed = self.calls.release(lease)
        done = partial(self._posted_release, lease, perf_counter())
        return self.guard.transport.post(self.scripts.release, keys, args, done, packed)

    def _posted_release(
        self, lease: LeaseCheck, started: float, reply: Any, error: BaseException | None
    ) -> None:
        """The answer to a posted release (see `post_release`)."""
        retry = isinstance(error, ResponseError) and str(error).startswith(_RETRIED_REPLIES)
        if retry and not self._closing:
            # The server lost its scripts, or the slot moved: the awaited call recovers.
            self.tickets.in_background(self._release_quietly(lease))
            return
        if error is None:
            self.guard.succeeded(self.scripts.release.name, started)
            return
        self.guard.failed(self.scripts.release.name, error, started)
        if not self._closing and unreachable(error):
            self.ghosts.add(self.calls.undos((lease,)))  # retried until Redis answers
            return
        _release_lost(lease, error)

    async def _release_quietly(self, lease: LeaseCheck) -> None:
        try:
            await self.release(lease)
        except BackendError as exc:
            _release_lost(lease, exc)

    async def in_use(self, key: StoreKey) -> int:
        """Live leases under `key`, counted on the server's clock."""
        return int(await self.guard.call(self.scripts.in_use, [self.keys.leases(key)], []))

    # -- the QueueBackend protocol ------------------------------------------------

    async def enqueue(self, checks: Sequence[Check], queue: QueueCheck) -> Entry:
        """Decide `checks`; if only `queue.lease` lacks a slot, consume the rest and get
        in line (see `QueueBackend.enqueue`): one enqueue.lua call on one server.

        Split by slot (a cluster), the checks on other slots than the lease's are
        decided first, consuming; then the lease's slot runs enqueue.lua; if that
        does not admit or queue, the other slots are refunded (see `sagas`).
        """
        try:
            return await self.tickets.enqueue(checks, queue)
        except BaseException as exc:
            self._haunted(checks, exc)
            raise

    async def wait(self, queue: QueueCheck, timeout: float) -> str:
        """Wait up to `timeout` s for the hand-off of a slot (see `QueueBackend.wait`
        and `tickets`)."""
        return await self.tickets.wait(queue, timeout)

    async def appoint(self, queue: QueueCheck) -> float:
        """An appointment for a request that left the line without a slot (see the
        protocol): one appoint.lua call on the line's slot; 0.0 without spacing or a
        fair key, or when the book is full."""
        if not (queue.spacing > 0 and queue.fair):
            return 0.0
        keys, args = self.calls.appoint_args(queue)
        return float(await self.guard.call(self.scripts.appoint, keys, args))

    async def queue_length(self, key: StoreKey) -> int:
        """Requests waiting in `key`'s line (live tickets), on the server's clock."""
        line = [self.keys.queue(key)[1]]
        return int(await self.guard.call(self.scripts.queue_length, line, []))

    async def aclose(self) -> None:
        """Close the connections this backend opened (a passed-in client stays open).

        Cancelled waiters' leaves still under way finish first; waiters still
        waiting get "shed" (their tickets expire in Redis by themselves).
        """
        self._closing = True
        try:
            await self.tickets.aclose()
            await self.ghosts.aclose()
            await self.tickets.subscriber.aclose()
            await self.guard.transport.aclose()  # answers to posted releases come in meanwhile
        finally:
            self._closing = False
        if self._owns_client:
            await self.client.aclose()

    # -- internals --------------------------------------------------------------

    def _haunted(self, checks: Sequence[Check], exc: BaseException) -> None:
        """If the call that raised `exc` may have run unanswered (a timeout, a lost
        connection, a cancelled caller), have its lease ids undone (see `ghosts`)."""
        if isinstance(exc, BackendError):
            cause = exc.__cause__
            if isinstance(exc, BackendUnavailable) or cause is None or not unreachable(cause):
                return  # never sent, or Redis answered: the outcome is known
        elif not isinstance(exc, asyncio.CancelledError):
            return
        undos = self.calls.undos(checks)
        if undos:
            self.ghosts.add(undos)

    async def _subscribe_url(self) -> str | None:
        """Where to SUBSCRIBE: this server, any master of a cluster, or nowhere (TLS
        and passed-in clients: their waiters poll)."""
        transport = self.guard.transport
        if isinstance(transport, ClusterTransport):
            return await transport.any_node_url()
        if isinstance(transport, PipelinedTransport):
            return self.url
        return None

    # -- the stores beside limiter state (see `backends.stores`) ------------------

    def override_store(self) -> RedisOverrideStore:
        """The fleet's live overrides under this backend's prefix (a new watcher each call)."""
        from .overrides import RedisOverrideStore

        return RedisOverrideStore(self.client, self.keys)

    def top_store(self) -> RedisTopStore:
        """The fleet's top-callers windows under this backend's prefix."""
        from .top import RedisTopStore

        return RedisTopStore(self.client, self.keys)

    def admin(self) -> RedisAdmin:
        """Reads and resets over every caller, for the `ratelimit` command."""
        from .admin import RedisAdmin

        return RedisAdmin(self)


def _release_lost(lease: LeaseCheck, error: BaseException) -> None:
    # The lease expires by itself within its ttl; the response went out long ago.
    logger.warning(
        "could not release lease %s (%s); it expires in %ss", lease.key, error, lease.ttl
    )
