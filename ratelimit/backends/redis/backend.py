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
import math
import struct
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    MaxConnectionsError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..._errors import BackendError, BackendUnavailable, ConfigError
from ..base import (
    BucketCheck,
    Check,
    CheckResult,
    Entry,
    LeaseCheck,
    QueueCheck,
    StoreKey,
    Verdict,
    WindowCheck,
)
from ..breaker import BreakerState, CircuitBreaker
from .ghosts import Ghosts, Undo
from .keyspace import Keyspace
from .pubsub import Subscriber, parse_message
from .scripts import SCRIPTS, Script, ScriptSet
from .transport import (
    ClientTransport,
    ClusterTransport,
    PipelinedTransport,
    Transport,
    pack_script_call,
)

if TYPE_CHECKING:
    from .admin import RedisAdmin
    from .overrides import RedisOverrideStore
    from .top import RedisTopStore

logger = logging.getLogger("ratelimit")

#: Error replies to a posted call that the awaited path knows how to recover from.
_RETRIED_REPLIES = ("NOSCRIPT", "MOVED", "ASK")


def _release_lost(lease: LeaseCheck, error: BaseException) -> None:
    # The lease expires by itself within its ttl; the response went out long ago.
    logger.warning(
        "could not release lease %s (%s); it expires in %ss", lease.key, error, lease.ttl
    )


T = TypeVar("T")

#: Default seconds from writing a call to its reply. Measured on a 2-core host with
#: Redis and 10 worker processes x 32 concurrent decisions (5x oversubscribed), the
#: slowest healthy reply took 24 ms (p99.9 24 ms; 4 processes: 5 ms): a timeout near
#: that would turn load into failures (fail-open admissions) exactly when limits
#: matter. The clock starts when the bytes are written and replies are read before
#: the deadline is checked, so this process's own stalls never count; but a Redis
#: starved of CPU by other work on a small host answered later than 0.1 s now and
#: then (benchmarks beside test suites on 2 cores), each such reply a failed-open
#: decision. A dead Redis does not wait for it: a refused connection fails at once
#: and the breaker stops calling; only a hung one costs this, once per call the
#: breaker lets through.
DEFAULT_TIMEOUT = 0.5
#: Default seconds to open a connection (loopback or LAN: well under 1 ms). At the
#: deadline the kernel is asked whether the socket connected, so a busy loop does not
#: fail a connection that succeeded.
DEFAULT_CONNECT_TIMEOUT = 0.1
#: The least connect timeout given to redis-py's own connections (TLS, cluster
#: discovery). redis-py waits for a connection with `asyncio.wait_for`, so
#: a burst of first calls on a busy loop could fail connections that succeeded at
#: 0.1 s (seen: 20 concurrent first window hits on a cluster). Only these paths pay it,
#: and the breaker stops a dead Redis from costing it more than a few times.
CLIENT_CONNECT_TIMEOUT_FLOOR = 1.0

#: Errors of a call that did not reach Redis, or got no answer in time: these count
#: against the breaker. Other errors are replies (Redis is alive) or client-side.
_UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,  # asyncio.TimeoutError, on 3.11+ the builtin
    asyncio.TimeoutError,
    OSError,
    ClusterDownError,  # the cluster cannot serve the slot (a master is down)
)
#: Connections per node and process of the redis-py cluster client, which carries
#: script calls over TLS: it fails a call (it does not wait)
#: when every connection to the node is busy. Other script calls are pipelined.
CLUSTER_MAX_CONNECTIONS = 1000

#: Every error a call may raise; each becomes a BackendError.
_CALL_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

#: Seconds between a waiter's polls of its line (wait.lua): the safety net under the
#: pub/sub wake-ups (a lost message, slots freed by a lease's expiry), and the
#: heartbeat that keeps its ticket alive.
WAIT_POLL = 0.5
#: Seconds a ticket lives without a heartbeat: the waiters of a worker that died
#: leave the line within this. A heartbeat never extends a ticket past the waiter's
#: deadline plus TICKET_MARGIN.
TICKET_TTL = 5.0
TICKET_MARGIN = 1.0


class _Ticket:
    """A waiter of this process: its member in line, and the future a message settles."""

    __slots__ = ("future", "member")

    def __init__(self, future: asyncio.Future[str]) -> None:
        self.future = future
        #: The ticket's text in line (from enqueue.lua); "" until it is queued.
        self.member = ""


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
        self.timeout = _seconds("timeout", timeout)
        self.connect_timeout = _seconds("connect_timeout", connect_timeout)
        if not isinstance(cluster, bool):
            raise ConfigError("cluster", "true or false", cluster)
        #: Whether the store is a Redis Cluster (one script call per hash slot).
        self.cluster = cluster or isinstance(client, RedisCluster)
        self.split_by_slot = bool(split_by_slot) or self.cluster
        self._owns_client = client is None
        cluster_options: dict[str, Any] = {}
        if client is None and self.cluster:
            cluster_options = self._cluster_options(url)
            client = _RoutedCluster(**cluster_options)
        elif client is None:
            try:
                client = Redis.from_url(
                    url,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self._client_connect_timeout(),
                    retry=Retry(NoBackoff(), 0),
                )
            except ValueError as exc:
                raise ConfigError(
                    "url", f"a redis://, rediss:// or unix:// URL ({exc})", url
                ) from None
        #: The redis-py client: script calls that cannot be pipelined, admin reads.
        self.client: Redis | RedisCluster = client
        self._transport: Transport
        if self._owns_client and self.cluster and not cluster_options["ssl"]:
            assert isinstance(client, RedisCluster)
            self._transport = ClusterTransport(
                client,
                timeout=self.timeout,
                connect_timeout=self.connect_timeout,
                username=cluster_options.get("username"),
                password=cluster_options.get("password"),
                scripts=self.scripts.all(),
            )
        elif self._owns_client and not self.cluster and PipelinedTransport.supports(url):
            self._transport = PipelinedTransport(
                url,
                timeout=self.timeout,
                connect_timeout=self.connect_timeout,
                scripts=self.scripts.all(),
            )
        else:
            self._transport = ClientTransport(client)
        #: One bucket's decide call per caller, packed (see `_bucket_call`).
        self._bucket_calls: dict[BucketCheck, tuple[list[str], list[str], bytes]] = {}
        #: Other decide calls and releases, packed but for their lease ids (`_CallTemplate`).
        self._decide_templates: dict[tuple[Any, ...], _CallTemplate] = {}
        self._release_templates: dict[StoreKey, _CallTemplate] = {}
        #: Gates every call: open after repeated failures to reach Redis (see the module doc).
        self.breaker = _make_breaker(breaker, breaker_failures, breaker_reset)
        #: Called after every call to Redis with (operation, seconds, error or None):
        #: how metrics time calls and count errors per operation.
        self.observer: Callable[[str, float, BaseException | None], None] | None = None
        self._on_breaker_change = self.breaker.on_change
        self.breaker.on_change = self._breaker_changed
        #: The last error counted against the breaker (a batch failing together counts once).
        self._last_failure: BaseException | None = None
        #: Where the queue scripts publish hand-offs and sheds (one channel per prefix).
        self.channel = self.keys.queue_channel
        #: This process's waiters by ticket id.
        self._tickets: dict[str, _Ticket] = {}
        self._subscriber = Subscriber(
            self.channel,
            self._subscribe_url,
            self._on_queue_message,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            retry_after=WAIT_POLL,
        )
        #: Leaves of cancelled waiters and retried releases, finishing in the background.
        self._background: set[asyncio.Task[Any]] = set()
        #: True while `aclose` runs: a posted release that fails is not retried then.
        self._closing = False
        #: Leases proposed by calls whose outcome is unknown, being undone (see `ghosts`).
        self.ghosts = Ghosts(
            lambda: self.scripts.forget,
            self._eval,
            lambda script, keys, args, done: self._transport.post(script, keys, args, done),
        )

    def __repr__(self) -> str:
        cluster = ", cluster=True" if self.cluster else ""
        return f"RedisBackend({self.url!r}, prefix={self.prefix!r}{cluster})"

    # -- the Backend protocol ---------------------------------------------------

    async def decide(self, checks: Sequence[Check]) -> Verdict:
        """All-or-nothing over `checks`: one script call per hash slot (one call on one server)."""
        if not checks:
            return Verdict(True, ())
        if len(checks) == 1 and checks[0].__class__ is BucketCheck:
            # The commonest rule: the same call for a caller every time, packed once.
            call = self._bucket_calls.get(checks[0]) or self._bucket_call(checks[0])
            # Straight onto the connection when it is live and the breaker closed: `_eval`
            # inlined, two coroutines fewer to suspend and resume on every decision.
            future = self._transport.send(call[2]) if self.breaker.state == "closed" else None
            if future is None:
                reply = await self._eval(self.scripts.decide, *call)
            else:
                script = self.scripts.decide
                observer = self.observer
                started = perf_counter() if observer is not None else 0.0
                try:
                    reply = await future
                except _CALL_ERRORS as exc:
                    if not (isinstance(exc, ResponseError) and str(exc).startswith("NOSCRIPT")):
                        raise self._failed(script, exc, started) from exc
                    reply = await self._eval(script, *call)  # reloads the lost script
                else:
                    self.breaker.success()
                    if observer is not None:
                        observer(script.name, perf_counter() - started, None)
            return _parse_one(reply)
        try:
            if self.split_by_slot and len(checks) > 1:
                groups = self._groups(checks)
                if len(groups) > 1:
                    return await self._decide_slots(checks, groups)
            keys, args, packed = self._decide_call(checks)
            reply = await self._eval(self.scripts.decide, keys, args, packed)
        except BaseException as exc:
            self._haunted(checks, exc)
            raise
        verdict, results = _parse_decide(reply, checks)
        return Verdict(verdict, tuple(results))

    async def refund(self, checks: Sequence[Check]) -> None:
        """Give back what an admitted `decide` of `checks` took, one call per slot
        (a released slot goes to its line's head, if anyone waits)."""
        for group in self._groups(checks):
            keys, args = self._refund_args([checks[i] for i in group])
            if keys:
                await self._eval(self.scripts.refund, keys, args)

    async def renew(self, leases: Sequence[LeaseCheck]) -> list[bool]:
        """Extend each live lease to now + its ttl, one call per slot; False for a lost lease."""
        alive = [False] * len(leases)
        for group in self._groups(leases):
            keys = [self.keys.leases(leases[i].key) for i in group]
            args: list[str] = []
            for i in group:
                args += (repr(leases[i].ttl), leases[i].lease_id)
            reply = await self._eval(self.scripts.renew, keys, args)
            for i, ok in zip(group, reply, strict=True):
                alive[i] = ok == 1
        return alive

    async def release(self, lease: LeaseCheck) -> bool:
        """Free a lease's slot; False if it was not held (released before, or expired)."""
        try:
            reply = await self._eval(self.scripts.release, *self._release_call(lease))
        except BaseException as exc:
            if isinstance(exc, BackendUnavailable) and not self._closing:
                # Not sent (the breaker is open), and the slot is held: freed once Redis
                # answers, not when its lease expires.
                self.ghosts.add(self._undos((lease,)))
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
        keys, args, packed = self._release_call(lease)
        done = partial(self._posted_release, lease, perf_counter())
        return self._transport.post(self.scripts.release, keys, args, done, packed)

    def _posted_release(
        self, lease: LeaseCheck, started: float, reply: Any, error: BaseException | None
    ) -> None:
        """The answer to a posted release (see `post_release`)."""
        observer = self.observer
        if error is None:
            self.breaker.success()
            if observer is not None:
                observer(self.scripts.release.name, perf_counter() - started, None)
            return
        retry = isinstance(error, ResponseError) and str(error).startswith(_RETRIED_REPLIES)
        if retry and not self._closing:
            # The server lost its scripts, or the slot moved: the awaited call recovers.
            self._in_background(self._release_quietly(lease))
            return
        self._failed(self.scripts.release, error, started)
        if not self._closing and _unreachable(error):
            self.ghosts.add(self._undos((lease,)))  # retried until Redis answers
            return
        _release_lost(lease, error)

    async def _release_quietly(self, lease: LeaseCheck) -> None:
        try:
            await self.release(lease)
        except BackendError as exc:
            _release_lost(lease, exc)

    async def in_use(self, key: StoreKey) -> int:
        """Live leases under `key`, counted on the server's clock."""
        return int(await self._eval(self.scripts.in_use, [self.keys.leases(key)], []))

    # -- the QueueBackend protocol ------------------------------------------------

    async def enqueue(self, checks: Sequence[Check], queue: QueueCheck) -> Entry:
        """Decide `checks`; if only `queue.lease` lacks a slot, consume the rest and get
        in line (see `QueueBackend.enqueue`): one enqueue.lua call on one server.

        Split by slot (a cluster), the checks on other slots than the lease's are
        decided first, consuming; then the lease's slot runs enqueue.lua; if that
        does not admit or queue, the other slots are refunded. Between the two,
        other requests may see those units taken, as with `decide` across slots.
        """
        lease = queue.lease
        index = next((i for i, check in enumerate(checks) if check is lease), -1)
        if index < 0:
            index = list(checks).index(lease)
        ticket = _Ticket(asyncio.get_running_loop().create_future())
        # Registered before the call: a hand-off may be published before its reply is read.
        self._tickets[lease.lease_id] = ticket
        self._subscriber.ensure()
        try:
            groups = self._groups(checks)
            if len(groups) == 1:
                entry, ticket.member = await self._enqueue_slot(checks, index, queue)
            else:
                entry, ticket.member = await self._enqueue_split(checks, groups, index, queue)
        except BaseException as exc:
            self._tickets.pop(lease.lease_id, None)
            self._haunted(checks, exc)
            raise
        if entry.outcome != "queued":
            self._tickets.pop(lease.lease_id, None)
        return entry

    async def wait(self, queue: QueueCheck, timeout: float) -> str:
        """Wait up to `timeout` s for the hand-off of a slot (see `QueueBackend.wait`).

        A published message wakes the waiter at once; every `WAIT_POLL` s it also
        looks itself (wait.lua), which serves the line and keeps its ticket alive.
        On timeout it leaves the line (if a slot came meanwhile, it keeps it); if
        cancelled or failing, it leaves in a background task that releases any
        slot granted meanwhile.
        """
        lease = queue.lease
        ticket = self._tickets.get(lease.lease_id)
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
                self._subscriber.ensure()
                await asyncio.wait((future,), timeout=min(left, WAIT_POLL))
                left = deadline - loop.time()
                if future.done() or left <= 0:
                    break
                state = await self._wait_call(lease, ticket.member, left)
                if state != 0:
                    return "granted" if state == 1 else "shed"
            if future.done():
                return future.result()
            left_as = await self._leave_call(lease, ticket.member, release=False)
            return "granted" if left_as == 1 else "timeout"
        except BaseException:
            self._leave_later(lease, ticket.member)
            raise
        finally:
            self._tickets.pop(lease.lease_id, None)

    async def appoint(self, queue: QueueCheck) -> float:
        """An appointment for a request that left the line without a slot (see the
        protocol): one appoint.lua call on the line's slot; 0.0 without spacing or a
        fair key, or when the book is full."""
        if not (queue.spacing > 0 and queue.fair):
            return 0.0
        key = queue.lease.key
        reply = await self._eval(
            self.scripts.appoint,
            [self.keys.queue(key)[1], *self.keys.book(key)],
            [str(queue.rank), queue.fair, repr(float(queue.spacing))],
        )
        return float(reply)

    async def queue_length(self, key: StoreKey) -> int:
        """Requests waiting in `key`'s line (live tickets), on the server's clock."""
        return int(await self._eval(self.scripts.queue_length, [self.keys.queue(key)[1]], []))

    async def aclose(self) -> None:
        """Close the connections this backend opened (a passed-in client stays open).

        Cancelled waiters' leaves still under way finish first; waiters still
        waiting get "shed" (their tickets expire in Redis by themselves).
        """
        self._closing = True
        try:
            if self._background:
                await asyncio.gather(*self._background, return_exceptions=True)
            for ticket in self._tickets.values():
                if not ticket.future.done():
                    ticket.future.set_result("shed")
            await self.ghosts.aclose()
            await self._subscriber.aclose()
            await self._transport.aclose()  # answers to posted releases come in meanwhile
        finally:
            self._closing = False
        if self._owns_client:
            await self.client.aclose()

    # -- internals --------------------------------------------------------------

    def _client_connect_timeout(self) -> float:
        """The connect timeout of redis-py's own connections (see CLIENT_CONNECT_TIMEOUT_FLOOR)."""
        return max(self.connect_timeout, CLIENT_CONNECT_TIMEOUT_FLOOR)

    def _cluster_options(self, url: str) -> dict[str, Any]:
        """`RedisCluster` arguments for a cluster URL: its nodes, credentials and our timeouts."""
        expected = "redis://[user:password@]host:port[,host:port...] naming Redis Cluster nodes"
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError("url", expected, url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        nodes: list[ClusterNode] = []
        for item in hosts.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon:
                host, port = port, "6379"
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError("url", expected, url)
            nodes.append(ClusterNode(host, int(port)))
        if parts.path.strip("/") not in ("", "0"):
            raise ConfigError("url", "database 0 (a Redis Cluster has only database 0)", url)
        options: dict[str, Any] = {
            "startup_nodes": nodes,
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self._client_connect_timeout(),
            # No retries: a failure is reported at once, and the breaker decides.
            "retry": Retry(NoBackoff(), 0),
            "max_connections": CLUSTER_MAX_CONNECTIONS,
            "ssl": parts.scheme == "rediss",
        }
        if userinfo:
            user, colon, password = userinfo.partition(":")
            if colon:
                options["username"] = unquote(user) or None
                options["password"] = unquote(password)
            else:
                options["password"] = unquote(user)
        return options

    def _startup_nodes(self) -> list[ClusterNode]:
        client = self.client
        assert isinstance(client, RedisCluster)
        return client.get_nodes() or client.startup_nodes

    def _groups(self, checks: Sequence[Check]) -> list[list[int]]:
        """Indices of `checks` per script call: per hash slot when split, else all in one."""
        if not self.split_by_slot:
            return [list(range(len(checks)))]
        by_slot: dict[int, list[int]] = {}
        slot = self.keys.slot
        for i, check in enumerate(checks):
            by_slot.setdefault(slot(check.key), []).append(i)
        return list(by_slot.values())

    def _bucket_call(self, check: BucketCheck) -> tuple[list[str], list[str], bytes]:
        """decide.lua's KEYS, ARGV and packed EVALSHA for one bucket, kept for the next time.

        Kept per check (the engine reuses one per caller); cleared whole when full.
        """
        if len(self._bucket_calls) >= _BUCKET_CALLS:
            self._bucket_calls.clear()
        keys, args = self._decide_args((check,), "1")
        packed = pack_script_call("EVALSHA", self.scripts.decide.sha, keys, args)
        call = self._bucket_calls[check] = (keys, args, packed)
        return call

    def _decide_call(self, checks: Sequence[Check]) -> tuple[list[str], list[str], bytes]:
        """decide.lua's KEYS, ARGV and packed EVALSHA for `checks`, from a template kept
        per rule and caller: between a caller's requests only the lease ids change."""
        shape: list[Any] = []
        ids: list[str] = []
        for c in checks:
            if c.__class__ is LeaseCheck:
                shape.append(c[:3])  # key, limit, ttl
                ids.append(c[3])
            elif c.__class__ is WindowCheck:
                shape.append(c[:5])  # all but the receipt, this request's own
            else:
                shape.append(c)
        template = self._decide_templates.get(tuple(shape))
        if template is None:
            if len(self._decide_templates) >= _BUCKET_CALLS:
                self._decide_templates.clear()
            keys, args = self._decide_args(checks, "1")
            # Lease check i's id is ARGV[4i + 4] (0-based): after the commit flag, four each.
            holes = tuple(4 * i + 4 for i, c in enumerate(checks) if c.__class__ is LeaseCheck)
            template = _CallTemplate(self.scripts.decide, keys, args, holes)
            self._decide_templates[tuple(shape)] = template
        return template.fill(ids)

    def _release_call(self, lease: LeaseCheck) -> tuple[list[str], list[str], bytes]:
        """release.lua's KEYS, ARGV and packed EVALSHA for `lease` (a template per key)."""
        template = self._release_templates.get(lease.key)
        if template is None:
            if len(self._release_templates) >= _BUCKET_CALLS:
                self._release_templates.clear()
            keys = [self.keys.leases(lease.key), *self.keys.queue(lease.key)]
            template = self._release_templates[lease.key] = _CallTemplate(
                self.scripts.release, keys, [lease.lease_id, self.channel], (0,)
            )
        return template.fill([lease.lease_id])

    def _decide_args(self, checks: Sequence[Check], commit: str) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of decide.lua for `checks`: each lease check brings its line."""
        if len(checks) == 1:  # the common rule: no lists to merge
            check = checks[0]
            if isinstance(check, BucketCheck):
                return [self.keys.bucket(check.key)], [
                    commit,
                    "t",
                    repr(check.interval),
                    str(check.burst),
                    str(check.cost),
                ]
        keys, lines, args = self._check_args(checks, 1)
        return keys + lines, [commit, *args]

    def _refund_args(self, checks: Sequence[Check]) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of refund.lua: each lease check brings its line's four keys; a
        window check that took nothing (no receipt) is left out. No KEYS: nothing to do."""
        keys, lines, args = self._check_args(checks, 4, refund=True)
        return keys + lines, [self.channel, *args]

    def _check_args(
        self, checks: Sequence[Check], queue_keys: int, *, refund: bool = False
    ) -> tuple[list[str], list[str], list[str]]:
        """The checks' state keys, the first `queue_keys` line keys of each lease check,
        and the checks' ARGV (checks.lua's layout; refund.lua's with `refund`: a window
        brings the time its units were taken instead of its limit)."""
        keys: list[str] = []
        lines: list[str] = []
        args: list[str] = []
        for check in checks:
            if isinstance(check, BucketCheck):
                keys.append(self.keys.bucket(check.key))
                args += ("t", repr(check.interval), str(check.burst), str(check.cost))
            elif isinstance(check, WindowCheck):
                if refund and not check.receipt:
                    continue
                keys.append(self.keys.window(check.key))
                first = repr(check.receipt[-1]) if refund else str(check.limit)
                args += (_WINDOW_KINDS[check.strategy], first, repr(check.period), str(check.cost))
            else:
                keys.append(self.keys.leases(check.key))
                lines += self.keys.queue(check.key)[:queue_keys]
                args += ("l", str(check.limit), repr(check.ttl), check.lease_id)
        return keys, lines, args

    async def _decide_slots(self, checks: Sequence[Check], groups: list[list[int]]) -> Verdict:
        """Decide slot by slot; if one refuses, refund the slots before it.

        Not atomic across slots: between a slot's admission and its refund,
        another request may see those units taken. Every result still describes
        the untouched state of its check, as the protocol requires: slots other
        than the refusing one are re-read in a dry run.
        """
        results: list[CheckResult | None] = [None] * len(checks)
        for g, group in enumerate(groups):
            keys, args = self._decide_args([checks[i] for i in group], "1")
            try:
                reply = await self._eval(self.scripts.decide, keys, args)
            except BackendError:
                await self._refund_quietly(checks, groups[:g])
                raise
            verdict, group_results = _parse_decide(reply, [checks[i] for i in group])
            for i, result in zip(group, group_results, strict=True):
                results[i] = result
            if verdict:
                continue
            for done in groups[:g]:
                keys, args = self._refund_args([checks[i] for i in done])
                if keys:
                    await self._eval(self.scripts.refund, keys, args)
            for other in groups[:g] + groups[g + 1 :]:
                keys, args = self._decide_args([checks[i] for i in other], "0")
                _, other_results = _parse_decide(await self._eval(self.scripts.decide, keys, args))
                for i, result in zip(other, other_results, strict=True):
                    results[i] = result
            return Verdict(False, tuple(r for r in results if r is not None))
        return Verdict(True, tuple(r for r in results if r is not None))

    async def _refund_quietly(self, checks: Sequence[Check], groups: list[list[int]]) -> None:
        """Best effort: undo slots already admitted when a later slot failed to answer.

        What cannot be refunded (its node down too) comes back by itself: leases
        expire within their ttl, bucket units refill.
        """
        for group in groups:
            keys, args = self._refund_args([checks[i] for i in group])
            if not keys:
                continue
            try:
                await self._eval(self.scripts.refund, keys, args)
            except BackendError as exc:  # debug: an outage must not log once per request
                logger.debug("ratelimit: could not refund a slot after a failure (%s)", exc)

    # -- queue internals --------------------------------------------------------

    async def _enqueue_slot(
        self, checks: Sequence[Check], index: int, queue: QueueCheck
    ) -> tuple[Entry, str]:
        """One enqueue.lua call for `checks` (one slot), queued lease `checks[index]`."""
        keys, lines, check_args = self._check_args(checks, 1)
        lease_key = queue.lease.key
        guaranteed = " ".join(f"{rank} {slots}" for rank, slots in queue.guaranteed)
        args = [
            str(index + 1),
            self.channel,
            str(queue.capacity),
            str(queue.rank),
            queue.fair,
            str(queue.max_position),
            guaranteed,
            repr(TICKET_TTL),
            repr(float(queue.spacing)),
            *check_args,
        ]
        reply = await self._eval(
            self.scripts.enqueue,
            [*keys, *lines, *self.keys.queue(lease_key)[1:], *self.keys.book(lease_key)],
            args,
        )
        outcome, position, length, member, retry_in = (_text(part) for part in reply[:5])
        verdict, results = _parse_decide(reply[5], checks)
        entry = Entry(
            outcome,
            Verdict(verdict, tuple(results)),
            int(position),
            int(length),
            float(retry_in),
        )
        return entry, member

    async def _enqueue_split(
        self, checks: Sequence[Check], groups: list[list[int]], index: int, queue: QueueCheck
    ) -> tuple[Entry, str]:
        """`enqueue` across hash slots: other slots first (consuming), the lease's last."""
        home = next(group for group in groups if index in group)
        others = [group for group in groups if group is not home]
        results: list[CheckResult | None] = [None] * len(checks)
        done: list[list[int]] = []
        for group in others:
            keys, args = self._decide_args([checks[i] for i in group], "1")
            try:
                reply = await self._eval(self.scripts.decide, keys, args)
            except BackendError:
                await self._refund_quietly(checks, done)
                raise
            verdict, group_results = _parse_decide(reply, [checks[i] for i in group])
            for i, result in zip(group, group_results, strict=True):
                results[i] = result
            if not verdict:
                await self._undo_slots(checks, done, results)
                keys, args = self._decide_args([checks[i] for i in home], "0")
                _, home_results = _parse_decide(await self._eval(self.scripts.decide, keys, args))
                for i, result in zip(home, home_results, strict=True):
                    results[i] = result
                for group_left in others[len(done) + 1 :]:
                    await self._dry_run(checks, group_left, results)
                length = await self.queue_length(queue.lease.key)
                return Entry("refused", _verdict(False, results), -1, length), ""
            done.append(group)
        try:
            entry, member = await self._enqueue_slot(
                [checks[i] for i in home], home.index(index), queue
            )
        except BackendError:
            await self._refund_quietly(checks, done)
            raise
        for i, result in zip(home, entry.verdict.results, strict=True):
            results[i] = result
        if entry.outcome not in ("admitted", "queued"):
            await self._undo_slots(checks, done, results)
        admitted = entry.outcome == "admitted"
        return entry._replace(verdict=_verdict(admitted, results)), member

    async def _undo_slots(
        self, checks: Sequence[Check], groups: list[list[int]], results: list[CheckResult | None]
    ) -> None:
        """Refund slots that consumed, then report their untouched state (a dry run)."""
        for group in groups:
            keys, args = self._refund_args([checks[i] for i in group])
            if keys:
                await self._eval(self.scripts.refund, keys, args)
            await self._dry_run(checks, group, results)

    async def _dry_run(
        self, checks: Sequence[Check], group: list[int], results: list[CheckResult | None]
    ) -> None:
        keys, args = self._decide_args([checks[i] for i in group], "0")
        _, group_results = _parse_decide(await self._eval(self.scripts.decide, keys, args))
        for i, result in zip(group, group_results, strict=True):
            results[i] = result

    async def _wait_call(self, lease: LeaseCheck, member: str, left: float) -> int:
        """wait.lua: 1 granted, 0 waiting (ticket kept alive), -1 gone."""
        ttl = min(TICKET_TTL, left + TICKET_MARGIN)
        reply = await self._eval(
            self.scripts.wait,
            [self.keys.leases(lease.key), *self.keys.queue(lease.key)],
            [member, repr(ttl), self.channel],
        )
        return int(reply[0])

    async def _leave_call(self, lease: LeaseCheck, member: str, *, release: bool) -> int:
        """leave.lua: 0 left the line, 1 granted (kept), 2 granted (released), -1 gone."""
        reply = await self._eval(
            self.scripts.leave,
            [self.keys.leases(lease.key), *self.keys.queue(lease.key)],
            [member, "1" if release else "0", self.channel],
        )
        return int(reply)

    def _leave_later(self, lease: LeaseCheck, member: str) -> None:
        """Leave the line in a task of its own: the cancelled waiter's task cannot finish it."""
        self._in_background(self._leave_quietly(lease, member))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in a task of its own, awaited by `aclose`."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _leave_quietly(self, lease: LeaseCheck, member: str) -> None:
        try:
            await self._leave_call(lease, member, release=True)
        except BackendError as exc:
            logger.debug("ratelimit: could not leave a line (%s)", exc)
            cause = exc.__cause__
            if isinstance(exc, BackendUnavailable) or (cause is not None and _unreachable(cause)):
                # Not sent, or not answered: the ticket, or the lease it was granted
                # meanwhile, is undone once Redis answers, not held for its ttl.
                self.ghosts.add(self._undos((lease,)))

    def _haunted(self, checks: Sequence[Check], exc: BaseException) -> None:
        """If the call that raised `exc` may have run unanswered (a timeout, a lost
        connection, a cancelled caller), have its lease ids undone (see `ghosts`)."""
        if isinstance(exc, BackendError):
            cause = exc.__cause__
            if isinstance(exc, BackendUnavailable) or cause is None or not _unreachable(cause):
                return  # never sent, or Redis answered: the outcome is known
        elif not isinstance(exc, asyncio.CancelledError):
            return
        undos = self._undos(checks)
        if undos:
            self.ghosts.add(undos)

    def _undos(self, checks: Sequence[Check]) -> list[Undo]:
        """forget.lua's KEYS and ARGV, and the ttl, for each lease among `checks`."""
        return [
            ([self.keys.leases(c.key), *self.keys.queue(c.key)], [c.lease_id, self.channel], c.ttl)
            for c in checks
            if isinstance(c, LeaseCheck)
        ]

    async def _subscribe_url(self) -> str | None:
        """Where to SUBSCRIBE: this server, any master of a cluster, or nowhere (TLS
        and passed-in clients: their waiters poll)."""
        transport = self._transport
        if isinstance(transport, ClusterTransport):
            return await transport.any_node_url()
        if isinstance(transport, PipelinedTransport):
            return self.url
        return None

    def _on_queue_message(self, data: bytes) -> None:
        """Wake this process's waiters named in a published hand-off or shed."""
        outcome, tickets = parse_message(data)
        waiting = self._tickets
        for ticket_id in tickets:
            ticket = waiting.get(ticket_id)
            if ticket is not None and not ticket.future.done():
                ticket.future.set_result(outcome)

    async def _eval(
        self, script: Script, keys: list[str], args: list[str], packed: bytes | None = None
    ) -> Any:
        """Run `script` (EVALSHA, reloaded if the server lost it) through the breaker.

        Errors become BackendError; with the breaker open, BackendUnavailable at once.
        With the breaker closed (nearly always) this is `_guard` inlined: every
        decision comes through here, and a closure and a coroutine less per call
        is measurable at tens of thousands of calls per second.
        """
        transport = self._transport
        breaker = self.breaker
        if breaker.state != "closed":
            return await self._guard(script.name, lambda: transport.evalsha(script, keys, args))
        observer = self.observer
        started = perf_counter() if observer is not None else 0.0
        try:
            reply = await transport.evalsha(script, keys, args, packed)
        except _CALL_ERRORS as exc:
            raise self._failed(script, exc, started) from exc
        breaker.success()
        if observer is not None:
            observer(script.name, perf_counter() - started, None)
        return reply

    def _failed(self, script: Script, exc: BaseException, started: float) -> BackendError:
        """What a failed call of `script` (made at `started`) becomes: counted for the
        breaker and the observer, returned as the BackendError to raise."""
        self._settle(exc)
        error = BackendError(f"redis {script.name}: {exc}")
        if self.observer is not None:
            self.observer(script.name, perf_counter() - started, error)
        return error

    async def _guard(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """Make the call `call()` through the breaker, timed and reported as `operation`."""
        breaker = self.breaker
        observer = self.observer
        if not breaker.allow():
            error = BackendUnavailable(
                f"redis {operation}: circuit breaker open after repeated failures to "
                f"reach {self.url} ({_describe(self._last_failure)}); not called"
            )
            if observer is not None:
                observer(operation, 0.0, error)
            raise error
        started = perf_counter()
        try:
            if breaker.state != "closed":  # this call is the half-open probe
                reply = await self._probe(operation, call)
            else:
                try:
                    reply = await call()
                except _CALL_ERRORS as exc:
                    self._settle(exc)
                    raise BackendError(f"redis {operation}: {exc}") from exc
                breaker.success()
        except BackendError as exc:
            if observer is not None:
                observer(operation, perf_counter() - started, exc)
            raise
        if observer is not None:
            observer(operation, perf_counter() - started, None)
        return reply

    async def _probe(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """The half-open probe: its outcome reaches the breaker even if the caller is cancelled.

        A probe abandoned without an outcome would leave the breaker half-open,
        refusing every call, for good.
        """
        future = asyncio.ensure_future(call())
        future.add_done_callback(self._probe_done)
        try:
            return await asyncio.shield(future)
        except _CALL_ERRORS as exc:
            raise BackendError(f"redis {operation}: {exc}") from exc

    def _probe_done(self, call: asyncio.Future[Any]) -> None:
        if call.cancelled():  # closed by aclose() mid-probe: no answer from Redis
            self.breaker.failure()
            return
        exc = call.exception()
        if exc is None:
            self.breaker.success()
        else:
            self._settle(exc, probe=True)

    def _settle(self, exc: BaseException, *, probe: bool = False) -> None:
        """Tell the breaker what a failed call says about Redis."""
        breaker = self.breaker
        if _unreachable(exc):
            # Calls that failed together (one broken connection, one failed
            # connect) share one exception object: count it once, so a single
            # hiccup under load is one failure, not one per call in flight.
            if exc is not self._last_failure or probe:
                self._last_failure = exc
                breaker.failure()
        elif isinstance(exc, ResponseError):
            breaker.success()  # an error reply: Redis is there and answering
        elif probe:
            breaker.failure()  # the probe learned nothing: try again after a pause

    def _breaker_changed(self, old: BreakerState, new: BreakerState) -> None:
        """Log each breaker state change once (not once per refused call)."""
        if new == "open" and old == "closed":
            logger.error(
                "ratelimit: redis at %s unreachable (%s): circuit breaker open, calls "
                "fail at once; probing every %.3gs",
                self.url,
                _describe(self._last_failure),
                self.breaker.reset_after,
            )
        elif new == "closed":
            self._last_failure = None
            logger.warning("ratelimit: redis at %s answers again: circuit breaker closed", self.url)
        else:  # probing, and a failed probe: once per pause while Redis stays down
            logger.debug("ratelimit: redis at %s circuit breaker %s -> %s", self.url, old, new)
        if self._on_breaker_change is not None:
            self._on_breaker_change(old, new)

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


class _RoutedCluster(RedisCluster):
    """A `RedisCluster` that finishes discovery before routing any command.

    redis-py (8.1) routes a command issued before discovery completes as if
    it had no key: to a random node. Concurrent first commands (the first
    requests of a surge, on `Window` limits) then meet MOVED replies, and
    every few MOVED the client closes all its connections, failing calls in
    flight. Waiting for discovery first routes every command by its slot.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.initialize()  # at once when already initialized
        return await super().execute_command(*args, **kwargs)


#: Packed one-bucket calls kept per backend (as many as the engine's key cache); the
#: same bound for call templates.
_BUCKET_CALLS = 4096


class _CallTemplate:
    """One script call packed once, with holes where lease ids go.

    Packing a call part by part costs a few microseconds a request; filling in
    the lease ids of a packed template costs a fraction of that. `holes` are the
    ARGV indices of the lease ids, in order.
    """

    __slots__ = ("args", "holes", "keys", "pieces", "script")

    def __init__(
        self,
        script: Script,
        keys: list[str],
        args: list[str],
        holes: tuple[int, ...],
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.holes = holes
        blank = list(args)
        for i in holes:
            blank[i] = _HOLE
        packed = pack_script_call("EVALSHA", script.sha, keys, blank)
        self.pieces = packed.split(_HOLE_PACKED)
        assert len(self.pieces) == len(holes) + 1

    def fill(self, ids: list[str]) -> tuple[list[str], list[str], bytes]:
        """KEYS, ARGV and the packed call with `ids` in the holes, in order."""
        if not ids:
            return self.keys, self.args, self.pieces[0]
        args = self.args.copy()
        pieces = self.pieces
        out = [pieces[0]]
        fits = True  # every id ASCII: its length in characters is its length in bytes
        for n, i in enumerate(self.holes, 1):
            lease_id = args[i] = ids[n - 1]
            fits = fits and lease_id.isascii()
            out.append(f"${len(lease_id)}\r\n{lease_id}\r\n".encode())
            out.append(pieces[n])
        if not fits:
            return self.keys, args, pack_script_call("EVALSHA", self.script.sha, self.keys, args)
        return self.keys, args, b"".join(out)


#: Where a lease id goes in a template: a byte no key, number or channel name holds.
_HOLE = "\x00"
_HOLE_PACKED = b"$1\r\n\x00\r\n"

#: checks.lua's results(): the verdict, then (admitted, remaining, retry_after,
#: reset_after) per check, as little-endian doubles.
_VERDICT = struct.Struct("<d")
_RESULT = struct.Struct("<dddd")
_ONE_RESULT = struct.Struct("<ddddd")
#: WindowCheck.strategy -> its kind in checks.lua's layout.
_WINDOW_KINDS = {"fixed": "f", "sliding": "s", "moving": "m"}
_new = tuple.__new__


def _parse_decide(reply: bytes, checks: Sequence[Check] = ()) -> tuple[bool, list[CheckResult]]:
    """The verdict and per-check results of a decide.lua reply (checks.lua's results()).

    A reply whose window checks took units ends with the time they were taken:
    it goes on the receipt of each window check among `checks` that took some.
    """
    end = len(reply)
    if (end - 8) % 32:
        end -= 8
        (stamp,) = _VERDICT.unpack_from(reply, end)
        for check in checks:
            if check.__class__ is WindowCheck and check.cost > 0:
                check.receipt.append(stamp)
    return _VERDICT.unpack_from(reply)[0] == 1, [
        CheckResult(admitted == 1, int(remaining), retry_after, reset_after)
        for admitted, remaining, retry_after, reset_after in _RESULT.iter_unpack(reply[8:end])
    ]


def _parse_one(reply: bytes) -> Verdict:
    """`_parse_decide` for one check, without the loop (the commonest rule, one bucket)."""
    verdict, admitted, remaining, retry_after, reset_after = _ONE_RESULT.unpack(reply)
    # Built with tuple.__new__: NamedTuple classes construct through a Python __new__.
    result = _new(CheckResult, (admitted == 1, int(remaining), retry_after, reset_after))
    return _new(Verdict, (verdict == 1, (result,)))


def _text(part: Any) -> str:
    """A reply element as text (replies come as bytes, or int for integers)."""
    return part.decode() if isinstance(part, bytes) else str(part)


def _verdict(admitted: bool, results: list[CheckResult | None]) -> Verdict:
    return Verdict(admitted, tuple(r for r in results if r is not None))


def _unreachable(exc: BaseException) -> bool:
    """Whether `exc` says Redis was not reached or did not answer in time.

    A cluster client reports nodes it could not reach (at discovery, or a slot
    left without a node) as RedisClusterException caused by a connection error.
    A full connection pool is this process's limit, not Redis's failure.
    """
    if isinstance(exc, MaxConnectionsError):
        return False
    if isinstance(exc, _UNREACHABLE):
        return True
    return isinstance(exc, SlotNotCoveredError) or (
        isinstance(exc, RedisClusterException) and isinstance(exc.__cause__, _UNREACHABLE)
    )


def _describe(exc: BaseException | None) -> str:
    """`Type: message` (redis-py's exception repr leaves the message out)."""
    return "no error" if exc is None else f"{type(exc).__name__}: {exc}"


def _make_breaker(
    breaker: CircuitBreaker | None, failures: int, reset_after: float
) -> CircuitBreaker:
    """The backend's breaker: the one passed in, or one from the two settings (validated)."""
    if breaker is not None:
        if not isinstance(breaker, CircuitBreaker):
            raise ConfigError("breaker", "a ratelimit CircuitBreaker", breaker)
        return breaker
    try:
        return CircuitBreaker(failures=failures, reset_after=reset_after)
    except ConfigError as exc:
        field = {"failures": "breaker_failures", "reset_after": "breaker_reset"}[exc.field]
        raise ConfigError(field, exc.expected, exc.got) from None


def _seconds(field: str, value: object) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(field, "a number of seconds > 0", value)
    return float(value)
