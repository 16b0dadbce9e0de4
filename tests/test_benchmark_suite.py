"""The benchmark suite's entry point, without running a benchmark (no timings here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _suite(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_list_names_every_benchmark_and_runs_none() -> None:
    """`python -m benchmarks --list` names each benchmark and exits at once."""
    result = _suite("--list")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert names == [
        "accuracy",
        "http_overhead",
        "redis_decisions",
        "metrics_overhead",
        "queue_goodput",
        "queue_handoff",
        "key_flood",
        "weighted_slots",
        "token_accuracy",
    ]


def test_only_an_unknown_benchmark_is_a_usage_error() -> None:
    """`--only` with a name the suite does not have fails before setting anything up."""
    result = _suite("--only", "no-such-benchmark")
    assert result.returncode == 2
    assert "unknown benchmarks ['no-such-benchmark']" in result.stderr
