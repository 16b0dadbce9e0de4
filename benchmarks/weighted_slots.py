"""Weighted slots: light (1 slot) and heavy (4 slots) requests in one waiting line.

A pool of 8 slots with a line of 64 in front (timeout 30 s), as
`Concurrency(8, counts=..., queue=64, timeout=30)`. Requests arrive as a Poisson
stream, 3 light to 1 heavy, asking `load` times the slot-seconds the pool has;
each holds its slots for an exponential service time (mean 1 s). The line is
`algorithms.queue` itself (`enqueue`, `hand_off`) run on simulated time: the
policy is what is measured, not I/O (the memory backend runs these same steps
and the Redis scripts are held equal to them by tests), so a run takes seconds
and is exactly repeatable. Three hand-off policies on the same arrivals:

- `budget = limit` (this library): lighter waiters may take one pool's worth of
  slots past a head that does not fit, then the head reserves freed slots;
- `budget = 0`: strict reservation, nobody passes a head that does not fit;
- unbounded backfill: any waiter that fits takes a free slot.

    .venv/bin/python -m benchmarks.weighted_slots            # ~10 s
    .venv/bin/python -m benchmarks.weighted_slots --quick    # ~2 s
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ratelimit.algorithms import queue
from ratelimit.algorithms.leases import weight_of, weighted_id

from . import _support

SECTION = "weighted_slots"
LIMIT, CAPACITY, TIMEOUT, SERVICE = 8, 64, 30.0, 1.0
LIGHT, HEAVY, HEAVY_SHARE = 1, 4, 0.25
POLICIES: dict[str, int | None] = {
    "budget = limit (this library)": None,
    "budget = 0 (strict reservation)": 0,
    "unbounded backfill": sys.maxsize,
}


@dataclass
class Klass:
    """What one class of request got."""

    offered: int = 0
    admitted: int = 0
    timed_out: int = 0
    full: int = 0
    waits: list[float] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        waits = sorted(self.waits)
        return waits[min(len(waits) - 1, int(q * len(waits)))] if waits else float("nan")


@dataclass
class Result:
    policy: str
    load: float
    classes: dict[int, Klass]
    utilisation: float


def simulate(
    budget: int | None, load: float, duration: float, seed: int
) -> tuple[dict[int, Klass], float]:
    """One run of `duration` simulated seconds; per-class outcomes and slot utilisation."""
    rng = random.Random(seed)
    demand = (1 - HEAVY_SHARE) * LIGHT + HEAVY_SHARE * HEAVY  # slots per request
    rate = load * LIMIT / (demand * SERVICE)
    state = queue.QueueState()
    live: set[str] = set()
    held = 0
    busy = 0.0  # slot-seconds
    last = 0.0
    arrived: dict[str, float] = {}
    #: Each request's service time, drawn when it arrives: every policy sees the same.
    service: dict[str, float] = {}
    classes = {LIGHT: Klass(), HEAVY: Klass()}
    events: list[tuple[float, int, str, str]] = []
    seq = 0

    def at(when: float, kind: str, what: str) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (when, seq, kind, what))

    def admit(ticket: str, now: float) -> None:
        nonlocal held
        live.add(ticket)
        held += weight_of(ticket)
        classes[weight_of(ticket)].admitted += 1
        classes[weight_of(ticket)].waits.append(now - arrived.pop(ticket))
        at(now + service.pop(ticket), "done", ticket)

    def serve(now: float) -> None:
        for waiter in queue.hand_off(state, live, LIMIT, {}, budget):
            admit(waiter.ticket, now)

    at(rng.expovariate(rate), "arrive", "")
    n = 0
    while events:
        now, _, kind, what = heapq.heappop(events)
        if now > duration:
            break
        busy += held * (now - last)
        last = now
        if kind == "arrive":
            n += 1
            weight = HEAVY if rng.random() < HEAVY_SHARE else LIGHT
            ticket = queue.ticket_id(0, weighted_id(f"r{n}", weight))
            classes[weight].offered += 1
            arrived[ticket] = now
            service[ticket] = rng.expovariate(1 / SERVICE)
            at(now + rng.expovariate(rate), "arrive", "")
            if not state.waiters and held + weight <= LIMIT:
                admit(ticket, now)
                continue
            step = queue.enqueue(
                state, ticket=ticket, rank=0, fair="", capacity=CAPACITY,
                max_position=CAPACITY, in_use={}, guaranteed={},
            )  # fmt: skip
            if step.outcome != "queued":
                classes[weight].full += 1
                del arrived[ticket], service[ticket]
                continue
            at(now + TIMEOUT, "timeout", ticket)
            serve(now)
        elif kind == "done":
            live.remove(what)
            held -= weight_of(what)
            serve(now)
        elif state.remove(what) is not None:  # its timeout, still waiting
            classes[weight_of(what)].timed_out += 1
            del arrived[what], service[what]
    return classes, busy / (LIMIT * last)


def run(loads: list[float], duration: float, seed: int) -> list[Result]:
    out = []
    for load in loads:
        for name, budget in POLICIES.items():
            classes, utilisation = simulate(budget, load, duration, seed)
            out.append(Result(name, load, classes, utilisation))
    return out


def render(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        "## Weighted slots: heavy and light requests in one line",
        "",
        f"`python -m benchmarks.weighted_slots{' --quick' if args.quick else ''}`: a pool of "
        f"{LIMIT} slots, a line of {CAPACITY} (timeout {TIMEOUT:g} s); Poisson arrivals, "
        f"{100 * (1 - HEAVY_SHARE):.0f} % light ({LIGHT} slot) and {100 * HEAVY_SHARE:.0f} % "
        f"heavy ({HEAVY} slots), asking `load` x the pool's slot-seconds; service exponential, "
        f"mean {SERVICE:g} s; {args.duration:g} simulated seconds per run, the same arrivals "
        "for each policy. The hand-off is `algorithms.queue.hand_off` on simulated time.",
        "",
        "| load | policy | class | offered | admitted | timed out | line full "
        "| wait p50 (s) | wait p99 (s) | wait max (s) | slot use |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        for weight, name in ((LIGHT, "light"), (HEAVY, "heavy")):
            k = r.classes[weight]
            lines.append(
                f"| {r.load:g}x | {r.policy} | {name} | {k.offered} | {k.admitted} "
                f"| {k.timed_out} | {k.full} | {k.quantile(0.5):.2f} | {k.quantile(0.99):.2f} "
                f"| {max(k.waits, default=float('nan')):.2f} | {100 * r.utilisation:.1f} % |"
            )
    lines += [
        "",
        "Unbounded backfill keeps the pool busiest, but heavy requests wait longest and",
        "time out most: while light ones keep arriving a 4-slot gap seldom opens. Strict",
        "reservation times out almost none, but idles the slots a waiting head cannot use",
        "yet (lower slot use) and holds light requests behind it. A budget of one pool's",
        "worth keeps slot use near unbounded backfill's and heavy time-outs near strict",
        "reservation's (see `algorithms/queue.py`, Weights).",
        "",
        *_support.machine_lines(),
        f"- Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, print_: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=3600.0, help="simulated seconds")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.9, 1.2, 2.0])
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="600 simulated seconds")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 600.0
    body = render(run(args.loads, args.duration, args.seed), args)
    print_(body)
    if not args.no_write:
        _support.write_section(SECTION, body)


if __name__ == "__main__":
    main()
