"""What only Redis Cluster does: slots on different nodes, redirects, per-node scripts.

These run on a real 3-master cluster (the `redis_cluster` fixture) with the
production scripts on each node's TIME. The contract suite runs on the
cluster too ("redis-cluster"), and so do the multi-process tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis
from _servers import RedisClusterServers, RedisServer

from ratelimit import (
    BackendError,
    BackendUnavailable,
    Concurrency,
    ConfigError,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    Window,
    keys,
)
from ratelimit._types import Receive, Scope, Send
from ratelimit.backends.base import BucketCheck, Check, LeaseCheck, StoreKey
from ratelimit.backends.redis import RedisBackend

pytestmark = pytest.mark.redis

GLOBAL = StoreKey("api", "fleet", "*")
GLOBAL_SLOTS = StoreKey("api", "gpu", "*")


@pytest.fixture
async def backend(redis_cluster_url: str) -> AsyncIterator[RedisBackend]:
    b = RedisBackend(redis_cluster_url, cluster=True)
    try:
        yield b
    finally:
        await b.aclose()


@contextlib.contextmanager
def admin(node: RedisServer) -> Iterator[redis.Redis]:
    """A plain client on one node (no cluster routing), for inspection and slot moves."""
    with redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=2.0) as client:
        yield client


def evalsha_calls(node: RedisServer) -> int:
    with admin(node) as client:
        stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def caller_on_another_node(
    cluster: RedisClusterServers, backend: RedisBackend, than: StoreKey
) -> StoreKey:
    """A per-caller key whose slot is served by another node than `than`'s."""
    other = cluster.node_of(backend.keys.bucket(than))
    for i in range(100):
        key = StoreKey("api", "per-key", f"{i:032x}")
        if cluster.node_of(backend.keys.bucket(key)) is not other:
            return key
    raise AssertionError("every caller landed on one node")


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "cluster", "field"),
    [
        ("unix:///tmp/redis.sock", True, "url"),
        ("redis://127.0.0.1:7000/2", True, "url"),
        ("redis://127.0.0.1:port", True, "url"),
        ("redis://127.0.0.1:7000", "yes", "cluster"),
    ],
)
def test_bad_cluster_configuration_names_the_field(url: str, cluster: object, field: str) -> None:
    """A unix socket, a database other than 0, a bad port or a non-bool fail at construction."""
    with pytest.raises(ConfigError, match=f"^{field}: expected"):
        RedisBackend(url, cluster=cluster)  # type: ignore[arg-type]


def test_cluster_urls_name_seed_nodes_and_credentials() -> None:
    """One or more host:port seeds, user and password from the URL; split_by_slot implied."""
    backend = RedisBackend("redis://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001/0", cluster=True)
    assert backend.cluster
    assert backend.split_by_slot
    assert [
        (n.host, n.port) for n in (backend.client.get_nodes() or backend.client.startup_nodes)
    ] == [
        ("10.0.0.1", 7000),
        ("10.0.0.2", 7001),
    ]
    kwargs = backend.client.get_connection_kwargs()
    assert (kwargs["username"], kwargs["password"]) == ("app", "s@cret")
    assert "cluster=True" in repr(backend)


def test_a_config_file_selects_the_cluster_and_breaker_settings() -> None:
    """`[backend]` options reach RedisBackend: cluster = true, breaker settings, checked."""
    spec = {"type": "redis", "url": "redis://10.0.0.1:7000", "cluster": True}
    rules = [{"path": "/x", "limits": [{"type": "token_bucket", "rate": "1/second"}]}]
    app = RateLimitMiddleware.from_config(
        {"backend": {**spec, "breaker_failures": 5, "breaker_reset": 2.5}, "rules": rules}
    )(hello)
    assert isinstance(app.backend, RedisBackend)
    assert app.backend.cluster
    assert (app.backend.breaker.failures, app.backend.breaker.reset_after) == (5, 2.5)
    with pytest.raises(ConfigError, match=r"^backend\.breaker_failures: expected"):
        RateLimitMiddleware.from_config(
            {"backend": {**spec, "breaker_failures": 0}, "rules": rules}
        )


# -- slots on different nodes -----------------------------------------------------------


async def test_a_rule_across_nodes_stays_all_or_nothing(
    redis_cluster: RedisClusterServers, backend: RedisBackend
) -> None:
    """Per-caller keys and the global key on different nodes: a refusal on either undoes all."""
    user = caller_on_another_node(redis_cluster, backend, GLOBAL)
    user_slots = StoreKey("api", "per-key-gpu", user.caller)
    assert backend.keys.slot(user) != backend.keys.slot(GLOBAL)
    assert (await backend.decide([BucketCheck(GLOBAL, 3600.0, 1, 1)])).admitted
    lease = LeaseCheck(user_slots, 2, 10.0, "a")
    # The global bucket (last, on its own node) refuses: the caller's slot is refunded.
    verdict = await backend.decide(
        [BucketCheck(user, 3600.0, 5, 2), lease, BucketCheck(GLOBAL, 3600.0, 1, 1)]
    )
    assert not verdict.admitted
    assert [r.admitted for r in verdict.results] == [True, True, False]
    assert (await backend.decide([BucketCheck(user, 3600.0, 5, 0)])).results[0].remaining == 5
    assert await backend.in_use(user_slots) == 0
    assert await backend.release(lease) is False
    # The caller's bucket (first) refuses: the global node is never charged.
    for _ in range(5):
        await backend.decide([BucketCheck(user, 3600.0, 5, 1)])
    verdict = await backend.decide(
        [BucketCheck(user, 3600.0, 5, 1), LeaseCheck(GLOBAL_SLOTS, 4, 10.0, "b")]
    )
    assert not verdict.admitted
    assert await backend.in_use(GLOBAL_SLOTS) == 0


async def test_one_evalsha_per_slot_on_the_node_of_each_slot(
    redis_cluster: RedisClusterServers, backend: RedisBackend
) -> None:
    """A rule over two slots is two EVALSHA calls, one on each slot's node."""
    user = caller_on_another_node(redis_cluster, backend, GLOBAL)
    checks: list[Check] = [BucketCheck(user, 1.0, 5, 1), BucketCheck(GLOBAL, 1.0, 5, 1)]
    await backend.decide(checks)  # scripts loaded on both nodes
    before = {n.port: evalsha_calls(n) for n in redis_cluster.nodes}
    for _ in range(5):
        assert (await backend.decide(checks)).admitted is not None
    after = {n.port: evalsha_calls(n) for n in redis_cluster.nodes}
    per_node = {port: after[port] - before[port] for port in after}
    user_node = redis_cluster.node_of(backend.keys.bucket(user)).port
    global_node = redis_cluster.node_of(backend.keys.bucket(GLOBAL)).port
    assert per_node[user_node] == 5
    assert per_node[global_node] == 5
    assert sum(per_node.values()) == 10


async def test_concurrent_decisions_across_slots_never_leak(backend: RedisBackend) -> None:
    """60 concurrent two-slot decisions: no caller over its burst, none over the global
    burst, and afterwards every bucket and lease table holds exactly what was admitted."""
    callers = [StoreKey("api", "per-key", f"{i:032x}") for i in range(6)]
    decisions = [
        (c, LeaseCheck(GLOBAL_SLOTS, 100, 30.0, f"{c.caller}-{n}"))
        for c in callers
        for n in range(10)
    ]
    verdicts = await asyncio.gather(
        *(
            backend.decide(
                [BucketCheck(c, 3600.0, 3, 1), BucketCheck(GLOBAL, 3600.0, 10, 1), lease]
            )
            for c, lease in decisions
        )
    )
    admitted = [d for d, v in zip(decisions, verdicts, strict=True) if v.admitted]
    assert 0 < len(admitted) <= 10
    for c in callers:
        mine = sum(1 for d in admitted if d[0] == c)
        assert mine <= 3
        left = (await backend.decide([BucketCheck(c, 3600.0, 3, 0)])).results[0].remaining
        assert left == 3 - mine
    left = (await backend.decide([BucketCheck(GLOBAL, 3600.0, 10, 0)])).results[0].remaining
    assert left == 10 - len(admitted)
    assert await backend.in_use(GLOBAL_SLOTS) == len(admitted)


# -- scripts per node, redirects ----------------------------------------------------------


async def test_a_node_that_lost_its_scripts_reloads_them(
    redis_cluster: RedisClusterServers, backend: RedisBackend
) -> None:
    """SCRIPT FLUSH on one node: the next call there reloads the script (NOSCRIPT -> EVAL)."""
    await backend.decide([BucketCheck(GLOBAL, 1.0, 5, 1)])
    node = redis_cluster.node_of(backend.keys.bucket(GLOBAL))
    with admin(node) as client:
        client.script_flush()
    assert (await backend.decide([BucketCheck(GLOBAL, 1.0, 5, 1)])).results[0].remaining == 3
    assert node.info("number_of_cached_scripts") >= 1


def cluster_command(node: RedisServer, *args: str | int) -> Any:
    """A CLUSTER subcommand on one node."""
    with admin(node) as client:
        return client.execute_command("CLUSTER", *args)  # type: ignore[no-untyped-call]


def _node_id(node: RedisServer) -> str:
    return str(cluster_command(node, "MYID").decode())


def _give_slot(cluster: RedisClusterServers, slot: int, owner: RedisServer) -> None:
    """Assign an (emptied) slot to `owner` on every node: the owner first, as Redis advises."""
    owner_id = _node_id(owner)
    for node in [owner, *(n for n in cluster.nodes if n is not owner)]:
        cluster_command(node, "SETSLOT", slot, "NODE", owner_id)


async def test_ask_and_moved_redirects_are_followed(
    redis_cluster: RedisClusterServers, backend: RedisBackend
) -> None:
    """A slot migrating (ASK) and then moved (MOVED) under a running backend: no call fails."""
    key = StoreKey("api", "per-key", "abc123")
    slot = backend.keys.slot(key)
    source = redis_cluster.node_of(backend.keys.bucket(key))
    target = next(n for n in redis_cluster.nodes if n is not source)
    assert (await backend.decide([BucketCheck(GLOBAL, 1.0, 5, 1)])).admitted  # map read
    cluster_command(target, "SETSLOT", slot, "IMPORTING", _node_id(source))
    cluster_command(source, "SETSLOT", slot, "MIGRATING", _node_id(target))
    try:
        # The key is not on the source: it answers ASK, and the call lands on the target.
        first = await backend.decide([BucketCheck(key, 3600.0, 5, 1)])
        second = await backend.decide([BucketCheck(key, 3600.0, 5, 1)])
        assert [first.results[0].remaining, second.results[0].remaining] == [4, 3]
        with admin(target) as client:
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("ASKING")  # type: ignore[no-untyped-call]
            pipe.exists(backend.keys.bucket(key))
            assert pipe.execute()[1] == 1
        # Migration done: the slot is the target's; the backend's map says source (MOVED).
        _give_slot(redis_cluster, slot, target)
        third = await backend.decide([BucketCheck(key, 3600.0, 5, 1)])
        assert third.results[0].remaining == 2
    finally:
        target.flushall()
        _give_slot(redis_cluster, slot, source)
    # And back again, MOVED the other way; the state moved with... nothing (flushed).
    assert (await backend.decide([BucketCheck(key, 3600.0, 5, 1)])).results[0].remaining == 4


# -- faults -------------------------------------------------------------------------------


async def test_a_hung_node_opens_the_breaker_and_recovery_closes_it(
    redis_cluster: RedisClusterServers, redis_cluster_url: str
) -> None:
    """A node that stops answering costs timeouts until the breaker opens; back, it closes."""
    backend = RedisBackend(redis_cluster_url, cluster=True, timeout=0.05, breaker_reset=0.2)
    node = redis_cluster.node_of(backend.keys.bucket(GLOBAL))
    try:
        assert (await backend.decide([BucketCheck(GLOBAL, 1.0, 50, 1)])).admitted
        assert node.pid is not None
        os.kill(node.pid, signal.SIGSTOP)
        try:
            failures = 0
            while True:
                try:
                    await backend.decide([BucketCheck(GLOBAL, 1.0, 50, 1)])
                except BackendUnavailable:
                    break
                except BackendError:
                    failures += 1
                assert failures <= backend.breaker.failures
            started = time.perf_counter()
            with pytest.raises(BackendUnavailable):
                await backend.decide([BucketCheck(GLOBAL, 1.0, 50, 1)])
            assert time.perf_counter() - started < 0.01
        finally:
            os.kill(node.pid, signal.SIGCONT)
        await asyncio.sleep(0.25)
        assert (await backend.decide([BucketCheck(GLOBAL, 1.0, 50, 1)])).admitted
        assert str(backend.breaker.state) == "closed"
    finally:
        await backend.aclose()


# -- the middleware on a cluster ------------------------------------------------------------


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("strategy", ["fixed", "moving", "sliding"])
async def test_the_middleware_decides_every_limit_kind_on_a_cluster(
    redis_cluster_url: str, strategy: str
) -> None:
    """A rule with a token bucket, a global concurrency cap and a window works on a cluster."""
    # A generous timeout: this is about routing, and a loaded 2-core box can take long
    # to answer 20 first calls (fail="closed" would make them 503).
    backend = RedisBackend(redis_cluster_url, cluster=True, timeout=2.0)
    app = RateLimitMiddleware(
        hello,
        rules=[
            Rule(
                "/gen",
                limits=[
                    TokenBucket("1/hour", burst=5, key=keys.header("x-api-key")),
                    Concurrency(32, key=keys.GLOBAL, name="gpu"),
                    Window("3/minute", strategy=strategy, key=keys.header("x-api-key")),  # type: ignore[arg-type]
                ],
            )
        ],
        backend=backend,
        fail="closed",
    )
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            # Concurrent first requests: the cluster client routes each by its slot.
            first = await asyncio.gather(
                *(client.post("/gen", headers={"x-api-key": f"k{i}"}) for i in range(20))
            )
            assert {r.status_code for r in first} == {200}
            statuses = [
                (await client.post("/gen", headers={"x-api-key": "one"})).status_code
                for _ in range(4)
            ]
        assert statuses == [200, 200, 200, 429]
        assert await backend.in_use(StoreKey("gen", "gpu", "*")) == 0
    finally:
        await app.aclose()


async def test_concurrent_first_window_hits_on_a_fresh_backend_all_answer(
    redis_cluster_url: str,
) -> None:
    """A Window-only rule's first requests, all at once on a fresh backend: none fails.

    The cluster client is discovered before it routes anything (redis-py would
    send such early calls to random nodes and reset connections on MOVED).
    """
    for _ in range(3):
        backend = RedisBackend(redis_cluster_url, cluster=True)
        app = RateLimitMiddleware(
            hello,
            rules=[Rule("/w", limits=[Window("100/minute", key=keys.header("x-api-key"))])],
            backend=backend,
            fail="closed",
        )
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                answers = await asyncio.gather(
                    *(client.get("/w", headers={"x-api-key": f"k{i}"}) for i in range(40))
                )
        finally:
            await app.aclose()
        assert {r.status_code for r in answers} == {200}
