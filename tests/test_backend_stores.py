"""The stores each backend gives (`override_store`, `admin`): one contract, memory and Redis."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from ratelimit import MemoryBackend, RedisBackend
from ratelimit.backends.base import BucketCheck, LeaseCheck, StoreKey
from ratelimit.backends.stores import StoreBackend, override_store, top_store


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[MemoryBackend | RedisBackend]:
    made: MemoryBackend | RedisBackend
    if request.param == "memory":
        made = MemoryBackend()
    else:
        made = RedisBackend(request.getfixturevalue("redis_url"), prefix="stores")
    try:
        yield made
    finally:
        await made.aclose()


def bucket(rule: str, caller: str) -> BucketCheck:
    return BucketCheck(StoreKey(rule, "per-key", caller), 1.0, 2, 2)


async def test_admin_sums_slots_over_callers_and_forgets_one_caller(
    backend: MemoryBackend | RedisBackend,
) -> None:
    """`in_use` sums every caller's leases (or reads the shared key); `forget` empties one
    caller's buckets in every rule and leaves other callers' alone."""
    gpu = [StoreKey("images", "gpu", c) for c in ("a1", "b2", "b2")]
    for i, key in enumerate(gpu):
        assert (await backend.decide([LeaseCheck(key, 4, 60.0, f"lease-{i}")])).admitted
    assert (
        await backend.decide([LeaseCheck(StoreKey("images", "pool", "*"), 9, 60.0, "s")])
    ).admitted
    for check in (bucket("images", "a1"), bucket("chat", "a1"), bucket("chat", "b2")):
        assert (await backend.decide([check])).admitted
        assert not (await backend.decide([check])).admitted  # burst 2, cost 2: empty now
    admin = backend.admin()
    assert await admin.in_use("images", "gpu", False) == 3
    assert await admin.in_use("images", "pool", True) == 1
    assert await admin.waiting("images", "gpu", False) == 0
    deleted = await admin.forget("a1", None, None)
    assert len(deleted) == 2
    assert (await backend.decide([bucket("images", "a1")])).admitted
    assert (await backend.decide([bucket("chat", "a1")])).admitted
    assert not (await backend.decide([bucket("chat", "b2")])).admitted
    assert await admin.forget("b2", "chat", "per-key") != []
    assert await admin.forget("b2", "chat", "per-key") == []


async def test_override_store_keeps_entries_by_slot_and_drops_lapsed_ones(
    backend: MemoryBackend | RedisBackend,
) -> None:
    """Entries are opaque JSON by slot; the next write drops entries whose `expires_at` passed."""
    store = backend.override_store()
    now = await store.sync_clock()
    v1 = await store.put("chat/!", json.dumps({"expires_at": now - 1}))
    assert set((await store.load()).entries) == {"chat/!"}  # readers filter lapsed ones
    await store.put("chat/*", json.dumps({"expires_at": None}))
    v3 = await store.put("images/gpu", json.dumps({"expires_at": now + 3600}))
    assert int(v3) == int(v1) + 2
    assert set((await store.load()).entries) == {"chat/*", "images/gpu"}
    gone, _ = await store.clear("images", "gpu")
    assert list(gone) == ["images/gpu"]
    assert (await store.load()).entries == {"chat/*": '{"expires_at": null}'}
    await store.aclose()


def test_each_backend_gives_its_stores_by_explicit_methods() -> None:
    """Both backends are `StoreBackend`s; an object that is not gets this process's store."""
    memory = MemoryBackend()
    assert isinstance(memory, StoreBackend)
    assert isinstance(RedisBackend(prefix="x"), StoreBackend)
    assert override_store(object()).shared is False
    assert top_store(object()) is None
    assert top_store(memory) is None
    assert override_store(RedisBackend(prefix="x")).shared is True
