"""Turn what the clients saw into the side-by-side table and a one-line verdict.

Nothing here knows whether a run was protected: it counts attempts and
outcomes. Goodput is successful generations per second, counted when the
image arrived; latency percentiles are nearest-rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .client import Attempt, Outcome
from .runner import Run
from .trace import PHASES, PhaseName, Scenario, Tier

RETRY_AFTER_NOTE = (
    "Retry-After rows: retries sent after waiting the advertised time. Requests refused",
    "at the same moment are told the same time and race for what frees up then: the",
    "busier a key (429) or the fleet (503), the more of those retries lose.",
)
#: A run has recovered from the spike once every later second served this share of requests.
RECOVERED_SHARE = 0.8


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q` quantile (0 < q <= 1) of `values`, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class Honesty:
    """Retries sent after waiting out a refusal's `Retry-After`, and what became of them.

    An honest `Retry-After` means the limit that refused does not refuse the
    retry again; whether the retry is then served also depends on the other limits.
    """

    retried: int = 0
    served: int = 0
    refused_again: int = 0

    def served_text(self) -> str:
        if not self.retried:
            return "-"
        return f"{_percent(self.served, self.retried)} of {self.retried}"

    def again_text(self) -> str:
        return "-" if not self.retried else _percent(self.refused_again, self.retried)


@dataclass(frozen=True, slots=True)
class Summary:
    """The numbers of one run, all from client records."""

    label: str
    requests: int
    served: int
    served_by_tier: dict[Tier, tuple[int, int]]
    goodput: dict[PhaseName, float]
    latency: tuple[float | None, float | None]
    attempt_latency: tuple[float | None, float | None]
    spike_attempt_p99: float | None
    attempts: int
    timeouts: int
    errors: int
    refused: dict[int, int]
    honesty: dict[int, Honesty]
    #: Seconds after the spike until the run served RECOVERED_SHARE of every later second's
    #: requests; None if it never did before the trace ended.
    recovered_after: float | None
    elapsed: float
    loop_lag_p99: float | None


def summarise(run: Run, scenario: Scenario) -> Summary:
    """Count what the clients of `run` saw."""
    outcomes = run.outcomes
    attempts: list[Attempt] = [a for o in outcomes for a in o.attempts]
    served = [o for o in outcomes if o.served]
    bounds = scenario.phase_bounds()
    goodput: dict[PhaseName, float] = {}
    for phase in PHASES:
        start, end = bounds[phase]
        n = sum(1 for o in served if start <= o.attempts[-1].ended < end)
        goodput[phase] = n / (end - start) if end > start else 0.0
    by_tier: dict[Tier, tuple[int, int]] = {}
    for tier in ("paid", "free"):
        mine = [o for o in outcomes if o.arrival.tier == tier]
        by_tier[tier] = (sum(o.served for o in mine), len(mine))
    ok = [a for a in attempts if a.outcome == "ok"]
    spike_start, spike_end = bounds["spike"]
    honesty: dict[int, Honesty] = {}
    for status in (429, 503):
        after = [a for a in attempts if a.honours == status]
        honesty[status] = Honesty(
            len(after), sum(a.outcome == "ok" for a in after), sum(a.refused_again for a in after)
        )
    return Summary(
        label=run.label,
        requests=len(outcomes),
        served=len(served),
        served_by_tier=by_tier,
        goodput=goodput,
        latency=_p50_p99([o.latency for o in served]),
        attempt_latency=_p50_p99([a.latency for a in ok]),
        spike_attempt_p99=percentile(
            [a.latency for a in ok if spike_start <= a.ended < spike_end], 0.99
        ),
        attempts=len(attempts),
        timeouts=sum(a.outcome == "timeout" for a in attempts),
        errors=sum(a.outcome == "error" for a in attempts),
        refused={s: sum(a.status == s for a in attempts) for s in (429, 503)},
        honesty=honesty,
        recovered_after=_recovered_after(outcomes, scenario),
        elapsed=run.elapsed,
        loop_lag_p99=percentile(run.loop_lag, 0.99),
    )


def _p50_p99(values: list[float]) -> tuple[float | None, float | None]:
    return percentile(values, 0.5), percentile(values, 0.99)


def _recovered_after(outcomes: Sequence[Outcome], scenario: Scenario) -> float | None:
    """Seconds after the spike from which every 1 s of arrivals was mostly served."""
    start, end = scenario.spike_end, scenario.duration
    bins = max(1, math.ceil(end - start))
    asked, got = [0] * bins, [0] * bins
    for o in outcomes:
        if start <= o.arrival.at < end:
            i = min(bins - 1, int(o.arrival.at - start))
            asked[i] += 1
            got[i] += o.served
    recovered: float | None = None
    for i in reversed(range(bins)):
        if asked[i] and got[i] < RECOVERED_SHARE * asked[i]:
            break
        if asked[i]:
            recovered = float(i)
    return recovered


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pair(a: float | None, b: float | None) -> str:
    return f"{_seconds(a)} / {_seconds(b)}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%"


def _share(served: int, total: int) -> str:
    return "-" if not total else _percent(served, total)


def table(runs: Sequence[Summary], scenario: Scenario, timeout: float) -> str:
    """The side-by-side table, one column per run."""
    a, b = scenario.phase_bounds()["spike"]
    rows: list[tuple[str, list[str]]] = [
        ("requests (open loop)", [f"{s.requests}" for s in runs]),
        ("served", [f"{s.served} ({_share(s.served, s.requests)})" for s in runs]),
        ("goodput, images/s: normal", [f"{s.goodput['normal']:.1f}" for s in runs]),
        (f"  spike ({a:.0f}-{b:.0f} s, {scenario.spike_factor:g}x)",
         [f"{s.goodput['spike']:.1f}" for s in runs]),
        ("  recovery", [f"{s.goodput['recovery']:.1f}" for s in runs]),
        ("served latency p50 / p99, s", [_pair(*s.latency) for s in runs]),
        ("  (first try to image, retries included)", ["" for _ in runs]),
        ("successful attempt p50 / p99, s", [_pair(*s.attempt_latency) for s in runs]),
        ("attempts sent", [f"{s.attempts}" for s in runs]),
        (f"  timed out (client gives up at {timeout:g} s)", [f"{s.timeouts}" for s in runs]),
        ("  errors", [f"{s.errors}" for s in runs]),
        ("  refused 429 / 503", [f"{s.refused[429]} / {s.refused[503]}" for s in runs]),
        ("retried after a 429's Retry-After: served", [s.honesty[429].served_text() for s in runs]),
        ("  refused again by the same limit", [s.honesty[429].again_text() for s in runs]),
        ("retried after a 503's Retry-After: served", [s.honesty[503].served_text() for s in runs]),
        ("  refused again by the same limit", [s.honesty[503].again_text() for s in runs]),
        ("requests served: paid", [_share(*s.served_by_tier["paid"]) for s in runs]),
        ("  free", [_share(*s.served_by_tier["free"]) for s in runs]),
        ("recovered after the spike", [_recovery(s, scenario) for s in runs]),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    cols = [max(len(s.label), *(len(v[i]) for _, v in rows)) for i, s in enumerate(runs)]
    head = " " * width + "".join(f"  {s.label:>{w}}" for s, w in zip(runs, cols, strict=True))
    lines = [head, "-" * len(head)]
    for name, values in rows:
        cells = "".join(f"  {v:>{w}}" for v, w in zip(values, cols, strict=True))
        lines.append(f"{name:<{width}}{cells}".rstrip())
    lines += ["-" * len(head), *RETRY_AFTER_NOTE]
    return "\n".join(lines)


def _recovery(s: Summary, scenario: Scenario) -> str:
    if s.recovered_after is None:
        return f"not in {scenario.duration - scenario.spike_end:.0f} s"
    return f"within {s.recovered_after + 1:.0f} s"


def verdict(unprotected: Summary, protected: Summary, scenario: Scenario) -> list[str]:
    """One or two lines saying where protection made the difference (or that it did not)."""
    u, p = unprotected, protected
    a, b = scenario.phase_bounds()["spike"]
    refused = p.refused[429] + p.refused[503]
    if p.goodput["spike"] <= u.goodput["spike"]:
        return [
            f"In the spike ({a:.0f}-{b:.0f} s) protection did not raise goodput "
            f"({p.goodput['spike']:.1f} vs {u.goodput['spike']:.1f} images/s unprotected)."
        ]
    lines = [
        f"Protection saved the spike ({a:.0f}-{b:.0f} s): {p.goodput['spike']:.1f} images/s "
        f"served (successful attempts p99 {_seconds(p.spike_attempt_p99)} s) while "
        f"{refused} attempts were refused at once with Retry-After, against "
        f"{u.goodput['spike']:.1f} images/s and {u.timeouts} timed-out attempts unprotected."
    ]
    if p.recovered_after is not None and (
        u.recovered_after is None or p.recovered_after < u.recovered_after
    ):
        left = scenario.duration - b
        late = (
            f"had not recovered {left:.0f} s later, when the trace ended"
            if u.recovered_after is None
            else f"took {u.recovered_after + 1:.0f} s"
        )
        lines.append(
            f"After it, protected was serving again within {p.recovered_after + 1:.0f} s; "
            f"unprotected {late} ({p.goodput['recovery']:.1f} vs "
            f"{u.goodput['recovery']:.1f} images/s in the recovery phase)."
        )
    return lines
