"""The exception tree of ratelimit.

    RateLimitError                 root: catch this to catch anything we raise
    ├── ConfigError (ValueError)   bad configuration, raised at construction
    ├── BackendError               the store failed; the driver's error is __cause__
    │   └── BackendUnavailable     the circuit breaker is open, no call was made
    ├── CallableError              a key, cost, priority or fair_key function failed
    │                              for one request, or the JSON body they read is bad
    │                              (it cannot be rated); its error is __cause__
    ├── LeaseError                 misuse of a lease (released twice, unknown)
    └── RateLimited                `Limiter.acquire` was refused; carries the decision
                                   (defined beside `Decision`, in core/decision.py)

A refused request is not an exception: it is a `Decision` value (the middleware
answers it; `Limiter.check` returns it). Only `Limiter.acquire`, whose block
must not run, raises `RateLimited`.
"""

from __future__ import annotations


class RateLimitError(Exception):
    """Root of every exception raised by ratelimit."""


class ConfigError(RateLimitError, ValueError):
    """A configuration value is wrong; the message names the field and what was expected."""

    def __init__(self, field: str, expected: str, got: object = ...) -> None:
        self.field = field
        self.expected = expected
        self.got = got
        message = f"{field}: expected {expected}"
        if got is not ...:
            message += f", got {got!r}"
        super().__init__(message)

    def under(self, prefix: str) -> ConfigError:
        """Return the same error with its field path placed under `prefix`.

        `"rate"` under `"rules[2].limits[0]"` is `rules[2].limits[0].rate`; an
        index (`"[3]"`) joins without a dot; an empty side adds nothing.
        """
        if not prefix or not self.field:
            field = prefix or self.field
        elif self.field.startswith("["):
            field = prefix + self.field
        else:
            field = f"{prefix}.{self.field}"
        return ConfigError(field, self.expected, self.got)


class BackendError(RateLimitError):
    """The backend could not answer; the driver's exception is kept as `__cause__`."""

    #: For a `refund` made of one call per Redis hash slot: the indices of the checks
    #: whose slots took it, though another failed (a settlement keeps those).
    applied: tuple[int, ...] = ()


class BackendUnavailable(BackendError):
    """The circuit breaker is open: the backend was not called at all."""


class CallableError(RateLimitError):
    """A user callable failed for one request: it raised (kept as `__cause__`), or
    returned what its role does not allow (a cost that is not an integer >= 1, a
    priority that is not a class of the limit).

    Raised by the engine before any backend call, so nothing was consumed. The
    middleware refuses such a request with 400, whatever the rule's `fail`
    policy: it is the request's fault, not the store's.
    """

    def __init__(self, role: str, func: object, rule: str, limit: str, problem: str) -> None:
        #: "key", "cost", "priority", "fair_key", or "body" (the JSON body they read).
        self.role = role
        #: The callable's `__qualname__` (its class's for a callable object).
        self.callable = callable_name(func)
        self.rule = rule
        #: The limit's policy name; "" for the rule's cost.
        self.limit = limit
        where = f"rule {rule!r}" + (f", limit {limit!r}" if limit else "")
        super().__init__(f"{role} function {self.callable} of {where}: {problem}")


def callable_name(func: object) -> str:
    """A callable's `__qualname__`, or its class's for an object with `__call__`."""
    name = getattr(func, "__qualname__", None)
    return name if isinstance(name, str) else type(func).__qualname__


class LeaseError(RateLimitError):
    """A lease was misused: released twice, or never granted."""
