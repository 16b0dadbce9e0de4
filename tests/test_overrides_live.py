"""Live overrides in a process: the Python API, both stores, lapses, and workers on one Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from ratelimit import Concurrency, ConfigError, Rule, TokenBucket, keys
from ratelimit.backends.redis.overrides import RedisOverrideStore
from ratelimit.backends.stores import MemoryOverrideStore, override_store
from ratelimit.core.live import LiveOverrides
from ratelimit.policy.effective import Resolution
from ratelimit.policy.overrides import Override


def rules() -> list[Rule]:
    return [
        Rule(
            "/v1/images",
            limits=[
                TokenBucket("100/day", burst=20, key=keys.header("x-api-key"), name="per-key"),
                Concurrency(8, name="gpu"),
            ],
            name="images",
        ),
        Rule("/v1/chat", limits=[TokenBucket("10/second")], name="chat"),
    ]


class Applied:
    """The apply hook of a test: records every resolution it is handed."""

    def __init__(self) -> None:
        self.calls: list[Resolution] = []

    def __call__(self, resolution: Resolution) -> None:
        self.calls.append(resolution)

    def slots(self, rule: str = "images") -> int:
        lim = self.calls[-1].by_name()[rule].rule.limits[1]
        assert isinstance(lim, Concurrency)
        return lim.limit


async def until(check: Callable[[], bool], timeout: float = 3.0) -> float:
    """Wait until `check()` holds; return the seconds it took (fail after `timeout`)."""
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)
    return time.perf_counter() - start


# -- in process -----------------------------------------------------------------------------


async def test_set_applies_before_it_returns_with_the_memory_store() -> None:
    """With the in-process store, `set` hands the effective rules to the hook at once."""
    applied = Applied()
    live = LiveOverrides(rules(), MemoryOverrideStore(), applied)
    o = await live.set("images", "gpu", slots=2, expires_in=60, reason="half the GPUs down")
    assert applied.slots() == 2
    assert live.list() == [o]
    assert o.created_by is not None
    assert o.created_at is not None
    assert o.expires_at == pytest.approx(o.created_at + 60)
    assert live.effective("images").changed
    assert not live.effective("chat").changed


async def test_clear_gives_the_configuration_back() -> None:
    """Clearing a rule removes its overrides; the hook gets the configured limits again."""
    applied = Applied()
    live = LiveOverrides(rules(), MemoryOverrideStore(), applied)
    await live.set("images", "gpu", slots=2, until_cleared=True)
    await live.set("images", factor=0.5, until_cleared=True)
    assert [o.slot for o in await live.clear("images", "gpu")] == ["images/gpu"]
    assert applied.slots() == 4  # the rule-wide factor still applies
    assert [o.slot for o in await live.clear("images")] == ["images/*"]
    assert applied.slots() == 8
    assert live.list() == []
    assert await live.clear("images") == []


async def test_override_lapses_by_itself() -> None:
    """At `expires_at` a timer re-applies: the configured limit returns without any call."""
    applied = Applied()
    live = LiveOverrides(rules(), MemoryOverrideStore(), applied)
    await live.set("images", "gpu", slots=1, expires_in=0.05)
    assert applied.slots() == 1
    took = await until(lambda: applied.slots() == 8)
    assert took < 0.5
    assert live.list() == []
    await live.aclose()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slots": 2}, r"^expires_in: expected exactly one of expires_in=seconds, expires_at="),
        (
            {"slots": 2, "expires_in": 5, "until_cleared": True},
            r"^expires_in: expected exactly one",
        ),
        ({"slots": 2, "expires_in": -1}, r"^expires_in: expected a number of seconds > 0"),
        ({"slots": 2, "expires_at": 1.0}, r"^expires_at: expected a time in the future"),
        ({"rate": "1/minute", "limit": "gpu", "until_cleared": True}, r"^rate: expected a change"),
        (
            {"rule": "imgaes", "slots": 2, "until_cleared": True},
            r"^rule: expected one of the rules",
        ),
    ],
)
async def test_bad_override_is_refused_and_never_stored(
    kwargs: dict[str, Any], message: str
) -> None:
    """`set` checks the override against the rules first: a refusal stores and applies nothing."""
    applied = Applied()
    store = MemoryOverrideStore()
    live = LiveOverrides(rules(), store, applied)
    rule = kwargs.pop("rule", "images")
    limit = kwargs.pop("limit", "gpu" if "slots" in kwargs else None)
    with pytest.raises(ConfigError, match=message):
        await live.set(rule, limit, **kwargs)
    assert (await store.load()).entries == {}
    assert applied.calls == []


async def test_setting_the_same_slot_replaces_the_override() -> None:
    """One override per slot: a second `set` on the same limit replaces the first."""
    applied = Applied()
    live = LiveOverrides(rules(), MemoryOverrideStore(), applied)
    await live.set("images", "gpu", slots=2, until_cleared=True)
    await live.set("images", "gpu", slots=6, until_cleared=True)
    assert applied.slots() == 6
    assert len(live.list()) == 1


def test_memory_backend_gets_the_in_process_store() -> None:
    """`override_store` asks the backend for its store: in-process for the memory backend."""
    from ratelimit import MemoryBackend

    assert isinstance(override_store(MemoryBackend()), MemoryOverrideStore)


# -- on Redis -------------------------------------------------------------------------------


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[Redis]]:
    made = [Redis.from_url(redis_url) for _ in range(3)]
    try:
        yield made
    finally:
        for c in made:
            await c.aclose()


def worker(client: Redis, *, resync: float = 1.0) -> tuple[LiveOverrides, Applied]:
    applied = Applied()
    return LiveOverrides(rules(), RedisOverrideStore(client, "rl", resync=resync), applied), applied


@pytest.mark.redis
async def test_a_change_reaches_another_worker_through_pub_sub(clients: list[Redis]) -> None:
    """Worker B applies a change made by worker A within milliseconds (pub/sub, not the resync)."""
    a, _ = worker(clients[0])
    b, b_applied = worker(clients[1], resync=30.0)
    await a.start()
    await b.start()
    try:
        await asyncio.sleep(0.05)  # B's subscription is in place
        await a.set("images", "gpu", slots=3, expires_in=60)
        took = await until(lambda: bool(b_applied.calls) and b_applied.slots() == 3)
        assert took < 0.5
        await a.clear("images")
        await until(lambda: b_applied.slots() == 8)
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.redis
async def test_a_lost_announcement_is_caught_by_the_periodic_version_check(
    clients: list[Redis],
) -> None:
    """A change written without PUBLISH still reaches a worker within its resync interval."""
    b, b_applied = worker(clients[1], resync=0.2)
    await b.start()
    try:
        o = Override("images", "gpu", slots=5, expires_at=None)
        await clients[0].hset("rl:{overrides}", mapping={o.slot: o.to_json(), "#version": "41"})
        took = await until(lambda: bool(b_applied.calls) and b_applied.slots() == 5)
        assert took < 1.0
    finally:
        await b.aclose()


@pytest.mark.redis
async def test_overrides_are_read_at_start_up(clients: list[Redis]) -> None:
    """A worker started after the change applies it before it serves: overrides survive restarts."""
    a, _ = worker(clients[0])
    await a.set("images", "gpu", slots=2, until_cleared=True)
    await a.aclose()
    b, b_applied = worker(clients[1])
    await b.start()
    try:
        assert b_applied.slots() == 2
        assert [o.slot for o in b.list()] == ["images/gpu"]
    finally:
        await b.aclose()


@pytest.mark.redis
async def test_expiry_is_measured_on_the_redis_clock(clients: list[Redis]) -> None:
    """`expires_in` counts from Redis's TIME, and a worker lapses it on that clock."""
    store = RedisOverrideStore(clients[0], "rl")
    server = await store.sync_clock()
    store._offset += 3600  # pretend our clock is an hour behind Redis: the offset corrects it
    await store.sync_clock()
    assert store.now() == pytest.approx(server, abs=1.0)
    applied = Applied()
    live = LiveOverrides(rules(), store, applied)
    o = await live.set("images", "gpu", slots=1, expires_in=0.2)
    assert o.expires_at == pytest.approx(server + 0.2, abs=1.0)
    assert applied.slots() == 1
    await until(lambda: applied.slots() == 8)
    await live.aclose()


@pytest.mark.redis
async def test_writes_drop_lapsed_entries_and_bump_the_version(clients: list[Redis]) -> None:
    """Each change is one transaction that also drops lapsed entries and bumps the version."""
    store = RedisOverrideStore(clients[0], "rl")
    old = Override("images", "gpu", slots=1, expires_at=time.time() - 10)
    await clients[0].hset("rl:{overrides}", old.slot, old.to_json())
    new = Override("chat", factor=2, expires_at=None)
    v1 = await store.put(new.slot, new.to_json())
    stored = await clients[0].hgetall("rl:{overrides}")
    assert set(stored) == {b"chat/*", b"#version"}
    assert stored[b"#version"] == v1.encode()
    removed, v2 = await store.clear("chat", None)
    assert list(removed) == ["chat/*"]
    assert v2 is not None
    assert int(v2) == int(v1) + 1
    assert await clients[0].hgetall("rl:{overrides}") == {b"#version": v2.encode()}


@pytest.mark.redis
async def test_unreadable_or_misfit_entries_are_ignored_with_one_warning(
    clients: list[Redis], caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage in the hash, or an override for an unknown rule, never stops the good ones."""
    good = Override("images", "gpu", slots=4, expires_at=None)
    stray = Override("gone", factor=0.5, expires_at=None)
    await clients[0].hset(
        "rl:{overrides}",
        mapping={
            good.slot: good.to_json(),
            stray.slot: stray.to_json(),
            "images/per-key": "{not json",
            "#version": "7",
        },
    )
    b, b_applied = worker(clients[1])
    with caplog.at_level(logging.WARNING, logger="ratelimit"):
        await b.start()
        await b.refresh(None)  # read again: each problem is logged once, not per read
    try:
        assert b_applied.slots() == 4
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert any("images/per-key" in w and "unreadable" in w for w in warnings)
        assert any("gone/*" in w and "rule" in w for w in warnings)
    finally:
        await b.aclose()


@pytest.mark.redis
async def test_watcher_recovers_after_redis_restarts(private_redis: Any) -> None:
    """When Redis comes back the watcher re-subscribes and re-reads: later changes still arrive."""
    client = Redis.from_url(private_redis.url, socket_timeout=0.5)
    writer = Redis.from_url(private_redis.url)
    b, b_applied = worker(client, resync=0.2)
    a, _ = worker(writer)
    try:
        await b.start()
        private_redis.restart()
        await asyncio.sleep(0.3)
        await a.set("images", "gpu", slots=6, until_cleared=True)
        await until(lambda: bool(b_applied.calls) and b_applied.slots() == 6, timeout=5.0)
    finally:
        await b.aclose()
        await a.aclose()
        await client.aclose()
        await writer.aclose()


@pytest.mark.redis
async def test_workers_report_what_they_applied(clients: list[Redis]) -> None:
    """Each worker publishes its version and effective limits, for `ratelimit status`."""
    a, _ = worker(clients[0])
    b, _ = worker(clients[1])
    await a.start()
    await b.start()
    try:
        await a.set("images", "gpu", slots=3, until_cleared=True)
        store = RedisOverrideStore(clients[2], "rl")

        async def both_current() -> bool:
            reports = await store.reports()
            return len(reports) == 2 and all(r["version"] == a.version for r in reports.values())

        deadline = time.monotonic() + 3
        while not await both_current():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        report = next(iter((await store.reports()).values()))
        gpu = report["rules"]["images"]["limits"]["gpu"]
        assert gpu["configured"]["limit"] == 8
        assert gpu["effective"]["limit"] == 3
        assert gpu["override"] == "images/gpu"
        json.dumps(report)
    finally:
        await a.aclose()
        await b.aclose()
