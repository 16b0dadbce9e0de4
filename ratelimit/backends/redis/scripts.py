"""The Lua scripts, read once from the package's `.lua` files and called by SHA.

Each operation is one `.lua` file whose header states KEYS, ARGV and units.
What runs on the server is a clock prelude (`clock.lua`: the server's `TIME`),
the libraries the operation uses (`window.lua`: window checks; `leases.lua`:
lease weights; `checks.lua`: deciding checks; `queue.lua`:
waiting lines; `book.lua`: appointments), then the operation, so an operation
never takes "now" from a client and the steps shared by several operations are
written once.
Tests build the same operations on a manual clock prelude with `load_scripts`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

#: The operation files, without `.lua`.
OPERATIONS = (
    "decide",
    "refund",
    "renew",
    "release",
    "in_use",
    "enqueue",
    "wait",
    "leave",
    "queue_length",
    "appoint",
    "forget",
)
#: The library files each operation runs on, in order, after the clock prelude.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "decide": ("window", "leases", "checks"),
    "enqueue": ("window", "leases", "checks", "queue", "book"),
    "appoint": ("book",),
    "refund": ("window", "leases", "queue"),
    "release": ("leases", "queue"),
    "in_use": ("leases",),
    "wait": ("leases", "queue"),
    "leave": ("leases", "queue"),
    "forget": ("leases", "queue"),
}


@dataclass(frozen=True, slots=True)
class Script:
    """One script as sent to Redis: its source and the SHA1 that `EVALSHA` names it by."""

    name: str
    source: str
    sha: str

    @classmethod
    def build(cls, name: str, source: str) -> Script:
        """A script with its SHA1 computed locally (what `SCRIPT LOAD` would answer)."""
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class ScriptSet:
    """Every operation the backend runs, all on the same clock prelude."""

    decide: Script
    refund: Script
    renew: Script
    release: Script
    in_use: Script
    enqueue: Script
    wait: Script
    leave: Script
    queue_length: Script
    appoint: Script
    forget: Script

    def all(self) -> tuple[Script, ...]:
        """Every script, in field order (what a new connection loads)."""
        return tuple(getattr(self, name) for name in OPERATIONS)


def read_lua(name: str) -> str:
    """The text of `<name>.lua` shipped in this package."""
    package = resources.files(__package__ or __name__)
    return package.joinpath(f"{name}.lua").read_text(encoding="utf-8")


def load_scripts(clock: str | None = None) -> ScriptSet:
    """Every operation prefixed with `clock` (default: `clock.lua`, the server's TIME)
    and its libraries."""
    prelude = read_lua("clock") if clock is None else clock
    built = {}
    for name in OPERATIONS:
        libraries = [read_lua(library) for library in LIBRARIES.get(name, ())]
        built[name] = Script.build(name, "\n".join([prelude, *libraries, read_lua(name)]))
    return ScriptSet(**built)


#: The production scripts, read once at import.
SCRIPTS = load_scripts()
