"""What a request costs, by dimension, and which units each limit counts.

A rule's cost is an int (that many `requests`) or a mapping of dimension
names to units (`{"input_tokens": 812, "output_tokens": 256, "images": 4}`),
in which `requests` is 1 unless given. A limit counts one dimension
(`counts="input_tokens"`) or a weighted sum of several
(`counts={"input_tokens": 1, "output_tokens": 4}`); by default `requests`.
A counted dimension the cost lacks is an error, never a free admission.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

from .._errors import ConfigError

#: The dimension every limit counts unless told otherwise, and an int cost's.
REQUESTS = "requests"
#: Largest units a request may cost in one dimension (and a weighted sum may reach): the
#: largest integer a double (Lua's number, the clock's float) holds exactly. Past it a
#: Redis window's INCRBY refuses the script's number (a backend failure: fail="open"
#: admitted it) and a bucket's wait overflows.
MAX_COST = 2**53

#: A cost as given: units of `requests`, or units per dimension.
Cost: TypeAlias = "int | Mapping[str, int]"
#: What a limit counts, as compiled by `counted`: ((dimension, weight), ...).
Counted: TypeAlias = tuple[tuple[str, int], ...]

#: What the default (`counts=None`) compiles to.
BY_REQUESTS: Counted = ((REQUESTS, 1),)


def _is_units(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COST


def counted(field: str, counts: object) -> Counted:
    """Validate a limit's `counts=` (None, a dimension name, or name -> positive weight)."""
    from .limits import NAME_EXPECTED, NAME_RE  # the names of storage keys and fields

    if counts is None:
        return BY_REQUESTS
    expected = (
        'a dimension name like "input_tokens", or a mapping of dimension -> positive '
        'integer weight like {"input_tokens": 1, "output_tokens": 4}'
    )
    if isinstance(counts, str):
        counts = {counts: 1}
    if not isinstance(counts, Mapping) or not counts:
        raise ConfigError(field, expected, counts)
    out = []
    for name, weight in counts.items():
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"{field}.{name}", NAME_EXPECTED, name)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= MAX_COST:
            raise ConfigError(f"{field}.{name}", "a positive integer weight", weight)
        out.append((name, weight))
    # The default by another name is the default: the hot path tells it by identity.
    return BY_REQUESTS if tuple(out) == BY_REQUESTS else tuple(out)


def check_cost(value: object) -> Cost:
    """A cost value as given (by a rule, a cost function or a caller): validated.

    Raises ValueError saying what was expected; the callers name the source.
    """
    if isinstance(value, int) and not isinstance(value, bool) and _is_units(value):
        return value
    if isinstance(value, Mapping) and value:
        for name, units in value.items():
            if not isinstance(name, str):
                raise ValueError(f"dimension names (str), not {name!r}")
            if not _is_units(units):
                raise ValueError(
                    f"units of {name!r}: an integer from 0 to 2**53, not {units!r}"
                )
        return value
    raise ValueError(
        "an integer from 0 to 2**53, or a mapping of dimension -> such an integer"
    )


def check_taken(value: object) -> Cost:
    """A request's cost (from a cost function or a caller), validated: an int of at
    least 1, or a mapping whose `requests`, if given, is at least 1. Never nothing:
    a cost of nothing would admit a request taking from no limit (an exemption is
    a key function's None). ValueError says what was expected."""
    if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= MAX_COST:
        raise ValueError("an integer from 1 to 2**53, or a mapping of dimension -> units")
    cost = check_cost(value)
    if not isinstance(cost, int) and cost.get(REQUESTS, 1) < 1:
        raise ValueError(f"at least 1 {REQUESTS!r} (a cost of none is free)")
    return cost


def settled(reserved: Cost, actual: Cost) -> Cost:
    """The cost a request settles at: `actual`'s dimensions, and `reserved`'s for those
    it leaves out. An int settles an int cost; a cost per dimension is settled per
    dimension (ValueError for an int: 812 meant as tokens would settle requests)."""
    if isinstance(actual, int):
        if isinstance(reserved, int):
            return actual
        raise ValueError(
            f"units per dimension like {{{', '.join(f'{k!r}: ...' for k in reserved)}}} "
            "(the request's cost is per dimension)"
        )
    if isinstance(reserved, int):
        return {REQUESTS: reserved, **actual}
    return {**reserved, **actual}


def units(counts: Counted, cost: Cost) -> int:
    """The units a limit counting `counts` takes for a request costing `cost`.

    Raises ValueError when the cost lacks a counted dimension (other than
    `requests`, 1 by default) or the weighted sum passes MAX_COST.
    """
    if isinstance(cost, int):
        if counts is BY_REQUESTS:
            return cost
        cost = {REQUESTS: cost}
    total = 0
    for name, weight in counts:
        got = cost.get(name)
        if got is None:
            if name != REQUESTS:
                raise ValueError(f"a cost of {name!r} (this limit counts it): none was given")
            got = 1
        total += weight * got
    if total > MAX_COST:
        raise ValueError(f"a weighted cost of at most 2**53, not {total}")
    return total


def describe(counts: Counted) -> str:
    """`counts` as a user wrote it: `input_tokens`, or `input_tokens+4*output_tokens`."""
    return "+".join(name if weight == 1 else f"{weight}*{name}" for name, weight in counts)


def check_static(field: str, counts: Counted, cost: Cost) -> None:
    """A constant cost must price what a limit counts (else every request is refused);
    the error says how, since the default cost of 1 request prices no other dimension."""
    try:
        units(counts, cost)
    except ValueError as exc:
        example = ", ".join(f'"{name}": 1' for name, _ in counts)
        hint = (
            f"{exc}; give the rule a cost that has it, e.g. cost={{{example}}} (a cost "
            "function's, or acquire(cost=...)'s, replaces it per request)"
        )
        raise ConfigError(field, hint, cost) from None
