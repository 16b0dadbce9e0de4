"""Draw both runs over time: what the clients got each second, and how long it took.

One column per run, same scales. Top: images served per second (goodput)
against the fleet's capacity. Middle: attempts that failed each second, by
how (refused 429, refused 503, timed out, error), beside the new requests
offered. Bottom: the latency of each successful attempt and its p50/p99 per
second, with the client's timeout. Events count when the answer (or the
timeout) came; the spike is shaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .client import Attempt
from .report import percentile
from .runner import Run
from .trace import Scenario

#: (label, colour, which attempts) for the failures panel.
_FAILURES: tuple[tuple[str, str, str], ...] = (
    ("refused 429 (caller's quota)", "#f4a300", "429"),
    ("refused 503 (GPUs full)", "#d1495b", "503"),
    ("timed out (client gave up)", "#6a3d9a", "timeout"),
    ("error", "#222222", "error"),
)


def _kind(a: Attempt) -> str:
    if a.outcome == "refused":
        return str(a.status)
    return a.outcome


def _per_second(times: list[float], bins: int) -> list[int]:
    counts = [0] * bins
    for t in times:
        counts[min(bins - 1, max(0, int(t)))] += 1
    return counts


def write_chart(
    runs: Sequence[Run],
    scenario: Scenario,
    *,
    timeout: float,
    capacity: float,
    path: Path,
    title: str,
) -> Path:
    """Draw `runs` side by side into the PNG file `path`; return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([scenario.duration, *(r.elapsed for r in runs)])
    bins = max(1, math.ceil(end))
    xs = [i + 0.5 for i in range(bins)]
    fig, axes = plt.subplots(
        3, len(runs), figsize=(7 * len(runs), 11), sharex=True, sharey="row", squeeze=False
    )
    a, b = scenario.spike_start, scenario.spike_end
    for col, run in enumerate(runs):
        top, middle, bottom = (axes[row][col] for row in range(3))
        attempts = [x for o in run.outcomes for x in o.attempts]
        ok = [x for x in attempts if x.outcome == "ok"]

        served = _per_second([x.ended for x in ok], bins)
        top.plot(xs, served, color="#2a9d3f", linewidth=2, label="images served")
        top.axhline(
            capacity, color="#888888", linestyle="--", label=f"fleet capacity (~{capacity:.0f}/s)"
        )
        top.set_title(f"{run.label}: goodput")
        top.set_ylabel("images served / s")

        offered = _per_second([o.arrival.at for o in run.outcomes], bins)
        middle.plot(xs, offered, color="#888888", linestyle="--", label="new requests (offered)")
        for label, colour, kind in _FAILURES:
            counts = _per_second([x.ended for x in attempts if _kind(x) == kind], bins)
            if any(counts):
                middle.plot(xs, counts, color=colour, label=label, linewidth=1.6)
        middle.set_title(f"{run.label}: attempts that failed, by what the client got")
        middle.set_ylabel("attempts / s")

        bottom.scatter(
            [x.ended for x in ok], [x.latency for x in ok], s=4, alpha=0.25,
            color="#2a9d3f", label="one successful attempt",
        )  # fmt: skip
        per_bin: list[list[float]] = [[] for _ in range(bins)]
        for x in ok:
            per_bin[min(bins - 1, int(x.ended))].append(x.latency)
        for q, style, name in ((0.5, "-", "p50"), (0.99, ":", "p99")):
            ys = [percentile(v, q) if v else math.nan for v in per_bin]
            bottom.plot(xs, ys, color="#14532d", linestyle=style, label=f"{name} per second")
        bottom.axhline(
            timeout, color="#6a3d9a", linestyle="--", label=f"client timeout ({timeout:g} s)"
        )
        bottom.set_title(f"{run.label}: latency of successful attempts")
        bottom.set_ylabel("latency (s)")
        bottom.set_xlabel("time since the trace started (s)")
        bottom.set_ylim(0, timeout * 1.1)
        for ax in (top, middle, bottom):
            ax.axvspan(a, b, color="#d1495b", alpha=0.08, label=f"{scenario.spike_factor:g}x spike")
            ax.axvline(scenario.duration, color="#888888", linewidth=0.8, label="trace ends")
            ax.grid(alpha=0.3)
            ax.set_xlim(0, end)
            ax.legend(loc="center right" if ax is top else "upper right", fontsize=8)
    axes[0][0].set_ylim(0, capacity * 1.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
