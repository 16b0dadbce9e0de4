"""The waiting line through the engine and middleware, on the memory backend.

Order is asserted on parked waiters: requests are started, the test waits
until the line holds them all (by its length, not by sleeping), then frees
slots one at a time and records who got each. Nothing leaks: after every
ending (served, timeout, full, disconnect, cancel) slots in use and the
line's length return to their true values.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest
from asgi_helpers import Exchange, http_scope

from ratelimit import (
    Concurrency,
    ConfigError,
    MemoryBackend,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    keys,
)
from ratelimit.backends.base import StoreKey
from ratelimit.core.decision import Decision
from ratelimit.core.engine import Engine

GPU = StoreKey("gen", "gpu", "*")


def scope(tier: str = "free", user: str = "u", **headers: str) -> dict[str, Any]:
    raw = [(b"x-tier", tier.encode()), (b"x-user", user.encode())]
    raw += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return http_scope("/gen", headers=raw)


def tier(s: dict[str, Any]) -> str:
    return dict(s["headers"])[b"x-tier"].decode()


def engine(limit: int = 1, **options: Any) -> Engine:
    options.setdefault("queue", 16)
    options.setdefault("timeout", 30.0)
    gpu = Concurrency(limit, key=keys.GLOBAL, name="gpu", **options)
    return Engine([Rule("/gen", limits=[gpu], name="gen")], MemoryBackend())


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


class Line:
    """Requests parked in an engine's line, and the order in which they get slots."""

    def __init__(self, eng: Engine) -> None:
        self.engine = eng
        self.rule = eng.rules[0]
        self.backend = eng.backend
        assert isinstance(self.backend, MemoryBackend)
        self.tasks: dict[str, asyncio.Task[Decision]] = {}
        self.admitted: list[str] = []

    async def hold(self, **kw: Any) -> Decision:
        d = await self.engine.decide(self.rule, scope(**kw))
        assert d.allowed
        assert d.grant is not None
        return d

    def waiting(self) -> int:
        return len(self.backend._lines[GPU].state) if GPU in self.backend._lines else 0

    async def park(self, name: str, **kw: Any) -> None:
        """Start a request and return once it waits in line."""
        before = self.waiting()
        task = asyncio.ensure_future(self.engine.decide(self.rule, scope(**kw)))
        task.add_done_callback(lambda t: self.admitted.append(name) if _ok(t) else None)
        self.tasks[name] = task
        await until(lambda: self.waiting() == before + 1 or task.done())

    async def serve_one(self, d: Decision) -> Decision | None:
        """Release `d`'s slot; return the decision of the waiter that got it."""
        served = len(self.admitted)
        assert d.grant is not None
        await self.engine.release(d.grant)
        if not self.waiting() and len(self.admitted) == served and not self._pending():
            return None
        await until(lambda: len(self.admitted) > served)
        return self.tasks[self.admitted[-1]].result()

    def _pending(self) -> bool:
        return any(not t.done() for t in self.tasks.values())

    async def drain(self, d: Decision) -> list[str]:
        """Free slots one by one, each next holder releasing in turn; the order served."""
        start = len(self.admitted)
        current: Decision | None = d
        while current is not None:
            current = await self.serve_one(current)
        return self.admitted[start:]


def _ok(task: asyncio.Task[Decision]) -> bool:
    return not task.cancelled() and task.exception() is None and task.result().allowed


async def in_use(eng: Engine) -> int:
    return await eng.backend.in_use(GPU)


# -- order ------------------------------------------------------------------------


async def test_one_class_waits_first_in_first_out() -> None:
    line = Line(engine())
    first = await line.hold()
    for name in "abcde":
        await line.park(name)
    assert await line.drain(first) == list("abcde")
    assert (await in_use(line.engine), line.waiting()) == (0, 0)


async def test_a_higher_class_is_admitted_first() -> None:
    line = Line(engine(priority=tier, classes=["paid", "free"]))
    first = await line.hold()
    for name, t in [("f1", "free"), ("p1", "paid"), ("f2", "free"), ("p2", "paid")]:
        await line.park(name, tier=t)
    assert await line.drain(first) == ["p1", "p2", "f1", "f2"]


async def test_int_priorities_admit_higher_numbers_first() -> None:
    def prio(s: dict[str, Any]) -> int:
        return int(dict(s["headers"])[b"x-tier"])

    line = Line(engine(priority=prio))
    first = await line.hold(tier="0")
    for name in ["1", "5", "-3", "5b"]:
        await line.park(name, tier=name.rstrip("b"))
    assert await line.drain(first) == ["5", "5b", "1", "-3"]


async def test_callers_are_served_fairly_within_a_class() -> None:
    def user(s: dict[str, Any]) -> str:
        return str(dict(s["headers"])[b"x-user"].decode())

    line = Line(engine(fair_key=user))
    first = await line.hold(user="x")
    for i in range(1, 5):
        await line.park(f"a{i}", user="A")
    await line.park("b1", user="B")
    await line.park("c1", user="C")
    assert await line.drain(first) == ["a1", "b1", "c1", "a2", "a3", "a4"]


async def test_shares_hold_under_saturation() -> None:
    """4 slots, paid 50 % / free 50 %: with paid flooding the line, a released slot still
    goes to free while free holds fewer than its 2 guaranteed slots."""
    line = Line(engine(4, priority=tier, shares={"paid": 0.5, "free": 0.5}))
    held = [await line.hold(tier="paid") for _ in range(4)]  # paid borrowed every slot
    for i in range(3):
        await line.park(f"p{i}", tier="paid")
    await line.park("f0", tier="free")
    await line.park("f1", tier="free")
    await line.park("f2", tier="free")
    served = []
    for d in held:
        got = await line.serve_one(d)
        assert got is not None
        served.append(line.admitted[-1])
    # The first two freed slots bring free up to its share; then paid goes first again.
    assert served == ["f0", "f1", "p0", "p1"]


# -- endings and leaks --------------------------------------------------------------


async def test_a_full_line_refuses_at_once_with_503() -> None:
    line = Line(engine(queue=2))
    await line.hold()
    await line.park("a")
    await line.park("b")
    started = asyncio.get_running_loop().time()
    d = await line.engine.decide(line.rule, scope())
    assert asyncio.get_running_loop().time() - started < 0.1
    assert (d.allowed, d.status, d.reason, d.waited) == (False, 503, "queue_full", None)
    assert line.waiting() == 2


async def test_a_wait_that_times_out_refuses_and_leaves_the_line() -> None:
    line = Line(engine(timeout=0.05))
    await line.hold()
    d = await line.engine.decide(line.rule, scope())
    assert (d.allowed, d.status, d.reason) == (False, 503, "queue_timeout")
    assert d.waited is not None
    assert d.waited >= 0.05
    assert (line.waiting(), await in_use(line.engine)) == (0, 1)


@pytest.mark.parametrize(
    "header",
    [
        "x_request_timeout",
        "x_stainless_read_timeout",  # the openai and anthropic SDKs' own read timeout
    ],
)
async def test_the_clients_deadline_header_shortens_the_wait(header: str) -> None:
    """A client never waits in line past the timeout it advertises."""
    line = Line(engine(timeout=30.0))
    await line.hold()
    started = asyncio.get_running_loop().time()
    d = await line.engine.decide(line.rule, scope(**{header: "0.05"}))
    assert d.reason == "queue_timeout"
    assert asyncio.get_running_loop().time() - started < 2.0
    for bad in ("soon", "-1", "nan", "inf"):  # unreadable: the configured timeout holds
        task = asyncio.ensure_future(line.engine.decide(line.rule, scope(**{header: bad})))
        await until(lambda: line.waiting() == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await until(lambda: line.waiting() == 0)


async def test_a_cancelled_waiter_leaves_the_line_and_gets_its_tokens_back() -> None:
    rule = Rule(
        "/gen",
        limits=[
            TokenBucket("2/hour", key=keys.header("x-user"), name="quota"),
            Concurrency(1, key=keys.GLOBAL, queue=4, timeout=30.0, name="gpu"),
        ],
        name="gen",
    )
    eng = Engine([rule], MemoryBackend())
    first = await eng.decide(rule, scope(user="holder"))
    assert first.allowed
    task = asyncio.ensure_future(eng.decide(rule, scope(user="waiter")))
    backend = eng.backend
    assert isinstance(backend, MemoryBackend)
    await until(lambda: GPU in backend._lines)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await until(lambda: not eng.holding.background)
    assert GPU not in backend._lines
    # Its quota was refunded: the waiter still has both of its 2 units.
    assert first.grant is not None
    await eng.release(first.grant)
    for _ in range(2):
        d = await eng.decide(rule, scope(user="waiter"))
        assert d.allowed
        assert d.grant is not None
        await eng.release(d.grant)
    assert (await eng.decide(rule, scope(user="waiter"))).status == 429


async def test_a_slot_granted_as_the_waiter_is_cancelled_is_not_lost() -> None:
    line = Line(engine())
    first = await line.hold()
    await line.park("a")
    assert first.grant is not None
    await line.engine.release(first.grant)  # hands the slot to "a" at once...
    line.tasks["a"].cancel()  # ...which is cancelled before it runs again
    await asyncio.gather(line.tasks["a"], return_exceptions=True)
    await until(lambda: not line.engine.holding.background)
    assert (await in_use(line.engine), line.waiting()) == (0, 0)


async def test_a_request_does_not_pass_the_line() -> None:
    """A slot that frees while others wait (here: a crashed holder's lease expires) goes to
    the line's head, never to a newcomer who happens to ask first."""
    clock = ManualClock()
    gpu = Concurrency(1, key=keys.GLOBAL, queue=4, timeout=30.0, lease=1.0, name="gpu")
    eng = Engine([Rule("/gen", limits=[gpu], name="gen")], MemoryBackend(clock=clock))
    line = Line(eng)
    await line.hold()
    eng.holding.held.clear()  # the holder "crashed": nobody renews its lease
    await line.park("a")
    clock.now += 5.0  # its lease is dead: a slot is free, and "a" waits for it
    newcomer = asyncio.ensure_future(eng.decide(line.rule, scope()))
    await until(lambda: "a" in line.admitted)
    await until(lambda: line.waiting() == 1)  # the newcomer waits behind "a"
    assert not newcomer.done()
    newcomer.cancel()
    await asyncio.gather(newcomer, return_exceptions=True)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_refusals_estimate_retry_after_from_observed_service_time() -> None:
    """4 slots held ~0.2 s each: a full line's newcomer at place 3 is told about
    (3 + 1) x 0.2 / 4 = 0.2 s, and a hopeless wait is refused at once (too_long)."""
    eng = engine(4, queue=3, timeout=0.3)
    line = Line(eng)
    for _ in range(2):  # observe service times
        held = [await line.hold() for _ in range(4)]
        await asyncio.sleep(0.2)
        for d in held:
            assert d.grant is not None
            await eng.release(d.grant)
    service = eng.holding.service[("gen", 0)]
    assert 0.2 <= service < 0.5
    held = [await line.hold() for _ in range(4)]
    for name in "abc":
        await line.park(name)
    d = await eng.decide(line.rule, scope())
    assert (d.status, d.reason) == (503, "queue_full")
    assert d.retry_after == pytest.approx(4 * service / 4)
    # Past the place a 0.3 s timeout covers (0.3 * 4 / service - 1 < 3), refused at once.
    eng.rules[0].limits[0].timeout = 0.1  # type: ignore[attr-defined]
    for name in list(line.tasks):
        line.tasks[name].cancel()
    await asyncio.gather(*line.tasks.values(), return_exceptions=True)
    await until(lambda: line.waiting() == 0)
    await line.park("d")
    late = await eng.decide(line.rule, scope())
    assert (late.status, late.reason) == (503, "too_long")
    assert late.retry_after == pytest.approx(2 * service / 4)
    for d in held:
        assert d.grant is not None
        await eng.release(d.grant)


# -- the middleware -----------------------------------------------------------------


def gated(gate: asyncio.Event) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    return app


async def test_a_client_that_disconnects_while_waiting_leaves_the_line_at_once() -> None:
    gate = asyncio.Event()
    mw = RateLimitMiddleware(
        gated(gate),
        rules=[Rule("/gen", limits=[Concurrency(1, queue=4, timeout=30.0, name="gpu")])],
    )
    backend = mw.backend
    assert isinstance(backend, MemoryBackend)
    running = Exchange(mw, http_scope("/gen"))
    running.start()
    await until(lambda: backend._leases.get(StoreKey("gen", "gpu", "*")) is not None)
    waiter = Exchange(mw, http_scope("/gen"), body=b"payload")
    task = waiter.start()
    key = StoreKey("gen", "gpu", "*")
    await until(lambda: key in backend._lines)
    waiter.disconnect()
    await asyncio.wait_for(task, 2)
    assert waiter.sent == []  # nobody left to answer
    assert key not in backend._lines
    gate.set()
    assert running.task is not None
    await asyncio.wait_for(running.task, 2)
    assert await backend.in_use(key) == 0


async def test_a_waiter_that_gets_its_slot_still_receives_its_body() -> None:
    """The body read while watching for a disconnect is handed to the app afterwards."""
    seen: list[bytes] = []

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = asyncio.Event()
    rules = [Rule("/gen", limits=[Concurrency(1, queue=4, timeout=30.0, name="gpu")])]
    holder_mw = RateLimitMiddleware(gated(gate), rules=rules)
    echo_mw = RateLimitMiddleware(echo, rules=rules, backend=holder_mw.backend)
    first = Exchange(holder_mw, http_scope("/gen"))
    first.start()
    backend = holder_mw.backend
    assert isinstance(backend, MemoryBackend)
    key = StoreKey("gen", "gpu", "*")
    await until(lambda: backend._leases.get(key) is not None)
    waiter = Exchange(echo_mw, http_scope("/gen"), body=b"prompt: a cat")
    task = waiter.start()
    await until(lambda: key in backend._lines)
    gate.set()
    await asyncio.wait_for(task, 2)
    assert seen == [b"prompt: a cat"]
    assert waiter.sent[0]["status"] == 200


class Upload:
    """A server's `receive` for a streamed upload of `chunks`; then silence (no disconnect)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.served = 0

    async def receive(self) -> dict[str, Any]:
        if self.served == len(self.chunks):
            await asyncio.Event().wait()
        self.served += 1
        more = self.served < len(self.chunks)
        return {"type": "http.request", "body": self.chunks[self.served - 1], "more_body": more}


async def _drained() -> None:
    """Let ready tasks run: the inbox's reads of an `Upload` never suspend, so this many
    turns of the loop let it read everything it ever will."""
    for _ in range(50):
        await asyncio.sleep(0)


async def test_a_waiting_upload_is_read_ahead_at_most_64_kib_then_reaches_the_app_whole() -> None:
    """While it waits, 64 KiB of a 2 MiB upload are read; admitted, the app gets every byte."""
    chunks = [os.urandom(16 * 1024) for _ in range(128)]
    received: list[bytes] = []

    async def sink(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            received.append(message["body"])
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = asyncio.Event()
    rules = [Rule("/gen", limits=[Concurrency(1, queue=4, timeout=30.0, name="gpu")])]
    holder_mw = RateLimitMiddleware(gated(gate), rules=rules)
    sink_mw = RateLimitMiddleware(sink, rules=rules, backend=holder_mw.backend)
    backend = holder_mw.backend
    assert isinstance(backend, MemoryBackend)
    key = StoreKey("gen", "gpu", "*")
    holding = Exchange(holder_mw, http_scope("/gen")).start()
    await until(lambda: backend._leases.get(key) is not None)
    upload, sent = Upload(chunks), []

    async def send(message: Any) -> None:
        sent.append(message)

    task = asyncio.create_task(sink_mw(http_scope("/gen", "POST"), upload.receive, send))
    await until(lambda: key in backend._lines)
    await _drained()
    assert upload.served == 4  # 4 x 16 KiB: the read-ahead's bound, reached exactly
    gate.set()
    await asyncio.wait_for(asyncio.gather(task, holding), 5)
    assert sent[0]["status"] == 200
    assert b"".join(received) == b"".join(chunks)


async def test_a_waiter_whose_upload_is_not_read_still_times_out() -> None:
    """Past the read-ahead a waiter is refused at its own timeout, like any other."""
    gate = asyncio.Event()
    mw = RateLimitMiddleware(
        gated(gate),
        rules=[Rule("/gen", limits=[Concurrency(1, queue=4, timeout=0.2, name="gpu")])],
    )
    holding = Exchange(mw, http_scope("/gen")).start()
    backend = mw.backend
    assert isinstance(backend, MemoryBackend)
    await until(lambda: backend._leases.get(StoreKey("gen", "gpu", "*")) is not None)
    upload, sent = Upload([b"x" * 65536] * 100), []

    async def send(message: Any) -> None:
        sent.append(message)

    await asyncio.wait_for(mw(http_scope("/gen", "POST"), upload.receive, send), 5)
    assert sent[0]["status"] == 503
    assert upload.served == 1
    gate.set()
    await asyncio.wait_for(holding, 5)


async def test_queue_without_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="timeout"):
        Concurrency(4, queue=8)
    with pytest.raises(ConfigError, match="shares"):
        Concurrency(4, shares={"paid": 0.8, "free": 0.4})
    with pytest.raises(ConfigError, match=r"shares\.gold"):
        Concurrency(4, classes=["paid", "free"], shares={"gold": 0.5})


# -- appointments -------------------------------------------------------------------


def user(s: dict[str, Any]) -> str:
    return str(dict(s["headers"])[b"x-user"].decode())


async def test_a_refused_caller_gets_an_appointment_and_keeping_it_gets_it_in() -> None:
    """With a fair key and a service time, a refusal from a full line carries an
    appointment: the next ones are spaced a service interval apart, an early return is
    told the same time, and a caller coming back on time joins even a full line."""
    clock = ManualClock()
    gpu = Concurrency(1, key=keys.GLOBAL, queue=1, timeout=30.0, fair_key=user, name="gpu")
    eng = Engine([Rule("/gen", limits=[gpu], name="gen")], MemoryBackend(clock=clock))
    line = Line(eng)
    d = await line.hold(user="h")
    await asyncio.sleep(0.02)
    assert d.grant is not None
    await eng.release(d.grant)  # one service time observed
    spacing = eng.holding.service[("gen", 0)]
    await line.hold(user="h")
    await line.park("a", user="a")  # the line (of one) is full
    b = await eng.decide(line.rule, scope(user="b"))
    assert (b.status, b.reason) == (503, "queue_full")
    assert b.retry_after == pytest.approx(2 * spacing)  # after the line's own wait
    c = await eng.decide(line.rule, scope(user="c"))
    assert c.reason == "too_long"  # booked behind b, though c was refused for a full line too
    assert c.retry_after == pytest.approx(3 * spacing)
    early = await eng.decide(line.rule, scope(user="b"))
    assert early.retry_after == pytest.approx(2 * spacing)  # the same appointment
    clock.now += 2 * spacing
    await line.park("b", user="b")  # on time: joins the full line
    assert line.waiting() == 2
    assert not line.tasks["b"].done()
    newcomer = await eng.decide(line.rule, scope(user="n"))
    assert newcomer.reason == "too_long"  # c is still booked ahead of it
    # After the line's two waiters (c's appointment, one spacing from now, comes earlier).
    assert newcomer.retry_after == pytest.approx(3 * spacing)


async def test_an_appointment_not_kept_lapses() -> None:
    clock = ManualClock()
    gpu = Concurrency(1, key=keys.GLOBAL, queue=1, timeout=30.0, fair_key=user, name="gpu")
    eng = Engine([Rule("/gen", limits=[gpu], name="gen")], MemoryBackend(clock=clock))
    line = Line(eng)
    d = await line.hold(user="h")
    assert d.grant is not None
    await eng.release(d.grant)
    await line.hold(user="h")
    await line.park("a", user="a")
    assert (await eng.decide(line.rule, scope(user="b"))).reason == "queue_full"
    clock.now += 60.0  # b never came back
    again = await eng.decide(line.rule, scope(user="c"))
    assert again.reason == "queue_full"  # nobody booked ahead: an ordinary refusal
    backend = eng.backend
    assert isinstance(backend, MemoryBackend)
    assert set(backend._books[GPU].due) == {_digest_of("c")}


async def test_a_higher_class_is_not_booked_behind_a_lower_one() -> None:
    clock = ManualClock()
    gpu = Concurrency(
        1, key=keys.GLOBAL, queue=1, timeout=30.0, fair_key=user, priority=tier,
        classes=["paid", "free"], name="gpu",
    )  # fmt: skip
    eng = Engine([Rule("/gen", limits=[gpu], name="gen")], MemoryBackend(clock=clock))
    line = Line(eng)
    d = await line.hold(user="h")
    assert d.grant is not None
    await eng.release(d.grant)
    await line.hold(user="h")
    await line.park("f1", user="f1", tier="free")
    booked = await eng.decide(line.rule, scope(user="f2", tier="free"))
    assert booked.reason == "queue_full"
    # A paid newcomer is not put behind the free appointment: it sheds the free waiter.
    paid = asyncio.ensure_future(eng.decide(line.rule, scope(user="p1", tier="paid")))
    await until(lambda: line.tasks["f1"].done())
    assert line.waiting() == 1
    assert not paid.done()
    assert line.tasks["f1"].result().reason == "shed"
    assert line.tasks["f1"].result().retry_after > 0
    paid.cancel()
    await asyncio.gather(paid, return_exceptions=True)


def _digest_of(text: str) -> str:
    from ratelimit.policy.keys import digest as _digest

    return _digest(text)
