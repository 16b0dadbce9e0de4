"""What only the Redis backend does: keys, expiry, scripts, one call per decision, faults.

These run the production scripts on the server's TIME (the contract suite
covers behaviour on a manual clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest
import redis.asyncio
import redis.exceptions
from _servers import RedisServer, free_port, start_redis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from redis.crc import key_slot

from ratelimit import Metrics, RateLimitMiddleware, Rule, TokenBucket, keys
from ratelimit._errors import BackendError, BackendUnavailable, ConfigError
from ratelimit._types import Receive, Scope, Send
from ratelimit.backends.base import Backend, BucketCheck, Check, LeaseCheck, StoreKey
from ratelimit.backends.breaker import CircuitBreaker
from ratelimit.backends.redis import RedisBackend, resp
from ratelimit.backends.redis import lane as lane_module
from ratelimit.backends.redis.scripts import OPERATIONS, SCRIPTS, read_lua

pytestmark = pytest.mark.redis

CALLER = "0123456789abcdef0123456789abcdef"
USER = StoreKey("images", "per-key", CALLER)
USER_SLOTS = StoreKey("images", "per-key-inflight", CALLER)
GLOBAL = StoreKey("images", "global", "*")
GLOBAL_SLOTS = StoreKey("images", "inflight", "*")


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    b = RedisBackend(redis_url)
    try:
        yield b
    finally:
        await b.aclose()


@pytest.fixture
async def inspect(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client to look at what the backend stored."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def evalsha_calls(client: redis.asyncio.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


# -- construction -------------------------------------------------------------------


def test_is_a_backend() -> None:
    """RedisBackend satisfies the runtime-checkable Backend protocol (no connection needed)."""
    assert isinstance(RedisBackend(), Backend)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"url": "127.0.0.1:6379"}, "url"),
        ({"prefix": "rl{x}"}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"url": "http://127.0.0.1:6379"}, "url"),
        ({"breaker_failures": 0}, "breaker_failures"),
        ({"breaker_failures": 1.5}, "breaker_failures"),
        ({"breaker_reset": 0}, "breaker_reset"),
        ({"breaker_reset": "1s"}, "breaker_reset"),
        ({"breaker": "closed"}, "breaker"),
    ],
)
def test_bad_configuration_names_the_field(kwargs: dict[str, object], field: str) -> None:
    """A bad argument fails at construction with a ConfigError naming it."""
    with pytest.raises(ConfigError, match=f"^{field}: expected"):
        RedisBackend(**kwargs)  # type: ignore[arg-type]


def test_every_operation_ships_a_lua_file_with_a_header() -> None:
    """Each operation is a .lua file in the package, starting with its KEYS/ARGV comment."""
    for name in OPERATIONS:
        text = read_lua(name)
        assert text.startswith(f"-- {name}.lua: ")
        assert "KEYS" in text
    assert "redis.call('TIME')" in SCRIPTS.decide.source


# -- keys -----------------------------------------------------------------------------


def test_keys_of_one_rule_and_caller_share_a_slot() -> None:
    """Keys of one (rule, caller) carry one hash tag; the shared caller gets its own tag."""
    keys = RedisBackend(prefix="rl").keys
    assert keys.bucket(USER) == "rl:{images:" + CALLER + "}:per-key:tat"
    assert keys.leases(GLOBAL_SLOTS) == "rl:{images:*}:inflight:leases"
    assert key_slot(keys.bucket(USER).encode()) == key_slot(keys.leases(USER_SLOTS).encode())
    assert key_slot(keys.bucket(GLOBAL).encode()) == key_slot(keys.leases(GLOBAL_SLOTS).encode())
    assert keys.tag(USER) != keys.tag(GLOBAL)


@pytest.mark.parametrize(
    "key",
    [
        StoreKey("images", "per-key", "{other}"),
        StoreKey("images", "per-key", "abc:def"),
        StoreKey("images", "per-key", "ABCDEF"),
        StoreKey("images", "per-key", ""),
        StoreKey("images", "per}key", CALLER),
        StoreKey("{images", "per-key", CALLER),
        StoreKey("images", "per-key", "x" * 129),
    ],
)
async def test_unsafe_key_text_never_reaches_redis(backend: RedisBackend, key: StoreKey) -> None:
    """A StoreKey with text that could move it to another key or slot is refused."""
    with pytest.raises(ConfigError, match=r"^StoreKey\."):
        await backend.decide([BucketCheck(key, 1.0, 1, 1)])


# -- state and expiry on the server's clock -------------------------------------------


async def test_bucket_key_expires_when_the_bucket_is_full(
    backend: RedisBackend, inspect: redis.asyncio.Redis
) -> None:
    """A bucket's key lives exactly until the bucket is full again, then vanishes."""
    verdict = await backend.decide([BucketCheck(USER, 0.1, 5, 2)])
    ttl = await inspect.pttl(backend.keys.bucket(USER))
    assert verdict.results[0].reset_after == pytest.approx(0.2, abs=0.02)
    assert 100 < ttl <= 200
    await asyncio.sleep(0.25)
    assert await inspect.exists(backend.keys.bucket(USER)) == 0
    assert (await backend.decide([BucketCheck(USER, 0.1, 5, 0)])).results[0].remaining == 5


async def test_lease_set_lives_as_long_as_its_longest_lease(
    backend: RedisBackend, inspect: redis.asyncio.Redis
) -> None:
    """The lease table expires with its longest lease, so an idle key vanishes."""
    await backend.decide([LeaseCheck(GLOBAL_SLOTS, 4, 30.0, "a")])
    await backend.decide([LeaseCheck(GLOBAL_SLOTS, 4, 5.0, "b")])
    assert 29_000 < await inspect.pttl(backend.keys.leases(GLOBAL_SLOTS)) <= 30_000
    assert await backend.renew([LeaseCheck(GLOBAL_SLOTS, 4, 60.0, "b")]) == [True]
    assert 59_000 < await inspect.pttl(backend.keys.leases(GLOBAL_SLOTS)) <= 60_000


async def test_dead_lease_frees_its_slot_on_the_server_clock(backend: RedisBackend) -> None:
    """A lease not renewed within its ttl stops counting, on the real clock too."""
    assert (await backend.decide([LeaseCheck(GLOBAL_SLOTS, 1, 0.2, "crashed")])).admitted
    assert not (await backend.decide([LeaseCheck(GLOBAL_SLOTS, 1, 0.2, "next")])).admitted
    await asyncio.sleep(0.25)
    assert await backend.in_use(GLOBAL_SLOTS) == 0
    assert (await backend.decide([LeaseCheck(GLOBAL_SLOTS, 1, 0.2, "next")])).admitted


async def test_floats_come_back_unrounded(backend: RedisBackend) -> None:
    """Seconds cross the Lua boundary as text: a refusal's retry_after is not truncated."""
    check = BucketCheck(USER, 7.25, 1, 1)
    await backend.decide([check])
    retry = (await backend.decide([check])).results[0].retry_after
    assert 7.0 < retry <= 7.25


# -- round trips ------------------------------------------------------------------------


async def test_one_evalsha_per_decision_on_one_server(
    backend: RedisBackend, inspect: redis.asyncio.Redis
) -> None:
    """On one server a rule's checks, whatever their slots, are one EVALSHA."""
    before = await evalsha_calls(inspect)
    for i in range(10):
        await backend.decide(
            [
                BucketCheck(USER, 1.0, 100, 1),
                BucketCheck(GLOBAL, 1.0, 100, 1),
                LeaseCheck(GLOBAL_SLOTS, 100, 10.0, f"l{i}"),
            ]
        )
    assert await evalsha_calls(inspect) - before == 10


async def test_a_one_bucket_call_is_packed_once_per_caller_and_kept_bounded(
    backend: RedisBackend, inspect: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-bucket decision reuses its packed EVALSHA: the bytes the general packer
    makes, one EVALSHA each time, the right answers, and a cache cleared when full."""
    from ratelimit.backends.redis import calls

    monkeypatch.setattr(calls, "_KEPT", 3)
    check = BucketCheck(USER, 1.0, 2, 1)
    before = await evalsha_calls(inspect)
    answers = [(await backend.decide([check])).admitted for _ in range(3)]
    assert answers == [True, True, False]  # burst 2, then refused: the bucket is real
    assert await evalsha_calls(inspect) - before == 3
    keys_, args, packed = backend.calls.buckets[check]
    assert packed == resp.pack("EVALSHA", SCRIPTS.decide.sha, "1", *keys_, *args)
    for i in range(5):  # more callers than the cache holds: it never grows past its size
        caller = StoreKey("r", "l", f"c{i}")
        assert (await backend.decide([BucketCheck(caller, 1.0, 2, 1)])).admitted
        assert len(backend.calls.buckets) <= 3
    await inspect.script_flush()  # NOSCRIPT: a packed call falls back to EVAL as well
    assert not (await backend.decide([check])).admitted


@pytest.mark.parametrize(
    "checks",
    [
        [BucketCheck(USER, 1.0, 2, 1), LeaseCheck(GLOBAL_SLOTS, 8, 30.0, "ab12-7")],
        [LeaseCheck(USER_SLOTS, 2, 30.0, "ab12-8"), LeaseCheck(GLOBAL_SLOTS, 8, 9.5, "x")],
        [BucketCheck(USER, 1.0, 2, 1), BucketCheck(GLOBAL, 0.5, 10, 3)],
        [LeaseCheck(GLOBAL_SLOTS, 8, 30.0, "non-ascii-\u00e9")],
        [LeaseCheck(USER_SLOTS, 2, 30.0, "l"), LeaseCheck(GLOBAL_SLOTS, 8, 30.0, "t")],
    ],
    ids=["bucket+lease", "two leases", "two buckets", "non-ascii id", "ids like markers"],
)
def test_templated_calls_pack_the_bytes_the_general_packer_makes(checks: list[Check]) -> None:
    """Decide and release calls filled in from a kept template are byte for byte the
    general packer's, for the first request of a caller and for its next ones."""
    backend = RedisBackend("redis://127.0.0.1:1/0")
    for serial in ("", "1", "22"):
        now = [
            c._replace(lease_id=c.lease_id + serial) if isinstance(c, LeaseCheck) else c
            for c in checks
        ]
        keys_, args, packed = backend.calls.decide(now)
        assert (keys_, args) == backend.calls.decide_args(now, "1")
        assert packed == resp.pack("EVALSHA", SCRIPTS.decide.sha, str(len(keys_)), *keys_, *args)
        for lease in (c for c in now if isinstance(c, LeaseCheck)):
            keys_, args, packed = backend.calls.release(lease)
            assert keys_ == [backend.keys.leases(lease.key), *backend.keys.queue(lease.key)]
            assert args == [lease.lease_id, backend.channel]
            assert packed == resp.pack(
                "EVALSHA", SCRIPTS.release.sha, str(len(keys_)), *keys_, *args
            )


async def test_one_evalsha_per_slot_when_split(
    redis_url: str, inspect: redis.asyncio.Redis
) -> None:
    """split_by_slot (as on a cluster) makes one call per hash slot of the rule."""
    backend = RedisBackend(redis_url, split_by_slot=True)
    try:
        await backend.decide([BucketCheck(USER, 1.0, 5, 1)])  # scripts loaded
        before = await evalsha_calls(inspect)
        verdict = await backend.decide(
            [
                BucketCheck(USER, 1.0, 5, 1),
                BucketCheck(GLOBAL, 1.0, 5, 1),
                LeaseCheck(USER_SLOTS, 2, 10.0, "a"),
            ]
        )
        assert verdict.admitted
        assert [r.remaining for r in verdict.results] == [3, 4, 1]
        assert await evalsha_calls(inspect) - before == 2
    finally:
        await backend.aclose()


async def test_split_decision_refunds_earlier_slots_when_a_later_one_refuses(
    redis_url: str,
) -> None:
    """Across slots, a refusal undoes what earlier slots took; results show untouched state."""
    backend = RedisBackend(redis_url, split_by_slot=True)
    try:
        assert (await backend.decide([BucketCheck(GLOBAL, 1.0, 1, 1)])).admitted
        checks: list[Check] = [
            BucketCheck(USER, 1.0, 5, 2),
            LeaseCheck(USER_SLOTS, 2, 10.0, "a"),
            BucketCheck(GLOBAL, 1.0, 1, 1),
        ]
        verdict = await backend.decide(checks)
        assert not verdict.admitted
        user, lease, shared = verdict.results
        assert (user.admitted, user.remaining, lease.admitted, lease.remaining) == (
            True,
            5,
            True,
            2,
        )
        assert not shared.admitted
        assert shared.retry_after > 0.9
        assert (await backend.decide([BucketCheck(USER, 1.0, 5, 0)])).results[0].remaining == 5
        assert await backend.in_use(USER_SLOTS) == 0
        assert await backend.renew([LeaseCheck(USER_SLOTS, 2, 10.0, "a")]) == [False]
    finally:
        await backend.aclose()


async def test_split_renew_answers_in_order_across_slots(redis_url: str) -> None:
    """renew over leases of several slots answers each lease in the order given."""
    backend = RedisBackend(redis_url, split_by_slot=True)
    try:
        mine, shared = LeaseCheck(USER_SLOTS, 2, 10.0, "a"), LeaseCheck(GLOBAL_SLOTS, 2, 10.0, "b")
        await backend.decide([mine])
        await backend.decide([shared])
        gone = LeaseCheck(USER_SLOTS, 2, 10.0, "never")
        assert await backend.renew([shared, gone, mine]) == [True, False, True]
    finally:
        await backend.aclose()


# -- scripts and faults -----------------------------------------------------------------


async def test_flushed_scripts_are_reloaded(
    backend: RedisBackend, inspect: redis.asyncio.Redis
) -> None:
    """After SCRIPT FLUSH (NOSCRIPT), every operation reloads its script and answers."""
    lease = LeaseCheck(GLOBAL_SLOTS, 2, 10.0, "a")
    assert (await backend.decide([lease])).admitted
    await inspect.script_flush()
    assert await backend.renew([lease]) == [True]
    await inspect.script_flush()
    assert await backend.in_use(GLOBAL_SLOTS) == 1
    await inspect.script_flush()
    assert await backend.release(lease) is True
    await inspect.script_flush()
    assert (await backend.decide([BucketCheck(USER, 1.0, 2, 1)])).admitted


async def test_decisions_resume_after_a_redis_restart(private_redis: RedisServer) -> None:
    """A restarted Redis (no state, no scripts) is used again at once, no call lost.

    The connection sees the server close it and is replaced before the next
    call; the test yields to the loop once, as a running server's loop would.
    """
    backend = RedisBackend(private_redis.url)
    try:
        await asyncio.gather(*(backend.decide([BucketCheck(USER, 1.0, 50, 1)]) for _ in range(4)))
        private_redis.restart()
        await asyncio.sleep(0.01)
        for _ in range(3):
            assert (await backend.decide([BucketCheck(USER, 1.0, 50, 1)])).admitted
    finally:
        await backend.aclose()


async def test_a_passed_in_client_recovers_after_a_restart(
    private_redis: RedisServer,
) -> None:
    """Through a redis-py client, a restart costs at most a failed call per stale connection."""
    client = redis.asyncio.Redis.from_url(private_redis.url)
    backend = RedisBackend(client=client)
    try:
        assert (await backend.decide([BucketCheck(USER, 1.0, 50, 1)])).admitted
        private_redis.restart()
        answers: list[bool | None] = []
        for _ in range(3):
            try:
                answers.append((await backend.decide([BucketCheck(USER, 1.0, 50, 1)])).admitted)
            except BackendError:
                answers.append(None)
        assert answers[-2:] == [True, True]
    finally:
        await backend.aclose()
        await client.aclose()


async def test_a_stopped_redis_fails_fast_as_backend_error(private_redis: RedisServer) -> None:
    """With Redis gone, a call raises BackendError at once, the driver's error as its cause."""
    backend = RedisBackend(private_redis.url)
    try:
        await backend.decide([BucketCheck(USER, 1.0, 5, 1)])
        private_redis.stop()
        for _ in range(3):
            started = time.perf_counter()
            with pytest.raises(BackendError) as caught:
                await backend.decide([BucketCheck(USER, 1.0, 5, 1)])
            assert time.perf_counter() - started < 0.1
            assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
    finally:
        await backend.aclose()


async def test_a_hung_redis_times_out_as_backend_error(private_redis: RedisServer) -> None:
    """A Redis that stops answering costs one timeout, reported as BackendError(TimeoutError)."""
    backend = RedisBackend(private_redis.url, timeout=0.1)
    try:
        await backend.decide([BucketCheck(USER, 1.0, 5, 1)])
        assert private_redis.pid is not None
        os.kill(private_redis.pid, signal.SIGSTOP)
        try:
            started = time.perf_counter()
            with pytest.raises(BackendError) as caught:
                await backend.decide([BucketCheck(USER, 1.0, 5, 1)])
            elapsed = time.perf_counter() - started
        finally:
            os.kill(private_redis.pid, signal.SIGCONT)
        assert 0.09 < elapsed < 0.5
        assert isinstance(caught.value.__cause__, (TimeoutError, redis.exceptions.TimeoutError))
        assert (await backend.decide([BucketCheck(USER, 1.0, 5, 1)])).admitted
    finally:
        await backend.aclose()


# -- clients ---------------------------------------------------------------------------


async def test_a_passed_in_client_is_used_and_left_open(
    redis_url: str, inspect: redis.asyncio.Redis
) -> None:
    """With client=, the backend uses that client and aclose() does not close it."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        backend = RedisBackend(client=client, prefix="mine")
        assert (await backend.decide([BucketCheck(USER, 1.0, 5, 1)])).admitted
        await backend.aclose()
        assert await client.ping()
        assert await inspect.keys("mine:*") == [f"mine:{{images:{CALLER}}}:per-key:tat"]
    finally:
        await client.aclose()


# -- the pipelined connection ---------------------------------------------------------


async def recorded_writes(backend: RedisBackend) -> tuple[Any, list[bytes]]:
    """The backend's connected lane, and a list that records every write it makes from now."""
    await backend.decide([BucketCheck(USER, 1.0, 5, 0)])  # connected, scripts loaded
    lane = backend.guard.transport._lane  # type: ignore[attr-defined]
    writes: list[bytes] = []
    write = lane._transport.write

    def counted(data: bytes) -> None:
        writes.append(data)
        write(data)

    lane._transport.write = counted
    return lane, writes


async def test_a_call_to_an_idle_redis_is_written_at_once(backend: RedisBackend) -> None:
    """With nothing of ours in flight, a call is written as it is made (no loop turn waited)."""
    lane, writes = await recorded_writes(backend)
    assert lane.pending == 0
    first = lane.call(resp.pack("PING"))
    assert len(writes) == 1  # already on its way
    second = lane.call(resp.pack("PING"))
    assert len(writes) == 1  # Redis has ours to work on: this one waits for company
    assert await first == b"PONG"
    assert await second == b"PONG"
    assert len(writes) == 2


async def test_concurrent_calls_share_writes_in_batches(
    backend: RedisBackend, inspect: redis.asyncio.Redis
) -> None:
    """Decisions made together go out in writes of at most 8 calls, each still one
    EVALSHA: Redis works on one batch while the next is built."""
    _, writes = await recorded_writes(backend)
    before = await evalsha_calls(inspect)
    keys = [StoreKey("images", "per-key", f"{i:032x}") for i in range(50)]
    verdicts = await asyncio.gather(*(backend.decide([BucketCheck(k, 1.0, 5, 1)]) for k in keys))
    assert all(v.results[0].remaining == 4 for v in verdicts)
    per_write = [data.count(b"EVALSHA") for data in writes]
    assert sum(per_write) == 50
    assert max(per_write) <= 8
    assert len(writes) <= 50 // 8 + 2  # batches, not a write per call
    assert await evalsha_calls(inspect) - before == 50


async def test_a_stalled_event_loop_does_not_time_out_an_answered_call(redis_url: str) -> None:
    """A reply that arrived while this process's loop was blocked is not a timeout."""
    backend = RedisBackend(redis_url, timeout=0.05, connect_timeout=0.05)
    try:
        await backend.decide([BucketCheck(USER, 1.0, 5, 0)])
        call = asyncio.ensure_future(backend.decide([BucketCheck(USER, 1.0, 5, 1)]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the call is written
        time.sleep(0.2)  # noqa: ASYNC251 - blocking the loop, four timeouts long, is the point
        assert (await call).admitted
    finally:
        await backend.aclose()


async def test_a_stalled_event_loop_does_not_fail_a_connect(redis_url: str) -> None:
    """A connection that completed while the loop was blocked counts as connected."""
    backend = RedisBackend(redis_url, timeout=0.05, connect_timeout=0.05)
    try:
        call = asyncio.ensure_future(backend.decide([BucketCheck(USER, 1.0, 5, 1)]))
        for _ in range(3):  # the connect is under way
            await asyncio.sleep(0)
        time.sleep(0.2)  # noqa: ASYNC251 - blocking the loop is the point
        assert (await call).admitted
    finally:
        await backend.aclose()


async def test_cancelled_callers_leave_replies_in_step(backend: RedisBackend) -> None:
    """Cancelling calls in flight drops their replies in order; later calls get their own."""
    keys = [StoreKey("images", "per-key", f"{i:032x}") for i in range(10)]
    await backend.decide([BucketCheck(keys[0], 1.0, 5, 0)])
    calls = [asyncio.ensure_future(backend.decide([BucketCheck(k, 1.0, 5, 1)])) for k in keys]
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # written
    for call in calls[::2]:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    # Each bucket now has a distinct burst: a reply matched to the wrong caller would show.
    verdicts = await asyncio.gather(
        *(backend.decide([BucketCheck(k, 1.0, 10 + i, 0)]) for i, k in enumerate(keys))
    )
    assert [v.results[0].remaining for v in verdicts] == [10 + i - 1 for i in range(10)]


async def test_works_without_hiredis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without hiredis the pure-Python reply parser serves the same answers."""
    monkeypatch.setattr(lane_module, "_HiredisReader", None)
    backend = RedisBackend(redis_url)
    try:
        results = [
            (await backend.decide([BucketCheck(USER, 0.5, 2, 1)])).results[0] for _ in range(3)
        ]
        assert [(r.admitted, r.remaining) for r in results] == [(True, 1), (True, 0), (False, 0)]
        assert results[2].retry_after == pytest.approx(0.5, abs=0.05)
        assert isinstance(backend.guard.transport._lane._reader, resp.RespReader)  # type: ignore[attr-defined]
    finally:
        await backend.aclose()


replies = st.recursive(
    st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.binary(max_size=40),
        st.none(),
        st.builds(lambda t: ("+", t), st.text("abcOK -", max_size=10)),
        st.builds(lambda t: ("-", t), st.text("abcERR NOSCRIPT", min_size=1, max_size=20)),
    ),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


def _resp(value: object) -> bytes:
    if isinstance(value, tuple):
        return f"{value[0]}{value[1]}\r\n".encode()
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    assert isinstance(value, list)
    return b"*%d\r\n" % len(value) + b"".join(_resp(v) for v in value)


def _comparable(value: object) -> object:
    if isinstance(value, Exception):
        return ("error", str(value))
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


@settings(max_examples=100, deadline=None)
@given(values=st.lists(replies, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 400)))
def test_resp_reader_parses_like_hiredis(values: list[object], cuts: list[int]) -> None:
    """The fallback parser gives hiredis's replies for any stream, split anywhere."""
    stream = b"".join(_resp(v) for v in values)
    ours = resp.RespReader()
    theirs = hiredis.Reader(replyError=redis.exceptions.ResponseError)
    got: tuple[list[object], list[object]] = ([], [])
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    for start, end in itertools.pairwise(bounds):
        for reader, out in ((ours, got[0]), (theirs, got[1])):
            reader.feed(stream[start:end])
            while (reply := reader.gets()) is not False:
                out.append(_comparable(reply))
    assert got[0] == got[1]
    assert len(got[0]) == len(values)


async def test_unix_socket_url_with_a_database(redis_server: RedisServer, redis_url: str) -> None:
    """unix:// URLs work, and ?db= selects the database the keys land in."""
    backend = RedisBackend(f"unix://{redis_server.unix_socket}?db=2")
    db2 = redis.asyncio.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/2")
    try:
        assert (await backend.decide([BucketCheck(USER, 1.0, 5, 1)])).admitted
        assert await db2.exists(backend.keys.bucket(USER)) == 1
    finally:
        await backend.aclose()
        await db2.aclose()


async def test_password_and_database_from_the_url() -> None:
    """AUTH and SELECT come from the URL; a wrong password is a BackendError."""
    server = start_redis("--requirepass", "s3cret")
    try:
        good = RedisBackend(f"redis://:s3cret@127.0.0.1:{server.port}/1")
        bad = RedisBackend(f"redis://:wrong@127.0.0.1:{server.port}/1")
        db1 = redis.asyncio.Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/1")
        try:
            assert (await good.decide([BucketCheck(USER, 1.0, 5, 1)])).admitted
            assert await db1.exists(good.keys.bucket(USER)) == 1
            with pytest.raises(BackendError) as caught:
                await bad.decide([BucketCheck(USER, 1.0, 5, 1)])
            assert isinstance(caught.value.__cause__, redis.exceptions.ResponseError)
        finally:
            await good.aclose()
            await bad.aclose()
            await db1.aclose()
    finally:
        server.close()


async def test_host_names_are_resolved(redis_server: RedisServer, redis_url: str) -> None:
    """A host name resolves; addresses that refuse (::1 here) are skipped for the next."""
    backend = RedisBackend(f"redis://localhost:{redis_server.port}/0")
    try:
        assert (await backend.decide([BucketCheck(USER, 1.0, 5, 1)])).admitted
    finally:
        await backend.aclose()


async def test_nothing_listening_fails_at_once() -> None:
    """A port nobody listens on is a ConnectionError at once, not a timeout."""
    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0")
    try:
        started = time.perf_counter()
        with pytest.raises(BackendError) as caught:
            await backend.decide([BucketCheck(USER, 1.0, 5, 1)])
        assert time.perf_counter() - started < 0.05
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
    finally:
        await backend.aclose()


# -- the circuit breaker ------------------------------------------------------------------

TAKE = BucketCheck(USER, 1.0, 50, 1)


def state(backend: RedisBackend) -> str:
    """The breaker's state, read afresh (a call, so type checkers do not narrow it)."""
    return backend.breaker.state


async def _fail_until_open(backend: RedisBackend) -> list[type[BaseException]]:
    """Call until the breaker refuses; the causes seen on the way."""
    causes: list[type[BaseException]] = []
    for _ in range(10):
        try:
            await backend.decide([TAKE])
        except BackendUnavailable:
            return causes
        except BackendError as exc:
            causes.append(type(exc.__cause__ or exc))
    raise AssertionError(f"the breaker never opened: {causes}")


def test_a_breaker_can_be_passed_in() -> None:
    """breaker= is used as given; its state is readable as state(backend)."""
    breaker = CircuitBreaker(failures=5, reset_after=2.0)
    backend = RedisBackend(breaker=breaker)
    assert backend.breaker is breaker
    assert state(backend) == "closed"


async def test_an_open_breaker_fails_at_once_without_touching_redis(
    private_redis: RedisServer,
) -> None:
    """After breaker_failures failures to connect, calls raise BackendUnavailable, uncalled."""
    backend = RedisBackend(private_redis.url, breaker_failures=3, breaker_reset=60.0)
    try:
        await backend.decide([TAKE])
        private_redis.stop()
        assert await _fail_until_open(backend) == [redis.exceptions.ConnectionError] * 3
        assert state(backend) == "open"
        private_redis.start()  # back, but the breaker keeps its pause
        connections = private_redis.info("total_connections_received")
        started = time.perf_counter()
        for _ in range(1000):
            with pytest.raises(BackendUnavailable):
                await backend.decide([TAKE])
        per_call = (time.perf_counter() - started) / 1000
        assert per_call < 0.001
        # Only our own INFO connected since.
        assert private_redis.info("total_connections_received") == connections + 1
    finally:
        await backend.aclose()


async def test_error_replies_never_open_the_breaker(private_redis: RedisServer) -> None:
    """Redis answering with an error (here OOM) is alive: the breaker stays closed."""
    backend = RedisBackend(private_redis.url, breaker_failures=2)
    admin = redis.asyncio.Redis.from_url(private_redis.url)
    try:
        await admin.config_set("maxmemory", "1")
        for _ in range(10):
            with pytest.raises(BackendError) as caught:
                await backend.decide([TAKE])
            assert isinstance(caught.value.__cause__, redis.exceptions.ResponseError)
            assert "OOM" in str(caught.value.__cause__)
        assert state(backend) == "closed"
        await admin.config_set("maxmemory", "0")
        assert (await backend.decide([TAKE])).admitted
    finally:
        await backend.aclose()
        await admin.aclose()


async def test_calls_failing_together_count_as_one_failure(private_redis: RedisServer) -> None:
    """A hung Redis times out a whole batch at once: one failure, not one per call in flight."""
    backend = RedisBackend(private_redis.url, timeout=0.05, breaker_failures=2)
    try:
        await backend.decide([TAKE])
        assert private_redis.pid is not None
        os.kill(private_redis.pid, signal.SIGSTOP)
        try:
            outcomes = await asyncio.gather(
                *(backend.decide([TAKE]) for _ in range(20)), return_exceptions=True
            )
        finally:
            os.kill(private_redis.pid, signal.SIGCONT)
        assert all(isinstance(o, BackendError) for o in outcomes)
        assert state(backend) == "closed"
        assert (await backend.decide([TAKE])).admitted
    finally:
        await backend.aclose()


async def test_the_breaker_recovers_when_redis_comes_back_without_its_scripts(
    private_redis: RedisServer,
) -> None:
    """Redis restarted (no scripts): the probe's new connection loads them all; breaker closed."""
    backend = RedisBackend(private_redis.url, breaker_reset=0.2)
    try:
        await backend.decide([TAKE])
        private_redis.stop()
        await _fail_until_open(backend)
        private_redis.start()
        with pytest.raises(BackendUnavailable):  # still pausing: Redis is not called
            await backend.decide([TAKE])
        await asyncio.sleep(0.25)
        assert (await backend.decide([TAKE])).admitted
        assert state(backend) == "closed"
        assert private_redis.info("number_of_cached_scripts") == len(SCRIPTS.all())
    finally:
        await backend.aclose()


async def test_one_probe_at_a_time_while_half_open(private_redis: RedisServer) -> None:
    """While the probe waits on a hung Redis, every other call fails at once."""
    backend = RedisBackend(private_redis.url, timeout=0.2, breaker_failures=1, breaker_reset=0.1)
    try:
        await backend.decide([TAKE])
        assert private_redis.pid is not None
        os.kill(private_redis.pid, signal.SIGSTOP)
        try:
            with pytest.raises(BackendError):
                await backend.decide([TAKE])
            assert state(backend) == "open"
            await asyncio.sleep(0.15)
            probe = asyncio.ensure_future(backend.decide([TAKE]))
            await asyncio.sleep(0.01)
            assert state(backend) == "half_open"
            started = time.perf_counter()
            for _ in range(100):
                with pytest.raises(BackendUnavailable):
                    await backend.decide([TAKE])
            assert time.perf_counter() - started < 0.05
            with pytest.raises(BackendError):
                await probe
            assert state(backend) == "open"
        finally:
            os.kill(private_redis.pid, signal.SIGCONT)
    finally:
        await backend.aclose()


async def test_a_cancelled_probe_still_settles_the_breaker(private_redis: RedisServer) -> None:
    """A probe whose caller is cancelled still reports its outcome: never stuck half-open."""
    backend = RedisBackend(private_redis.url, timeout=0.1, breaker_failures=1, breaker_reset=0.1)
    try:
        await backend.decide([TAKE])
        assert private_redis.pid is not None
        os.kill(private_redis.pid, signal.SIGSTOP)
        try:
            with pytest.raises(BackendError):
                await backend.decide([TAKE])
            await asyncio.sleep(0.15)
            probe = asyncio.ensure_future(backend.decide([TAKE]))
            await asyncio.sleep(0.01)
            probe.cancel()
            await asyncio.sleep(0.15)  # the probe's call times out behind the cancelled caller
            assert state(backend) == "open"
        finally:
            os.kill(private_redis.pid, signal.SIGCONT)
        await asyncio.sleep(0.15)
        assert (await backend.decide([TAKE])).admitted
        assert state(backend) == "closed"
    finally:
        await backend.aclose()


async def test_each_breaker_change_is_logged_once(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening and closing are logged once each, however many calls are refused between."""
    backend = RedisBackend(private_redis.url, breaker_reset=0.1)
    caplog.set_level(logging.INFO, logger="ratelimit")
    try:
        await backend.decide([TAKE])
        private_redis.stop()
        await _fail_until_open(backend)
        for _ in range(3):  # three pauses, three failed probes
            for _ in range(100):
                with contextlib.suppress(BackendError):
                    await backend.decide([TAKE])
            await asyncio.sleep(0.12)
        private_redis.start()
        assert (await backend.decide([TAKE])).admitted
        messages = [r.getMessage() for r in caplog.records if r.name == "ratelimit"]
        assert len(messages) == 2, messages
        assert "circuit breaker open" in messages[0]
        assert "ConnectionError" in messages[0]
        assert "circuit breaker closed" in messages[1]
    finally:
        await backend.aclose()


async def test_metrics_show_the_breaker_open_while_it_is(private_redis: RedisServer) -> None:
    """ratelimit_breaker_open is 0 while closed, 1 while open or probing, 0 once closed again."""
    registry = CollectorRegistry()
    backend = RedisBackend(private_redis.url, breaker_reset=0.1)
    middleware = RateLimitMiddleware(
        _plain_app,
        rules=[Rule("/x", limits=[TokenBucket("100/second", burst=100, key=keys.GLOBAL)])],
        backend=backend,
        metrics=Metrics(registry),
    )

    def gauge() -> float | None:
        return registry.get_sample_value("ratelimit_breaker_open")

    try:
        assert gauge() == 0
        private_redis.stop()
        await _fail_until_open(backend)
        assert gauge() == 1
        await asyncio.sleep(0.12)
        with contextlib.suppress(BackendError):
            await backend.decide([TAKE])  # a failed probe: still open
        assert gauge() == 1
        private_redis.start()
        await asyncio.sleep(0.12)
        assert (await backend.decide([TAKE])).admitted
        assert gauge() == 0
    finally:
        await middleware.aclose()


def test_metrics_without_a_breaker_show_no_breaker_gauge() -> None:
    """A backend without a breaker (memory) adds no ratelimit_breaker_open family."""
    registry = CollectorRegistry()
    RateLimitMiddleware(_plain_app, rules=[], metrics=Metrics(registry))
    assert "ratelimit_breaker_open" not in generate_latest(registry).decode()


async def _plain_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
