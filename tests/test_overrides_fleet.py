"""Live overrides across a real `uvicorn --workers 2` fleet on a real Redis.

One module-scoped fleet (tests/apps/overrides_app.py) on a redis-server of its
own. Every response names the answering worker (`x-pid`); requests go out on
fresh connections, so the kernel spreads them over both workers, and a test
waits until *each* worker shows the change. Propagation is measured from the
moment the store's write (and its PUBLISH) returned to the first response of
each worker that enforces the change; run with `-s` to see the numbers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import RedisServer, free_port, start_redis
from apps.overrides_app import rules
from redis.asyncio import Redis

from ratelimit import Override
from ratelimit.backends.redis.overrides import RedisOverrideStore
from ratelimit.policy.effective import check_override

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
PREFIX = "fleet"
#: The bound the tests hold propagation to (the aim is "about a second"; measured: ms).
PROPAGATION_BOUND = 3.0

pytestmark = pytest.mark.slow


@dataclass
class Fleet:
    """A running `uvicorn --workers 2` and the Redis it shares."""

    redis: RedisServer
    log: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    pids: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def start(self) -> None:
        """Start uvicorn on a free port; return once both workers have answered."""
        self.port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}",
            "OVERRIDES_APP_REDIS_URL": self.redis.url,
            "OVERRIDES_APP_PREFIX": PREFIX,
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "apps.overrides_app:create_app", "--factory",
                 "--workers", "2", "--host", HOST, "--port", str(self.port),
                 "--log-level", "warning"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        self.pids = set()
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=2) as c:
            while len(self.pids) < 2:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the fleet did not start:\n{self.log.read_text()}")
                try:
                    self.pids.add(c.get(f"{self.url}/probe").headers["x-pid"])
                except httpx.TransportError:
                    time.sleep(0.05)

    def stop(self) -> None:
        """Stop the fleet's process group (ours: started in its own session), by its id."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        self.proc = None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    redis = start_redis()
    fleet = Fleet(redis, tmp_path_factory.mktemp("fleet") / "uvicorn.log")
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()
        redis.close()


class Store:
    """The test's hand on the fleet's override store (as an operator's script would use it)."""

    def __init__(self, fleet: Fleet) -> None:
        self.client = Redis.from_url(fleet.redis_url)
        self.store = RedisOverrideStore(self.client, PREFIX)

    async def put(self, rule: str, limit: str | None = None, **change: Any) -> str:
        """Check `change` against the app's rules, then store it; return the new version.

        Returns after the write and its PUBLISH, as `ratelimit override set` does.
        """
        now = await self.store.sync_clock()
        expires = change.pop("expires_in", 60.0)
        override = Override(rule, limit, expires_at=now + expires, created_at=now, **change)
        check_override(override, rules())
        return await self.store.put(override.slot, override.to_json())

    async def clear(self, rule: str) -> str:
        _, version = await self.store.clear(rule, None)
        assert version is not None
        return version

    async def applied(self, fleet: Fleet, version: str) -> dict[str, float]:
        """When each worker applied `version` (`applied_at`, its wall clock), from its report."""
        deadline = time.monotonic() + 5
        while True:
            reports = await self.store.reports()
            got = {
                str(r["pid"]): float(r["applied_at"])
                for r in reports.values()
                if str(r["pid"]) in fleet.pids and r["version"] == version
            }
            if set(got) == fleet.pids:
                return got
            assert time.monotonic() < deadline, f"no report of version {version}: {reports}"
            await asyncio.sleep(0.01)

    async def raw(self) -> dict[bytes, bytes]:
        return dict(await self.client.hgetall(self.store.key))

    async def aclose(self) -> None:
        await self.client.aclose()


def fresh_client() -> httpx.AsyncClient:
    """No keep-alive: each request is a new connection, which either worker may accept."""
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=5)


async def until_each_worker(
    fleet: Fleet,
    client: httpx.AsyncClient,
    shows: Callable[[httpx.Response], bool],
    started: float,
    *,
    path: str = "/probe",
    timeout: float = 10.0,
) -> dict[str, float]:
    """Poll `path` until every worker answered once with a response that `shows` the change.

    Returns, per worker pid, seconds from `started` (perf_counter) to that response.
    """
    seen: dict[str, float] = {}
    while set(seen) < fleet.pids:
        replies = await asyncio.gather(*(client.get(f"{fleet.url}{path}") for _ in range(4)))
        now = time.perf_counter()
        for r in replies:
            pid = r.headers["x-pid"]
            if pid not in seen and shows(r):
                seen[pid] = now - started
        if now - started > timeout:
            raise AssertionError(f"after {timeout}s only {sorted(seen)} of {fleet.pids} changed")
    return seen


def policy(q: int) -> Callable[[httpx.Response], bool]:
    """Whether a /work response's policy field shows the per-key quota `q`."""
    return lambda r: r.headers.get("ratelimit-policy", "").startswith(f'"per-key";q={q};')


def status(code: int) -> Callable[[httpx.Response], bool]:
    return lambda r: r.status_code == code


def ratelimit(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    """The `ratelimit` command as an operator runs it, against the fleet's Redis."""
    env = {k: v for k, v in os.environ.items() if k != "RATELIMIT_REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "ratelimit", *args, "--redis", fleet.redis_url,
         "--prefix", PREFIX],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30, check=False,
    )  # fmt: skip


async def test_both_workers_enforce_a_bucket_tightened_by_the_cli(fleet: Fleet) -> None:
    """`ratelimit override set` tightens a bucket; both workers enforce it; clear undoes it."""
    done = ratelimit(fleet, "override", "set", "fleet", "per-key", "--rate", "3/hour",
                     "--for", "5m", "--reason", "fleet test")  # fmt: skip
    assert done.returncode == 0, done.stderr
    started = time.perf_counter()
    async with fresh_client() as c:
        took = await until_each_worker(fleet, c, policy(3), started, path="/work")
        assert max(took.values()) < PROPAGATION_BOUND
        # Both workers now admit 3 of one caller's requests between them, then refuse.
        by_status: dict[int, set[str]] = {200: set(), 429: set()}
        codes = []
        while len(by_status[429]) < 2 and len(codes) < 60:
            r = await c.get(f"{fleet.url}/work", headers={"x-api-key": "tight"})
            codes.append(r.status_code)
            by_status[r.status_code].add(r.headers["x-pid"])
        assert codes[:4] == [200, 200, 200, 429]
        assert codes.count(200) == 3
        assert by_status[429] == fleet.pids
        cleared = ratelimit(fleet, "override", "clear", "fleet")
        assert cleared.returncode == 0, cleared.stderr
        await until_each_worker(fleet, c, policy(1000), time.perf_counter(), path="/work")


async def test_the_configured_limit_returns_when_an_override_expires(fleet: Fleet) -> None:
    """An override lapses by itself on every worker at its expiry, no clear needed."""
    store = Store(fleet)
    try:
        await store.put("fleet", "per-key", rate="5/hour", expires_in=2.0)
        async with fresh_client() as c:
            await until_each_worker(fleet, c, policy(5), time.perf_counter(), path="/work")
            # The lapse: each worker's timer re-applies the configured rule.
            took = await until_each_worker(
                fleet, c, policy(1000), time.perf_counter(), path="/work"
            )
        assert 0.5 < max(took.values()) < 2.0 + PROPAGATION_BOUND
    finally:
        await store.aclose()


async def test_block_answers_503_with_the_message_on_every_worker(fleet: Fleet) -> None:
    """A block refuses on both workers with 503 and the operator's message; clear lifts it."""
    store = Store(fleet)
    try:
        await store.put("probe", block=True, message="Probing is paused for maintenance.")
        async with fresh_client() as c:
            await until_each_worker(fleet, c, status(503), time.perf_counter())
            r = await c.get(f"{fleet.url}/probe")
            assert r.status_code == 503
            assert json.loads(r.content)["detail"] == "Probing is paused for maintenance."
            assert r.headers["content-type"] == "application/problem+json"
            await store.clear("probe")
            await until_each_worker(fleet, c, status(200), time.perf_counter())
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fleet", "per-key", "--rate", "3 per fortnight", "--for", "1h"], "rate: expected a rate"),
        (["fleet", "nope", "--rate", "3/hour", "--for", "1h"], "limit: expected one of the limits"),
        (["fleet", "slots", "--rate", "3/hour", "--for", "1h"], "rate: expected a change"),
        (["flet", "--block", "--for", "1h"], "rule: expected one of the rules"),
        (["fleet", "per-key", "--factor", "0", "--for", "1h"], "factor: expected a number > 0"),
    ],
)
async def test_a_malformed_override_is_refused_by_the_cli_and_never_stored(
    fleet: Fleet, args: list[str], message: str
) -> None:
    """The CLI refuses it (exit 1, the field named), nothing is written, workers keep enforcing."""
    store = Store(fleet)
    try:
        before = await store.raw()
        done = ratelimit(fleet, "override", "set", *args)
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert done.stderr.startswith("ratelimit: override refused: ")
        assert message in done.stderr
        assert await store.raw() == before
        async with fresh_client() as c:
            replies = await asyncio.gather(*(c.get(f"{fleet.url}/work") for _ in range(6)))
        assert all(policy(1000)(r) for r in replies)
    finally:
        await store.aclose()


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[round(0.99 * (len(ordered) - 1))]
    return f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"


async def test_propagation_time_across_two_workers(fleet: Fleet) -> None:
    """Set and clear a block 20 times; each worker enforces each change well within the bound.

    Two measures, 40 samples per worker each (20 blocks, 20 clears), from the
    store's write returning: to each worker's first response that shows the
    change (polled, so it includes an HTTP round trip), and to the moment the
    worker applied it (`applied_at` in its report; same host, same clock).
    """
    store = Store(fleet)
    seen: list[float] = []
    applied: list[float] = []
    try:
        async with fresh_client() as c:
            for step in range(40):
                if step % 2 == 0:
                    version = await store.put("probe", block=True, message="propagation test")
                else:
                    version = await store.clear("probe")
                wall, started = time.time(), time.perf_counter()
                shows = status(503 if step % 2 == 0 else 200)
                seen += (await until_each_worker(fleet, c, shows, started)).values()
                applied += [at - wall for at in (await store.applied(fleet, version)).values()]
    finally:
        await store.aclose()
    print(
        f"\noverride propagation, 2 uvicorn workers on one Redis, {len(seen)} samples each:"
        f"\n  write returned -> worker applied it:       {percentiles(applied)}"
        f"\n  write returned -> worker's first response: {percentiles(seen)}"
    )
    assert len(seen) == len(applied) == 80
    assert max(seen) < PROPAGATION_BOUND


async def test_overrides_survive_an_app_restart(fleet: Fleet) -> None:
    """An override in force when the fleet restarts is enforced by the new workers at once."""
    store = Store(fleet)
    try:
        await store.put("fleet", "per-key", rate="7/hour", expires_in=300)
        async with fresh_client() as c:
            await until_each_worker(fleet, c, policy(7), time.perf_counter(), path="/work")
        old = set(fleet.pids)
        fleet.stop()
        fleet.start()
        assert fleet.pids.isdisjoint(old)
        async with fresh_client() as c:
            # The very first responses of the new workers: read at start-up, before serving.
            replies = await asyncio.gather(*(c.get(f"{fleet.url}/work") for _ in range(8)))
            assert all(policy(7)(r) for r in replies)
            await until_each_worker(fleet, c, policy(7), time.perf_counter(), path="/work")
        await store.clear("fleet")
    finally:
        await store.aclose()
