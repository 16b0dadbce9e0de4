"""Prometheus metrics (placeholder until the metrics work lands)."""

from __future__ import annotations

from typing import Any


def metrics_app(*args: Any, **kwargs: Any) -> Any:
    """Placeholder."""
    raise NotImplementedError("metrics_app is being built")
