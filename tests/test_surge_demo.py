"""The surge demo: its GPU model, its app, its config, its client and a short run of the driver."""

from __future__ import annotations

import asyncio
import io
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples.imagegen import keys
from examples.imagegen.app import CONFIG, FLEET_GPUS, create_app, render_png, work_for
from examples.imagegen.gpus import GPUPool, ProcessorSharing
from examples.surge.client import PNG_SIGNATURE, Attempt, Outcome, RetryPolicy, generate
from examples.surge.report import summarise, table
from examples.surge.runner import ROOT, Run
from examples.surge.trace import Arrival, Scenario, make_trace
from ratelimit import Concurrency, TokenBucket
from ratelimit.policy.config import load_config

# -- the processor-sharing model (pure, exact) ------------------------------------


def finish_times(gpus: int, jobs: list[tuple[str, float, float]]) -> dict[str, float]:
    """Add `(name, at, work)` jobs in time order and run the pool dry; when each finished."""
    pool: ProcessorSharing[str] = ProcessorSharing(gpus)
    done = []
    for name, at, work in sorted(jobs, key=lambda j: j[1]):
        done += pool.add(name, work, at)
    done += pool.advance(1e6)
    assert pool.running == 0
    return {str(f.job): f.at for f in done}


@pytest.mark.parametrize(
    ("gpus", "jobs", "expected"),
    [
        # At most one job per GPU: everyone runs at full speed.
        (4, [("a", 0, 1), ("b", 0, 2), ("c", 0, 3)], {"a": 1, "b": 2, "c": 3}),
        # Three jobs on two GPUs: each gets 2/3 of a GPU, all finish at 1.5.
        (2, [("a", 0, 1), ("b", 0, 1), ("c", 0, 1)], {"a": 1.5, "b": 1.5, "c": 1.5}),
        # A late arrival halves the first job's speed; it speeds up again when alone.
        (1, [("a", 0, 1), ("b", 0.5, 1)], {"a": 1.5, "b": 2.0}),
        # Four jobs on two GPUs at rate 1/2: the short ones end at 2, the rest at full speed.
        (2, [("a", 0, 1), ("b", 0, 1), ("c", 0, 2), ("d", 0, 2)], {"a": 2, "b": 2, "c": 3, "d": 3}),
        # Ten jobs on one GPU take ten times as long: the collapse of an overloaded fleet.
        (1, [(f"j{i}", 0, 0.5) for i in range(10)], {f"j{i}": 5.0 for i in range(10)}),
        # A job with no work finishes the moment it arrives.
        (1, [("a", 0, 1), ("z", 0.25, 0)], {"a": 1.0, "z": 0.25}),
    ],
)
def test_processor_sharing_finishes_jobs_at_exact_times(
    gpus: int, jobs: list[tuple[str, float, float]], expected: dict[str, float]
) -> None:
    """N jobs on G GPUs each progress at min(1, G/N): finish times follow exactly."""
    got = finish_times(gpus, jobs)
    assert got == {name: pytest.approx(at) for name, at in expected.items()}


def test_processor_sharing_reports_finishes_in_order_and_the_next_one() -> None:
    """advance() returns jobs in the order they finished; next_finish() predicts the first."""
    pool: ProcessorSharing[str] = ProcessorSharing(2, now=10.0)
    assert pool.next_finish() is None
    pool.add("long", 3.0, 10.0)
    pool.add("short", 1.0, 10.0)
    pool.add("mid", 2.0, 10.0)
    assert pool.rate() == pytest.approx(2 / 3)
    assert pool.next_finish() == pytest.approx(11.5)
    done = pool.advance(20.0)
    assert [f.job for f in done] == ["short", "mid", "long"]
    # short: 1.5 s at 2/3; mid: 1 more at 1 -> 12.5; long: 1 more at 1 -> 13.5.
    assert [f.at for f in done] == pytest.approx([11.5, 12.5, 13.5])


def test_cancelling_a_job_speeds_the_others_up() -> None:
    """A cancelled job stops taking its share from that moment."""
    pool: ProcessorSharing[str] = ProcessorSharing(1)
    pool.add("a", 1.0, 0.0)
    pool.add("b", 1.0, 0.0)
    assert pool.cancel("b", 0.5) == []
    assert pool.remaining("a") == pytest.approx(0.75)
    (done,) = pool.advance(2.0)
    assert done.job == "a"
    assert done.at == pytest.approx(1.25)


def test_processor_sharing_refuses_time_going_backwards_and_duplicate_jobs() -> None:
    """Misuse is an error, not a silently wrong simulation."""
    pool: ProcessorSharing[str] = ProcessorSharing(1, now=5.0)
    with pytest.raises(ValueError, match="time runs forward"):
        pool.advance(4.0)
    pool.add("a", 1.0, 5.0)
    with pytest.raises(ValueError, match="already running"):
        pool.add("a", 1.0, 5.0)
    with pytest.raises(ValueError, match="gpus"):
        ProcessorSharing(0)


async def test_gpu_pool_runs_jobs_on_the_event_loop_with_processor_sharing() -> None:
    """Two 0.1 s jobs on one GPU take 0.2 s each; cancelling one frees its share."""
    pool = GPUPool(1)
    took = await asyncio.gather(pool.run(0.1), pool.run(0.1))
    assert list(took) == pytest.approx([0.2, 0.2], abs=0.02)
    assert pool.statistics().finished == 2
    assert pool.statistics().gpu_seconds == pytest.approx(0.2)

    victim = asyncio.create_task(pool.run(10.0))
    await asyncio.sleep(0)
    assert pool.statistics().running == 1
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert pool.statistics().running == 0
    assert await pool.run(0.05) == pytest.approx(0.05, abs=0.02)


# -- the app -------------------------------------------------------------------------


def client_for(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_the_app_returns_a_real_png() -> None:
    """A generation answers with a PNG that Pillow opens, at the size asked for."""
    async with client_for(create_app(protect=False)) as client:
        r = await client.post(
            "/v1/images/generations",
            headers={"x-api-key": "free-01"},
            json={"prompt": "a lighthouse", "steps": 1, "size": "128x128"},
        )
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.content.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(r.content)) as image:
        image.load()
        assert image.format == "PNG"
        assert image.size == (128, 128)
    assert float(r.headers["x-gpu-seconds"]) == pytest.approx(work_for(1, "128x128"))
    assert render_png("a lighthouse", 64) == render_png("a lighthouse", 64)


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({}, {"prompt": "x"}, 401),
        ({"x-api-key": "free-01"}, {"prompt": ""}, 400),
        ({"x-api-key": "free-01"}, {"prompt": "x", "steps": 500}, 400),
        ({"x-api-key": "free-01"}, {"prompt": "x", "size": "9x9"}, 400),
        ({"x-api-key": "free-01"}, [1, 2], 400),
    ],
)
async def test_the_app_refuses_bad_requests(
    headers: dict[str, str], body: object, status: int
) -> None:
    """No key is 401; a bad body is 400; neither reaches the GPUs."""
    app = create_app(protect=False)
    async with client_for(app) as client:
        r = await client.post("/v1/images/generations", headers=headers, json=body)
    assert r.status_code == status
    assert app.state.pool.statistics().finished == 0


async def test_models_is_cheap_and_reports_the_fleet() -> None:
    """GET /v1/models lists the model and the fleet size."""
    async with client_for(create_app(protect=False)) as client:
        r = await client.get("/v1/models")
    assert r.status_code == 200
    assert r.json()["fleet"] == {"gpus": FLEET_GPUS, "running": 0}


# -- the config ----------------------------------------------------------------------


def test_the_toml_config_loads_with_a_bucket_per_tier_and_a_pool_sized_to_the_gpus() -> None:
    """The demo's config loads; its GPU pool matches the fleet; each tier meets one bucket."""
    settings = load_config(CONFIG)
    (rule,) = settings.rules
    assert rule.path == "/v1/images/generations"
    assert rule.methods == frozenset({"POST"})
    paid, free, pool = rule.limits
    assert isinstance(paid, TokenBucket)
    assert isinstance(free, TokenBucket)
    assert isinstance(pool, Concurrency)
    assert pool.limit == FLEET_GPUS
    assert pool.shared
    assert (pool.queue, pool.timeout) == (16, 2.0)
    assert dict(pool.guaranteed) == {pool.rank("paid"): 6, pool.rank("free"): 2}
    assert paid.interval < free.interval
    assert paid.burst > free.burst
    scope_paid = {"type": "http", "headers": [(b"x-api-key", b"paid-01")]}
    scope_free = {"type": "http", "headers": [(b"x-api-key", b"free-01")]}
    assert (paid.key(scope_paid), free.key(scope_paid)) == ("paid-01", None)
    assert (paid.key(scope_free), free.key(scope_free)) == (None, "free-01")
    assert keys.priority(scope_paid) > keys.priority(scope_free)
    assert pool.rank(keys.tier(scope_paid)) < pool.rank(keys.tier(scope_free))


async def test_the_protected_app_refuses_a_free_key_past_its_burst_but_not_a_paid_one() -> None:
    """Free keys get 3 back-to-back generations, then 429 with Retry-After; paid keys get more."""
    async with client_for(create_app(protect=True)) as client:

        async def ask(key: str) -> httpx.Response:
            body = {"prompt": "x", "steps": 1}
            return await client.post(
                "/v1/images/generations", headers={"x-api-key": key}, json=body
            )

        free = [(await ask("free-01")).status_code for _ in range(4)]
        paid = [(await ask("paid-01")).status_code for _ in range(4)]
        refused = await ask("free-01")
    assert free == [200, 200, 200, 429]
    assert paid == [200, 200, 200, 200]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["violated-policies"] == ["free-per-key"]


# -- the trace and the client ----------------------------------------------------------


def test_the_trace_is_seeded_poisson_with_a_tenfold_spike() -> None:
    """Same seed, same trace; arrival counts per phase match the rates."""
    scenario = Scenario(duration=300.0, normal_rate=6.0)
    trace = make_trace(scenario, seed=1)
    assert trace == make_trace(scenario, seed=1)
    assert [a.at for a in trace] == sorted(a.at for a in trace)
    bounds = scenario.phase_bounds()
    counts = {
        phase: sum(start <= a.at < end for a in trace) for phase, (start, end) in bounds.items()
    }
    normal = 6.0 * (bounds["normal"][1] - bounds["normal"][0])
    spike = 60.0 * (bounds["spike"][1] - bounds["spike"][0])
    assert counts["normal"] == pytest.approx(normal, rel=0.1)
    assert counts["spike"] == pytest.approx(spike, rel=0.05)
    paid = sum(a.tier == "paid" for a in trace if a.at < bounds["normal"][1])
    assert paid / counts["normal"] == pytest.approx(scenario.paid_share, abs=0.06)
    assert all(a.key.startswith(a.tier + "-") for a in trace)


def scripted_app(script: list[tuple[int, dict[str, str], float]]) -> Starlette:
    """Answers each POST with the next `(status, headers, delay)`; 200s carry a PNG."""
    answers = iter(script)

    async def endpoint(request: Request) -> Response:
        status, headers, delay = next(answers)
        await asyncio.sleep(delay)
        if status == 200:
            return Response(render_png("x", 64), media_type="image/png")
        body = {"violated-policies": ["free-per-key"]}
        return JSONResponse(body, status, headers, media_type="application/problem+json")

    return Starlette(routes=[Route("/v1/images/generations", endpoint, methods=["POST"])])


async def test_the_client_waits_out_retry_after_and_records_it() -> None:
    """A refused attempt is retried after its Retry-After, and the retry says so."""
    app = scripted_app([(429, {"retry-after": "0.05"}, 0), (200, {}, 0)])
    arrival = Arrival(0.0, "free-01", "free", 1, "x")
    async with client_for(app) as client:
        outcome = await generate(
            client, arrival, RetryPolicy(), clock=time.monotonic, rng=random.Random(0)
        )
    first, second = outcome.attempts
    assert (first.outcome, first.status, first.retry_after) == ("refused", 429, 0.05)
    assert first.violated == ("free-per-key",)
    assert (second.outcome, second.honours, second.refused_again) == ("ok", 429, False)
    assert second.started - first.ended >= 0.05
    assert outcome.served


async def test_the_client_gives_up_an_attempt_at_its_timeout_and_retries() -> None:
    """A slow answer is a timeout; the client backs off and tries again, at most max_retries."""
    app = scripted_app([(200, {}, 1.0), (200, {}, 1.0)])
    arrival = Arrival(0.0, "paid-01", "paid", 1, "x")
    policy = RetryPolicy(timeout=0.05, max_retries=1, initial_delay=0.01)
    async with client_for(app) as client:
        outcome = await generate(
            client, arrival, policy, clock=time.monotonic, rng=random.Random(0)
        )
    assert [a.outcome for a in outcome.attempts] == ["timeout", "timeout"]
    assert not outcome.served


def test_the_summary_counts_only_what_clients_saw() -> None:
    """Goodput, refusals and Retry-After honesty come straight from the attempt records."""
    scenario = Scenario(duration=10.0, spike_from=0.3, spike_to=0.6)

    def outcome(at: float, tier: str, *attempts: Attempt) -> Outcome:
        return Outcome(Arrival(at, f"{tier}-01", tier, 25, "x"), attempts)  # type: ignore[arg-type]

    policy = ("free-per-key",)
    outcomes = [
        outcome(1.0, "paid", Attempt(1.0, 1.5, "ok", 200)),
        outcome(4.0, "free", Attempt(4.0, 4.1, "refused", 429, 2.0, policy),
                Attempt(6.2, 6.7, "ok", 200, honours=429, honours_violated=policy)),
        outcome(4.5, "free", Attempt(4.5, 4.6, "refused", 429, 2.0, policy),
                Attempt(6.6, 6.7, "refused", 429, 1.0, policy, 429, policy)),
        outcome(5.0, "paid", Attempt(5.0, 11.0, "timeout")),
        outcome(7.0, "paid", Attempt(7.0, 7.5, "ok", 200)),
    ]  # fmt: skip
    s = summarise(Run("r", outcomes, 11.0), scenario)
    assert (s.requests, s.served, s.attempts, s.timeouts) == (5, 3, 7, 1)
    assert s.refused == {429: 3, 503: 0}
    assert s.goodput == {"normal": pytest.approx(1 / 3), "spike": 0.0, "recovery": 0.5}
    assert (s.honesty[429].retried, s.honesty[429].served, s.honesty[429].refused_again) == (
        2, 1, 1
    )  # fmt: skip
    assert s.served_by_tier == {"paid": (2, 3), "free": (1, 2)}
    assert "goodput" in table([s, s], scenario, timeout=6.0)


# -- the driver ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_short_surge_run_prints_the_table_and_writes_the_chart(tmp_path: Path) -> None:
    """`python -m examples.surge` with a tiny trace completes, prints both columns, draws a PNG."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [
            sys.executable, "-m", "examples.surge", "--duration", "3", "--client-timeout", "1.5",
            "--max-retries", "1", "--out", str(tmp_path), "--quiet",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "unprotected" in out
    assert "protected" in out
    for row in ("goodput, images/s", "refused 429 / 503", "requests served: paid", "p50 / p99"):
        assert row in out
    chart = tmp_path / "surge.png"
    assert f"chart: {chart}" in out
    assert chart.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(chart) as image:
        assert image.size[0] > 1000
