"""`python -m examples.llm --demo`: three callers stream chat completions through the limiter.

The API runs under uvicorn in this process (real HTTP, real streams, real
hang-ups) with small limits, so a short run shows every path:

- `sk-steady` keeps 2 streams going with `max_tokens=200`: always admitted;
- `sk-greedy` keeps 8 going without `max_tokens` (each reserves the default
  1024 output tokens): refused by its output-token bucket whenever the
  reservations in flight reach it, yet it gets far more replies than its
  budget holds at 1024 each, because each reply's unused tokens are refunded
  when its stream ends;
- `sk-impatient` reads 5 tokens of each reply and hangs up: charged for
  what was generated, not for its `max_tokens`; asking again at once, it
  meets its requests-per-minute limit (`rpm`) instead.

Every caller is the official `openai` SDK with retries off: a refusal is
counted, then the caller waits the `retry-after-ms` it was told. No request
starts after `duration`; the streams in flight then run to their end, so a
run takes a few seconds more.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import openai
import uvicorn

from ratelimit import Backend

from .app import DEFAULT_MAX_TOKENS, MODEL, TOKENS_PER_SECOND, Limits, Record, create_app

#: The demo's limits: small, so that 20 seconds show refusals.
DEMO_LIMITS = Limits(requests=120, input_tokens=20_000, output_tokens=6_000, fleet_tokens=60_000)
_NAMES = re.compile(r"(?:for|capacity \() ?([\w\-, ]+)[.)]")


@dataclass(frozen=True)
class Caller:
    key: str
    streams: int
    max_tokens: int | None
    #: Tokens read before hanging up; None: read the whole reply.
    hang_up_after: int | None = None


CALLERS = (
    Caller("sk-steady", 2, 200),
    Caller("sk-greedy", 8, None),
    Caller("sk-impatient", 3, 400, hang_up_after=5),
)


@dataclass
class Tally:
    """What one caller saw."""

    sent: int = 0
    completed: int = 0
    hung_up: int = 0
    refused: Counter[str] = field(default_factory=Counter)


async def _stream(client: openai.AsyncOpenAI, caller: Caller, n: int, tally: Tally) -> float:
    """One request; the seconds to wait before the next (0 unless refused)."""
    question = f"Question {n} from {caller.key}: how do token limits work?"
    tally.sent += 1
    try:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=caller.max_tokens,  # None (null): the default, reserved as such
        )
    except openai.APIStatusError as exc:
        found = _NAMES.search(str(exc.message))
        tally.refused[f"{exc.status_code} {found.group(1) if found else '?'}"] += 1
        wait = exc.response.headers.get("retry-after-ms")
        return float(wait) / 1000 if wait else 1.0
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            tokens += 1
            if caller.hang_up_after is not None and tokens >= caller.hang_up_after:
                await stream.close()
                tally.hung_up += 1
                return 0.0
    tally.completed += 1
    return 0.0


async def _loop(
    client: openai.AsyncOpenAI, caller: Caller, tally: Tally, until: float, counter: list[int]
) -> None:
    while time.monotonic() < until:
        counter[0] += 1
        wait = await _stream(client, caller, counter[0], tally)
        if wait:
            await asyncio.sleep(min(wait, max(0.0, until - time.monotonic())))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def report(
    tallies: dict[str, Tally], ledger: Sequence[Record], limits: Limits, elapsed: float
) -> list[str]:
    """The demo's table and what it shows."""
    rows = [
        f"{'caller':<13} {'sent':>5} {'served':>6} {'hung up':>7}  {'refused':<22}"
        f" {'out reserved':>12} {'out used':>8} {'refunded':>8}",
    ]
    for key, t in tallies.items():
        mine = [r for r in ledger if r.key == key]
        reserved = sum(r.reserved_output for r in mine)
        used = sum(r.used_output for r in mine)
        refused = ", ".join(f"{n} x {why}" for why, n in sorted(t.refused.items())) or "-"
        rows.append(
            f"{key:<13} {t.sent:>5} {t.completed:>6} {t.hung_up:>7}  {refused:<22}"
            f" {reserved:>12,} {used:>8,} {reserved - used:>8,}"
        )
    greedy = [r for r in ledger if r.key == "sk-greedy"]
    budget = limits.output_tokens * (1 + elapsed / 60)
    rows += [
        "",
        f"sk-greedy's output-token bucket holds {limits.output_tokens:,} and refills "
        f"{limits.output_tokens:,}/minute: about {budget:,.0f} tokens in {elapsed:.0f} s, "
        f"{int(budget // DEFAULT_MAX_TOKENS)} requests at the {DEFAULT_MAX_TOKENS} tokens each "
        f"reserves. Settling each reply's real length gave it {len(greedy)}.",
        "sk-impatient was charged for the tokens generated before it hung up "
        "(`used`), not for its max_tokens.",
        "Unsettled ledger entries: " + str(sum(1 for r in ledger if r.settled is not True)),
    ]
    return rows


@dataclass
class Played:
    """A demo run: what each caller saw, the server's ledger, and the report."""

    tallies: dict[str, Tally]
    ledger: list[Record]
    lines: list[str]


async def run(
    *,
    duration: float = 20.0,
    backend: Backend | None = None,
    limits: Limits = DEMO_LIMITS,
    tokens_per_second: float = TOKENS_PER_SECOND,
) -> Played:
    """Serve the API, play the callers for `duration` seconds, report what happened."""
    app = create_app(limits=limits, backend=backend, tokens_per_second=tokens_per_second)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn says it has started only by a flag
        await asyncio.sleep(0.02)
    tallies = {c.key: Tally() for c in CALLERS}
    started = time.monotonic()
    until = started + duration
    try:
        async with contextlib.AsyncExitStack() as stack:
            loops = []
            counter = [0]
            for caller in CALLERS:
                client = await stack.enter_async_context(
                    openai.AsyncOpenAI(
                        api_key=caller.key,
                        base_url=f"http://127.0.0.1:{port}/v1",
                        timeout=60,
                        max_retries=0,
                    )
                )
                loops += [
                    _loop(client, caller, tallies[caller.key], until, counter)
                    for _ in range(caller.streams)
                ]
            await asyncio.gather(*loops)
    finally:
        server.should_exit = True
        await serving
    ledger = list(app.state.completions.ledger)
    return Played(tallies, ledger, report(tallies, ledger, limits, time.monotonic() - started))
