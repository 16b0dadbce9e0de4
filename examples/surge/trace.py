"""The traffic the surge demo plays: an open-loop Poisson trace with a 10x spike.

Open loop means arrivals follow the clock, not the answers: a slow server does
not slow the arrivals down, as with real users. The trace is drawn once from a
seed, so the unprotected and the protected runs face the same requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Tier = Literal["free", "paid"]
PhaseName = Literal["normal", "spike", "recovery"]
PHASES: tuple[PhaseName, ...] = ("normal", "spike", "recovery")


@dataclass(frozen=True, slots=True)
class Arrival:
    """One generation a caller asks for, at `at` seconds after the run starts."""

    at: float
    key: str
    tier: Tier
    steps: int
    prompt: str


@dataclass(frozen=True, slots=True)
class Scenario:
    """The shape of the trace: rates, phases and callers.

    `normal_rate` requests per second arrive in the normal and recovery
    phases and `spike_factor` times as many during the spike, which covers
    `spike_from` to `spike_to` as fractions of `duration`. Outside the spike
    `paid_share` of the traffic comes from `paid_keys` paid keys, the rest from
    `free_keys` free ones. The surge is a viral moment: paid traffic grows
    `paid_spike_factor` times (customers have contracts and budgets) and free
    traffic makes up the rest of the spike (about 15x by default). `steps` are
    the choices of denoising steps (25 steps are 0.5 GPU-seconds).
    """

    duration: float = 32.0
    normal_rate: float = 6.0
    spike_factor: float = 10.0
    spike_from: float = 0.35
    spike_to: float = 0.65
    paid_share: float = 0.4
    paid_spike_factor: float = 3.0
    paid_keys: int = 4
    free_keys: int = 12
    steps: tuple[int, ...] = (20, 25, 30)

    def __post_init__(self) -> None:
        if not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration!r}")
        if not 0 <= self.spike_from < self.spike_to <= 1:
            raise ValueError("the spike must lie within the trace: 0 <= spike_from < spike_to <= 1")
        if not 0 <= self.paid_share <= 1:
            raise ValueError(f"paid_share must be between 0 and 1, got {self.paid_share!r}")
        if self.free_factor() < 0:
            raise ValueError("paid_spike_factor is larger than the whole spike allows")

    @property
    def spike_start(self) -> float:
        """When the spike begins, in seconds."""
        return self.duration * self.spike_from

    @property
    def spike_end(self) -> float:
        """When the spike ends, in seconds."""
        return self.duration * self.spike_to

    def phase_bounds(self) -> dict[PhaseName, tuple[float, float]]:
        """Each phase's `(start, end)` in seconds."""
        return {
            "normal": (0.0, self.spike_start),
            "spike": (self.spike_start, self.spike_end),
            "recovery": (self.spike_end, self.duration),
        }

    def free_factor(self) -> float:
        """How many times free traffic grows in the spike, for all of it to grow `spike_factor`."""
        free_share = 1.0 - self.paid_share
        if free_share == 0:
            return 0.0
        return (self.spike_factor - self.paid_share * self.paid_spike_factor) / free_share

    def rate_at(self, t: float, tier: Tier) -> float:
        """Requests per second offered by `tier` at time `t`."""
        if tier == "paid":
            share, factor = self.paid_share, self.paid_spike_factor
        else:
            share, factor = 1.0 - self.paid_share, self.free_factor()
        spiking = self.spike_start <= t < self.spike_end
        return self.normal_rate * share * (factor if spiking else 1.0)

    def keys(self, tier: Tier) -> list[str]:
        """The API keys of a tier."""
        n = self.paid_keys if tier == "paid" else self.free_keys
        return [f"{tier}-{i:02d}" for i in range(1, n + 1)]


def make_trace(scenario: Scenario, seed: int) -> list[Arrival]:
    """Poisson arrivals at the scenario's piecewise-constant rates, in time order.

    Each tier is its own Poisson process; a request's key is drawn uniformly
    from its tier's keys, so each key is a Poisson caller too.
    """
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    tiers: tuple[Tier, ...] = ("paid", "free")
    for start, end in scenario.phase_bounds().values():
        for tier in tiers:
            rate = scenario.rate_at(start, tier)
            if rate <= 0 or end <= start:
                continue
            keys = scenario.keys(tier)
            # Memoryless: restarting the clock at a phase boundary keeps the process Poisson.
            t = start + rng.expovariate(rate)
            while t < end:
                steps = rng.choice(scenario.steps)
                arrivals.append(Arrival(t, rng.choice(keys), tier, steps, ""))
                t += rng.expovariate(rate)
    arrivals.sort(key=lambda a: a.at)
    return [
        Arrival(a.at, a.key, a.tier, a.steps, f"a lighthouse in a storm, study {n}")
        for n, a in enumerate(arrivals)
    ]
