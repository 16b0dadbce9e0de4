"""The one way a script call reaches Redis: through the circuit breaker, timed, errors wrapped.

Every failure raises `BackendError`, whose `__cause__` tells what happened.
Only failures to reach Redis count against the breaker (connection errors,
timeouts); an error reply proves Redis alive. Once open, calls raise
`BackendUnavailable` at once, without touching the network; after
`breaker.reset_after` seconds one call probes, and its outcome reaches the
breaker even if its caller is cancelled. Each state change is logged once on
the "ratelimit" logger, never once per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import perf_counter
from typing import Any, Protocol, runtime_checkable

from redis.exceptions import (
    ClusterDownError,
    MaxConnectionsError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..._errors import BackendError, BackendUnavailable, ConfigError
from ..breaker import BreakerState, CircuitBreaker
from .scripts import Script
from .transport import Transport

logger = logging.getLogger("ratelimit")

#: Told of each call to the store: (operation, seconds, error or None).
CallObserver = Callable[[str, float, "BaseException | None"], None]


@runtime_checkable
class BackendObserver(Protocol):
    """What watches a backend's calls (`backend.add_observer`); `Metrics` is one."""

    def observe_backend_call(
        self, operation: str, seconds: float, error: BaseException | None
    ) -> None:
        """One call to the store finished in `seconds`, failed with `error` if not None."""
        ...


#: Errors of a call that did not reach Redis, or got no answer in time: these count
#: against the breaker. Other errors are replies (Redis is alive) or client-side.
_UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,  # asyncio.TimeoutError, on 3.11+ the builtin
    asyncio.TimeoutError,
    OSError,
    ClusterDownError,  # the cluster cannot serve the slot (a master is down)
)
#: Every error a call may raise; each becomes a BackendError.
CALL_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


class Guard:
    """Runs script calls over `transport` through `breaker`, telling the observers."""

    def __init__(self, transport: Transport, breaker: CircuitBreaker, url: str) -> None:
        self.transport = transport
        self.breaker = breaker
        self.url = url
        #: Every observer's `observe_backend_call`, as one callable (None: nobody watches).
        self.observe: CallObserver | None = None
        self._observers: list[CallObserver] = []
        #: The last error counted against the breaker (a batch failing together counts once).
        self.last_failure: BaseException | None = None
        breaker.add_listener(self._breaker_changed)

    def add_observer(self, observer: BackendObserver) -> None:
        """Tell `observer` of every call from now on (in the order observers were added);
        an observer added again is told once."""
        if observer.observe_backend_call in self._observers:
            return
        self._observers.append(observer.observe_backend_call)
        observers = tuple(self._observers)
        if len(observers) == 1:
            self.observe = observers[0]
            return

        def observe(operation: str, seconds: float, error: BaseException | None) -> None:
            for each in observers:
                each(operation, seconds, error)

        self.observe = observe

    async def call(
        self, script: Script, keys: list[str], args: list[str], packed: bytes | None = None
    ) -> Any:
        """Run `script` (EVALSHA, reloaded if the server lost it); its raw reply.

        With the breaker closed (nearly always), a `packed` call goes straight
        onto a live connection (`send`); otherwise the gate and the half-open
        probe apply.
        """
        if self.breaker.state != "closed":
            return await self._gated(script, keys, args)
        transport = self.transport
        future = transport.send(packed) if packed is not None else None
        started = perf_counter() if self.observe is not None else 0.0
        try:
            if future is None:
                reply = await transport.evalsha(script, keys, args, packed)
            else:
                reply = await future
        except CALL_ERRORS as exc:
            if future is None:
                raise self.failed(script.name, exc, started) from exc
            return await self.recover(script, keys, args, exc, started)
        self.succeeded(script.name, started)
        return reply

    def send(self, packed: bytes) -> asyncio.Future[Any] | None:
        """A packed call put on a live connection now, with the breaker closed: await the
        future, then `succeeded` or `recover`. None otherwise: await `call` instead.

        The pieces of `call`, for a caller that awaits the reply itself: every
        decision of a one-bucket rule does, one coroutine less (0.3 us a call).
        """
        if self.breaker.state != "closed":
            return None
        return self.transport.send(packed)

    async def recover(
        self, script: Script, keys: list[str], args: list[str], exc: BaseException, started: float
    ) -> Any:
        """After a `send` of `script` (at `started`) failed with `exc`: NOSCRIPT runs the
        call again through `call`, which reloads the script; anything else is raised."""
        if isinstance(exc, ResponseError) and str(exc).startswith("NOSCRIPT"):
            return await self.call(script, keys, args)
        raise self.failed(script.name, exc, started) from exc

    def succeeded(self, operation: str, started: float) -> None:
        """A call (made at `started`) was answered: tell the breaker and the observers."""
        self.breaker.success()
        if self.observe is not None:
            self.observe(operation, perf_counter() - started, None)

    def failed(self, operation: str, exc: BaseException, started: float) -> BackendError:
        """What a failed call (made at `started`) becomes: counted for the breaker and
        the observers, returned as the BackendError to raise."""
        self._settle(exc)
        error = BackendError(f"redis {operation}: {exc}")
        if self.observe is not None:
            self.observe(operation, perf_counter() - started, error)
        return error

    async def _gated(self, script: Script, keys: list[str], args: list[str]) -> Any:
        """A call while the breaker is not closed: refused at once, or the half-open probe."""
        operation = script.name
        observe = self.observe
        if not self.breaker.allow():
            error = BackendUnavailable(
                f"redis {operation}: circuit breaker open after repeated failures to "
                f"reach {self.url} ({describe(self.last_failure)}); not called"
            )
            if observe is not None:
                observe(operation, 0.0, error)
            raise error
        started = perf_counter()
        try:
            reply = await self._probe(operation, script, keys, args)
        except BackendError as exc:
            if observe is not None:
                observe(operation, perf_counter() - started, exc)
            raise
        if observe is not None:
            observe(operation, perf_counter() - started, None)
        return reply

    async def _probe(self, operation: str, script: Script, keys: list[str], args: list[str]) -> Any:
        """The half-open probe: its outcome reaches the breaker even if the caller is cancelled.

        A probe abandoned without an outcome would leave the breaker half-open,
        refusing every call, for good.
        """
        future = asyncio.ensure_future(self.transport.evalsha(script, keys, args))
        future.add_done_callback(self._probe_done)
        try:
            return await asyncio.shield(future)
        except CALL_ERRORS as exc:
            raise BackendError(f"redis {operation}: {exc}") from exc

    def _probe_done(self, call: asyncio.Future[Any]) -> None:
        if call.cancelled():  # closed by aclose() mid-probe: no answer from Redis
            self.breaker.failure()
            return
        exc = call.exception()
        if exc is None:
            self.breaker.success()
        else:
            self._settle(exc, probe=True)

    def _settle(self, exc: BaseException, *, probe: bool = False) -> None:
        """Tell the breaker what a failed call says about Redis."""
        breaker = self.breaker
        if unreachable(exc):
            # Calls that failed together (one broken connection, one failed
            # connect) share one exception object: count it once, so a single
            # hiccup under load is one failure, not one per call in flight.
            if exc is not self.last_failure or probe:
                self.last_failure = exc
                breaker.failure()
        elif isinstance(exc, ResponseError):
            breaker.success()  # an error reply: Redis is there and answering
        elif probe:
            breaker.failure()  # the probe learned nothing: try again after a pause

    def _breaker_changed(self, old: BreakerState, new: BreakerState) -> None:
        """Log each breaker state change once (not once per refused call)."""
        if new == "open" and old == "closed":
            logger.error(
                "ratelimit: redis at %s unreachable (%s): circuit breaker open, calls "
                "fail at once; probing every %.3gs",
                self.url,
                describe(self.last_failure),
                self.breaker.reset_after,
            )
        elif new == "closed":
            self.last_failure = None
            logger.warning("ratelimit: redis at %s answers again: circuit breaker closed", self.url)
        else:  # probing, and a failed probe: once per pause while Redis stays down
            logger.debug("ratelimit: redis at %s circuit breaker %s -> %s", self.url, old, new)


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says Redis was not reached or did not answer in time.

    A cluster client reports nodes it could not reach (at discovery, or a slot
    left without a node) as RedisClusterException caused by a connection error.
    A full connection pool is this process's limit, not Redis's failure.
    """
    if isinstance(exc, MaxConnectionsError):
        return False
    if isinstance(exc, _UNREACHABLE):
        return True
    return isinstance(exc, SlotNotCoveredError) or (
        isinstance(exc, RedisClusterException) and isinstance(exc.__cause__, _UNREACHABLE)
    )


def describe(exc: BaseException | None) -> str:
    """`Type: message` (redis-py's exception repr leaves the message out)."""
    return "no error" if exc is None else f"{type(exc).__name__}: {exc}"


def make_breaker(
    breaker: CircuitBreaker | None, failures: int, reset_after: float
) -> CircuitBreaker:
    """The backend's breaker: the one passed in, or one from the two settings (validated)."""
    if breaker is not None:
        if not isinstance(breaker, CircuitBreaker):
            raise ConfigError("breaker", "a ratelimit CircuitBreaker", breaker)
        return breaker
    try:
        return CircuitBreaker(failures=failures, reset_after=reset_after)
    except ConfigError as exc:
        field = {"failures": "breaker_failures", "reset_after": "breaker_reset"}[exc.field]
        raise ConfigError(field, exc.expected, exc.got) from None
