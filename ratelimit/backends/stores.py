"""What a backend stores beside limiter state: live overrides, top-callers windows, admin reads.

Three small protocols, each given by a backend through an explicit method:

- `OverrideStore` (`backend.override_store()`): a versioned table of
  override entries (slot -> JSON text) with change announcements and worker
  reports. The entries are opaque here: the policy layer reads and writes
  them (`policy.overrides.Override.to_json`), the store only keeps them and
  drops lapsed ones, judged by the entry's `expires_at` field.
- `TopStore` (`backend.top_store()`, None for a backend of one process): each
  worker's last top-callers window (JSON text), expiring when the worker stops.
- `Admin` (`backend.admin()`): what the `ratelimit` command reads and resets
  over every caller (slots in use, requests waiting, a caller's buckets).

`override_store(backend)` and `top_store(backend)` ask a backend for its
store; a backend that has none (a third-party `Backend`) gets this process's
override store and no top store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

from .._types import Clock

__all__ = [
    "REPORTS_LIVE",
    "Admin",
    "MemoryOverrideStore",
    "OverrideStore",
    "Refresh",
    "StoreBackend",
    "Stored",
    "TopStore",
    "clears",
    "lapsed",
    "override_store",
    "top_store",
]

#: Seconds since its last report within which a worker counts as live (3 reports).
REPORTS_LIVE = 15.0

#: Called with an announced version (None: re-read whatever it is).
Refresh = Callable[[str | None], Awaitable[object]]


class Stored(NamedTuple):
    """An override store's content at one moment: its version and its entries by slot."""

    version: str | None
    #: slot ("rule/limit", "rule/*", "rule/!") -> the entry's JSON text, as stored.
    entries: dict[str, str]


class OverrideStore(Protocol):
    """Where overrides are kept. `shared`: other processes see and change them too."""

    shared: bool

    def now(self) -> float:
        """The store's clock, in seconds since the epoch: what `expires_at` is measured on."""
        ...

    async def sync_clock(self) -> float:
        """Read the store's clock now (a shared store's server time); return it."""
        ...

    async def load(self) -> Stored:
        """Everything stored now (lapsed entries may still be there; readers filter them)."""
        ...

    async def put(self, slot: str, text: str) -> str:
        """Store `text` in `slot` (replacing what was there); return the new version."""
        ...

    async def clear(self, rule: str, limit: str | None) -> tuple[dict[str, str], str | None]:
        """Remove the rule's entries (`limit`: only that limit's); return them and the version."""
        ...

    async def watch(self, refresh: Refresh) -> None:
        """Call `refresh` whenever another process may have changed the store (until cancelled)."""
        ...

    async def report(self, worker: str, data: Mapping[str, Any]) -> None:
        """Publish what this worker applied (for `ratelimit status`); a no-op when not shared."""
        ...

    async def reports(self, within: float = REPORTS_LIVE) -> dict[str, dict[str, Any]]:
        """Reports of the workers seen in the last `within` seconds, by worker id."""
        ...

    async def aclose(self) -> None:
        """Release what the store opened."""
        ...


class TopStore(Protocol):
    """Where the workers' top-callers windows meet (a store shared by the fleet)."""

    async def time(self) -> float:
        """The store's clock, in seconds since the epoch."""
        ...

    async def publish(self, worker: str, text: str, at: float, keep: float) -> None:
        """Store `worker`'s window `text`, ended at `at`, for `keep` seconds."""
        ...

    async def withdraw(self, worker: str) -> None:
        """Remove `worker`'s window (it no longer serves)."""
        ...

    async def windows(self) -> tuple[float, list[str]]:
        """The store's time and the windows of the workers still live (JSON texts)."""
        ...


class Admin(Protocol):
    """What the `ratelimit` command reads and changes over every caller of a limit."""

    async def in_use(self, rule: str, limit: str, shared: bool) -> int:
        """Slots held now: the shared key's, or the sum over every caller's."""
        ...

    async def waiting(self, rule: str, limit: str, shared: bool) -> int:
        """Requests waiting in line now: the shared key's line, or the sum over callers'."""
        ...

    async def forget(self, caller: str, rule: str | None, limit: str | None) -> list[str]:
        """Delete the token-bucket state of `caller` (a digest) in `rule` (and `limit`), or
        in every rule; return what was deleted, as the store names it."""
        ...


@runtime_checkable
class StoreBackend(Protocol):
    """A backend that gives its stores (both built-in backends do)."""

    def override_store(self) -> OverrideStore: ...
    def top_store(self) -> TopStore | None: ...
    def admin(self) -> Admin: ...


class MemoryOverrideStore:
    """Overrides of this process only: the `MemoryBackend`'s store, and the fallback of any
    backend that gives none. Nothing is shared: a change applies before `put` returns."""

    shared = False

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._slots: dict[str, str] = {}
        self._version = 0

    def now(self) -> float:
        return self._clock()

    async def sync_clock(self) -> float:
        return self._clock()

    async def load(self) -> Stored:
        return Stored(str(self._version), dict(self._slots))

    async def put(self, slot: str, text: str) -> str:
        now = self.now()
        self._slots = {s: t for s, t in self._slots.items() if not lapsed(t, now)}
        self._slots[slot] = text
        self._version += 1
        return str(self._version)

    async def clear(self, rule: str, limit: str | None) -> tuple[dict[str, str], str | None]:
        gone = {s: t for s, t in self._slots.items() if clears(s, rule, limit)}
        if not gone:
            return {}, str(self._version)
        for slot in gone:
            del self._slots[slot]
        self._version += 1
        return gone, str(self._version)

    async def watch(self, refresh: Refresh) -> None:
        return None  # nobody else writes this store

    async def report(self, worker: str, data: Mapping[str, Any]) -> None:
        return None

    async def reports(self, within: float = REPORTS_LIVE) -> dict[str, dict[str, Any]]:
        return {}

    async def aclose(self) -> None:
        return None


def override_store(backend: object) -> OverrideStore:
    """The backend's override store; this process's for a backend that gives none."""
    if isinstance(backend, StoreBackend):
        return backend.override_store()
    return MemoryOverrideStore()


def top_store(backend: object) -> TopStore | None:
    """The backend's top-callers store (None: nothing to share beyond this process)."""
    return backend.top_store() if isinstance(backend, StoreBackend) else None


def clears(slot: str, rule: str, limit: str | None) -> bool:
    """Whether clearing `rule` (and `limit`) removes the entry in `slot`."""
    name, _, target = slot.partition("/")
    return name == rule and (limit is None or target == limit)


def lapsed(text: str, now: float) -> bool:
    """Whether the stored JSON `text` has an `expires_at` at or before `now`."""
    try:
        expires = json.loads(text).get("expires_at")
    except (ValueError, AttributeError):
        return False  # not ours to judge: leave it for a person to look at
    return isinstance(expires, (int, float)) and now >= expires
