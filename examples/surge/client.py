"""A client that behaves like a real API SDK, and records what it saw.

Each generation is tried up to `1 + max_retries` times, each attempt bounded
by `timeout`. A `429` or `503` with a `Retry-After` of at most a minute is
retried after exactly that wait; timeouts, connection errors and other
`408`/`409`/`5xx` answers after an exponential backoff with jitter (0.5 s,
1 s, ... up to 8 s). That is the policy of common SDKs (e.g. openai-python).
Every number the demo prints comes from these records.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import httpx

from .trace import Arrival

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AttemptOutcome = Literal["ok", "refused", "timeout", "error"]
_RETRYABLE_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the client retries: attempts, per-attempt timeout and backoff, in seconds."""

    timeout: float = 6.0
    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    #: A longer Retry-After is not waited for; the client backs off instead.
    max_retry_after: float = 60.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """One HTTP attempt, times in seconds since the run began."""

    started: float
    ended: float
    outcome: AttemptOutcome
    #: The HTTP status, or None when no answer came (timeout, connection error).
    status: int | None = None
    #: The `Retry-After` of a refusal, in seconds.
    retry_after: float | None = None
    #: The limits a refusal names (its problem body's `violated-policies`).
    violated: tuple[str, ...] = ()
    #: This attempt was sent after waiting out the `Retry-After` of a refusal with this status.
    honours: int | None = None
    #: ... and the limits that refusal named.
    honours_violated: tuple[str, ...] = ()

    @property
    def refused_again(self) -> bool:
        """Sent after waiting out a `Retry-After`, and refused again by a limit named then."""
        return self.outcome == "refused" and bool(set(self.violated) & set(self.honours_violated))

    @property
    def latency(self) -> float:
        """Seconds from sending to the answer (or to giving up)."""
        return self.ended - self.started


@dataclass(frozen=True, slots=True)
class Outcome:
    """Everything that happened to one requested generation."""

    arrival: Arrival
    attempts: tuple[Attempt, ...]

    @property
    def served(self) -> bool:
        """Whether the caller got its image in the end."""
        return self.attempts[-1].outcome == "ok"

    @property
    def latency(self) -> float:
        """Seconds from the first attempt to the last answer, retries and waits included."""
        return self.attempts[-1].ended - self.attempts[0].started


@dataclass(slots=True)
class Tally:
    """Live counters for progress lines while a run plays."""

    sent: int = 0
    in_flight: int = 0
    served: int = 0
    refused: int = 0
    timeouts: int = 0
    errors: int = 0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` field in delay-seconds form (HTTP dates are not sent here)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def violated_policies(response: httpx.Response) -> tuple[str, ...]:
    """The `violated-policies` of a problem+json refusal (empty if there are none)."""
    if "json" not in response.headers.get("content-type", ""):
        return ()
    try:
        body = response.json()
    except ValueError:
        return ()
    names = body.get("violated-policies") if isinstance(body, dict) else None
    if not isinstance(names, list):
        return ()
    return tuple(n for n in names if isinstance(n, str))


def _retryable(attempt: Attempt) -> bool:
    if attempt.outcome in ("timeout", "refused"):
        return True
    if attempt.status is None:
        return True  # a connection error
    return attempt.status in _RETRYABLE_STATUS or attempt.status >= 500


async def generate(
    client: httpx.AsyncClient,
    arrival: Arrival,
    policy: RetryPolicy,
    *,
    clock: Callable[[], float],
    rng: random.Random,
    tally: Tally | None = None,
) -> Outcome:
    """Ask for one generation the way an SDK would; `clock()` is seconds since the run began."""
    tally = tally if tally is not None else Tally()
    body = {"prompt": arrival.prompt, "steps": arrival.steps, "size": "64x64"}
    headers = {"x-api-key": arrival.key}
    attempts: list[Attempt] = []
    honours: int | None = None
    honours_violated: tuple[str, ...] = ()
    tally.in_flight += 1
    try:
        for n in range(policy.max_retries + 1):
            started = clock()
            tally.sent += 1
            status: int | None = None
            retry_after: float | None = None
            violated: tuple[str, ...] = ()
            try:
                response = await asyncio.wait_for(
                    client.post("/v1/images/generations", json=body, headers=headers),
                    policy.timeout,
                )
            except asyncio.TimeoutError:
                outcome: AttemptOutcome = "timeout"
                tally.timeouts += 1
            except (httpx.TransportError, OSError):
                outcome = "error"
                tally.errors += 1
            else:
                status = response.status_code
                if status == 200 and response.content.startswith(PNG_SIGNATURE):
                    outcome = "ok"
                    tally.served += 1
                elif status in (429, 503):
                    outcome = "refused"
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                    violated = violated_policies(response)
                    tally.refused += 1
                else:
                    outcome = "error"
                    tally.errors += 1
            attempt = Attempt(
                started, clock(), outcome, status, retry_after, violated, honours, honours_violated
            )
            attempts.append(attempt)
            if outcome == "ok" or n == policy.max_retries or not _retryable(attempt):
                break
            if retry_after is not None and 0 < retry_after <= policy.max_retry_after:
                delay, honours, honours_violated = retry_after, status, violated
            else:
                backoff = min(policy.initial_delay * 2**n, policy.max_delay)
                delay, honours, honours_violated = backoff * (1 - 0.25 * rng.random()), None, ()
            await asyncio.sleep(delay)
    finally:
        tally.in_flight -= 1
    return Outcome(arrival, tuple(attempts))
