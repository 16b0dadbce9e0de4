"""`ratelimit top`: workers publish their heaviest callers to Redis; the command merges them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from ratelimit import (
    ConfigError,
    MemoryBackend,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
    TopCallers,
    keys,
)
from ratelimit._types import KeyFunc, Message, Receive, Scope, Send
from ratelimit.algorithms.heavy_hitters import Counted
from ratelimit.backends.redis.top import RedisTopStore
from ratelimit.core.top import TopPublisher, read_fleet
from ratelimit.policy.keys import digest as _digest

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "fleet"


def ratelimit(*args: str, redis_url: str | None) -> subprocess.CompletedProcess[str]:
    """Run `python -m ratelimit ARGS` (no $RATELIMIT_REDIS_URL unless `redis_url`)."""
    environ = {k: v for k, v in os.environ.items() if k != "RATELIMIT_REDIS_URL"}
    if redis_url is not None:
        environ["RATELIMIT_REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "ratelimit", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        timeout=30,
        check=False,
    )


def top_json(redis_url: str, *args: str) -> Any:
    proc = ratelimit("top", "--prefix", PREFIX, "--json", *args, redis_url=redis_url)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def send_as(key: KeyFunc, callers: dict[str, int]) -> None:
    """Call the tracked key function as each caller, `n` times (one per request it would see)."""
    for caller, n in callers.items():
        scope: Scope = {"type": "http", "headers": [(b"x-api-key", caller.encode())]}
        for _ in range(n):
            key(scope)


def worker(
    redis: Redis, name: str, *, show_keys: bool = False, **options: Any
) -> tuple[TopCallers, KeyFunc, TopPublisher]:
    """A simulated worker: its TopCallers, its tracked key, its publisher (not started)."""
    top = TopCallers(capacity=8, show_keys=show_keys)
    key = top.track(keys.header("x-api-key"), "api-key")
    return top, key, TopPublisher(top, RedisTopStore(redis, PREFIX), worker=name, **options)


async def test_top_merges_two_workers_with_exact_counts(redis: Redis, redis_url: str) -> None:
    """Two workers' windows sum per caller; below capacity counts are exact, errors 0."""
    _, key1, pub1 = worker(redis, "w1")
    _, key2, pub2 = worker(redis, "w2")
    send_as(key1, {"alice": 30, "bob": 5, "carol": 1})
    send_as(key2, {"alice": 10, "bob": 20, "dave": 4})
    await pub1.publish()
    await pub2.publish()
    doc = top_json(redis_url)
    assert [w["id"] for w in doc["workers"]] == ["w1", "w2"]
    table = doc["tables"]["api-key"]
    assert (table["total"], table["workers"], table["keys_shown"]) == (70, 2, False)
    assert table["callers"] == [
        {"caller": _digest("alice"), "count": 40, "error": 0, "share": round(40 / 70, 4)},
        {"caller": _digest("bob"), "count": 25, "error": 0, "share": round(25 / 70, 4)},
        {"caller": _digest("dave"), "count": 4, "error": 0, "share": round(4 / 70, 4)},
        {"caller": _digest("carol"), "count": 1, "error": 0, "share": round(1 / 70, 4)},
    ]
    two = top_json(redis_url, "-n", "2")["tables"]["api-key"]["callers"]
    assert [c["caller"] for c in two] == [_digest("alice"), _digest("bob")]


async def test_each_publish_is_a_new_window(redis: Redis) -> None:
    """A publish covers the requests since the previous one: "right now", not since start-up."""
    top, key, pub = worker(redis, "w1")
    send_as(key, {"alice": 3})
    await pub.publish()
    send_as(key, {"bob": 2})
    await pub.publish()
    fleet = await read_fleet(RedisTopStore(redis, PREFIX))
    assert fleet.tables["api-key"].callers == [Counted(_digest("bob"), 2, 0)]
    assert fleet.workers[0]["start"] is not None
    assert fleet.workers[0]["start"] < fleet.workers[0]["end"]
    assert top.top()["api-key"][0] == 5  # the since-start table (top_app's) keeps counting


async def test_a_worker_that_stops_publishing_vanishes(redis: Redis, redis_url: str) -> None:
    """A dead worker's window expires after `keep` seconds; the live one's stays."""
    _, key1, pub1 = worker(redis, "live")
    _, key2, pub2 = worker(redis, "dead", keep=0.3)
    send_as(key1, {"alice": 2})
    send_as(key2, {"bob": 7})
    await pub1.publish()
    await pub2.publish()
    assert (await read_fleet(RedisTopStore(redis, PREFIX))).tables["api-key"].total == 9
    await asyncio.sleep(0.4)
    doc = top_json(redis_url)
    assert [w["id"] for w in doc["workers"]] == ["live"]
    assert doc["tables"]["api-key"]["callers"] == [
        {"caller": _digest("alice"), "count": 2, "error": 0, "share": 1.0}
    ]


async def test_key_text_never_leaves_a_worker_without_show_keys(
    redis: Redis, redis_url: str
) -> None:
    """Without show_keys the key text is neither in Redis nor in the output; with it, both."""
    secret = "sk-live-very-secret"
    _, key, pub = worker(redis, "w1")
    send_as(key, {secret: 3})
    await pub.publish()
    stored = [await redis.get(k) for k in await redis.keys(f"{PREFIX}:{{top}}:w:*")]
    assert stored
    assert all(secret.encode() not in v for v in stored if v is not None)
    text = ratelimit("top", "--prefix", PREFIX, redis_url=redis_url)
    assert text.returncode == 0, text.stderr
    assert secret not in text.stdout
    assert _digest(secret) in text.stdout
    assert secret not in json.dumps(top_json(redis_url))

    await redis.flushall()
    _, key, pub = worker(redis, "w2", show_keys=True)
    send_as(key, {secret: 3})
    await pub.publish()
    doc = top_json(redis_url)
    assert doc["tables"]["api-key"]["keys_shown"] is True
    assert doc["tables"]["api-key"]["callers"][0]["caller"] == secret


async def test_workers_that_disagree_on_show_keys_merge_as_digests(
    redis: Redis, redis_url: str
) -> None:
    """One worker shows keys, one does not: the command digests the text so callers merge."""
    _, key1, pub1 = worker(redis, "w1", show_keys=True)
    _, key2, pub2 = worker(redis, "w2")
    send_as(key1, {"alice": 2})
    send_as(key2, {"alice": 3})
    await pub1.publish()
    await pub2.publish()
    table = top_json(redis_url)["tables"]["api-key"]
    assert table["keys_shown"] is False
    assert table["callers"] == [{"caller": _digest("alice"), "count": 5, "error": 0, "share": 1.0}]


async def test_a_full_table_reports_its_error_bound(redis: Redis, redis_url: str) -> None:
    """Past capacity, counts may overcount and say by how much: count - error <= true <= count."""
    _, key1, pub1 = worker(redis, "w1", k=2)
    _, key2, pub2 = worker(redis, "w2")
    exact = {f"c{i}": i + 1 for i in range(12)}  # 12 callers through 8 counters
    send_as(key1, exact)
    send_as(key2, {"c11": 5})
    await pub1.publish()
    await pub2.publish()
    table = top_json(redis_url)["tables"]["api-key"]
    truth = {_digest(c): n for c, n in exact.items()}
    truth[_digest("c11")] += 5
    assert table["total"] == sum(truth.values())
    assert table["callers"][0]["caller"] == _digest("c11")
    for c in table["callers"]:
        assert c["count"] - c["error"] <= truth[c["caller"]] <= c["count"]
    assert any(c["error"] > 0 for c in table["callers"])


def test_top_text_output_and_exit_codes(redis_url: str) -> None:
    """No workers: a hint, exit 0; -n 0: usage (2); unreachable Redis: 3."""
    proc = ratelimit("top", "--prefix", PREFIX, redis_url=redis_url)
    assert proc.returncode == 0, proc.stderr
    assert "no worker publishes" in proc.stdout
    assert ratelimit("top", "-n", "0", redis_url=redis_url).returncode == 2
    assert ratelimit("top", "--watch", "0", redis_url=redis_url).returncode == 2
    assert ratelimit("top", redis_url="redis://127.0.0.1:1/0").returncode == 3


async def test_top_text_is_an_aligned_table_and_an_unknown_name_is_refused(
    redis: Redis, redis_url: str
) -> None:
    """People get a table per name; a NAME no live worker tracks exits 1."""
    _, key, pub = worker(redis, "w1", show_keys=True)
    send_as(key, {"alice": 12, "bob": 3})
    await pub.publish()
    proc = ratelimit("top", "--prefix", PREFIX, "api-key", redis_url=redis_url)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "1 worker, windows of 5s" in lines[0]
    assert lines[2] == "api-key: 15 requests over 1 worker (keys)"
    assert lines[3].split() == ["CALLER", "COUNT", "±ERROR", "SHARE"]
    assert lines[4].split() == ["alice", "12", "0", "80.0%"]
    assert lines[5].split() == ["bob", "3", "0", "20.0%"]
    assert lines[3].index("COUNT") == lines[4].index("12")
    refused = ratelimit("top", "--prefix", PREFIX, "nope", redis_url=redis_url)
    assert refused.returncode == 1
    assert "no live worker tracks 'nope'" in refused.stderr


async def test_one_publisher_per_top_callers(redis: Redis) -> None:
    """A window is taken once: a second publisher on the same TopCallers is refused."""
    top, _, _ = worker(redis, "w1")
    with pytest.raises(ConfigError, match=r"^top: expected a TopCallers no other publisher"):
        TopPublisher(top, RedisTopStore(redis, PREFIX))
    with pytest.raises(ConfigError, match=r"^every: expected a number of seconds > 0"):
        TopPublisher(TopCallers(), RedisTopStore(redis, PREFIX), every=0)
    with pytest.raises(ConfigError, match=r"^k: expected a positive number"):
        TopPublisher(TopCallers(), RedisTopStore(redis, PREFIX), k=0)


async def lifespan(app: RateLimitMiddleware, during: Callable[[], Any]) -> None:
    """Run `app`'s lifespan: start-up, `await during()`, shutdown."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    started = asyncio.Event()

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                started.set()
            else:
                return

    async def send(message: Message) -> None:
        return None

    app.app = inner
    task = asyncio.create_task(app({"type": "lifespan"}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    await started.wait()
    try:
        await during()
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await task


async def test_the_middleware_publishes_in_the_background_and_cleans_up(
    redis: Redis, redis_url: str
) -> None:
    """RateLimitMiddleware(top=) on Redis publishes every `every` s under the overrides' worker
    id, and removes its window at shutdown; on the memory backend there is nothing to publish."""
    top = TopCallers(capacity=8)
    key = top.track(keys.header("x-api-key"), "api-key")
    rules = [Rule("/x", limits=[TokenBucket("10/second", key=key)])]
    backend = RedisBackend(redis_url, prefix=PREFIX)
    app = RateLimitMiddleware(None, rules=rules, backend=backend, top=top)  # type: ignore[arg-type]
    publisher = app.limiter.top_publisher
    assert publisher is not None
    assert publisher.worker == app.overrides.worker
    publisher.every = 0.05

    async def traffic() -> None:
        send_as(key, {"alice": 4})
        for _ in range(100):
            fleet = await read_fleet(RedisTopStore(redis, PREFIX))
            if fleet.tables and fleet.tables["api-key"].total:
                break
            await asyncio.sleep(0.02)
        assert fleet.tables["api-key"].callers == [Counted(_digest("alice"), 4, 0)]

    await lifespan(app, traffic)
    assert (await read_fleet(RedisTopStore(redis, PREFIX))).workers == []
    await app.aclose()

    memory = RateLimitMiddleware(None, rules=rules, backend=MemoryBackend(), top=TopCallers())  # type: ignore[arg-type]
    assert memory.limiter.top_publisher is None
    with pytest.raises(ConfigError, match=r"^top: expected a TopCallers"):
        RateLimitMiddleware(None, rules=rules, top=object())  # type: ignore[arg-type]


async def test_publish_and_read_on_redis_cluster(redis_cluster_url: str) -> None:
    """Every key shares the {top} hash tag: publishing and merging work on a cluster too."""
    backend = RedisBackend(redis_cluster_url, cluster=True, prefix=PREFIX)
    try:
        pubs = []
        for name, callers in (("w1", {"alice": 3}), ("w2", {"alice": 1, "bob": 2})):
            top = TopCallers(capacity=8)
            key = top.track(keys.header("x-api-key"), "api-key")
            pubs.append(TopPublisher(top, backend.top_store(), worker=name))
            send_as(key, callers)  # counted in the window the publisher started
        for pub in pubs:
            await pub.publish()
        fleet = await read_fleet(backend.top_store())
        assert fleet.tables["api-key"].callers == [
            Counted(_digest("alice"), 4, 0),
            Counted(_digest("bob"), 2, 0),
        ]
        for pub in pubs:
            await pub.aclose()
        assert (await read_fleet(backend.top_store())).workers == []
    finally:
        await backend.aclose()
