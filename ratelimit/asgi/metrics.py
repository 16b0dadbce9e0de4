"""Prometheus metrics (being built in this session: issue 5)."""

from __future__ import annotations

from typing import Any

from ..policy.engine import Decision, Engine
from ..policy.rules import Rule


class Metrics:
    """Instruments for one registry; the middleware calls the observe_* methods."""

    def attach(self, engine: Engine) -> None:
        """Called once by the middleware: register effective-limit gauges etc. for `engine`."""

    def observe_decision(self, decision: Decision, seconds: float) -> None:
        """Called after every decision (allowed or refused) with its latency."""

    def observe_failure(self, rule: Rule, policy: str, exc: BaseException) -> None:
        """Called when the backend failed and `policy` ("open"/"closed"/"local") applies."""


def metrics_app(*args: Any, **kwargs: Any) -> Any:
    """Placeholder."""
    raise NotImplementedError("metrics_app is being built")
