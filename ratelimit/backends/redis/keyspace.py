"""Every Redis key and channel name of a backend: the one module that spells them.

Limiter state of a `StoreKey` is `<prefix>:{<rule>:<caller>}:<limit>:<kind>`
(kind `tat` a bucket, `leases` a lease table, `win` a window, and the line's).
The braces are the hash tag: every key of one rule and one caller hashes to one
Redis Cluster slot, so a rule's script for that caller touches one slot; the
shared caller `*` gets its own slot per rule. Only safe text reaches a key:
configuration names from a fixed character set and the caller as a hex digest,
checked here (no brace or colon can move a key to another caller or slot).

The rest, all under the same prefix::

    <prefix>:queue                   channel: the queue scripts' hand-offs and sheds
    <prefix>:{overrides}             hash: live overrides by slot, and "#version"
    <prefix>:overrides               channel: the overrides' new version after a change
    <prefix>:{overrides}:workers     hash: worker id -> what it applied (its report)
    <prefix>:{overrides}:seen        sorted set: worker id -> time of its last report
    <prefix>:{top}:w:<worker>        string: a worker's last top-callers window (JSON)
    <prefix>:{top}:seen              sorted set: worker id -> time of its last window

The override keys share one hash tag, the top-callers keys another: each
group lives in one cluster slot.
"""

from __future__ import annotations

import re
from functools import lru_cache

from redis.crc import key_slot

from ..._errors import ConfigError
from ..base import StoreKey

#: The configuration-name rule of the policy layer (which this layer may not import).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: A caller is a lowercase hex digest of the caller's key, or `*` for a shared key.
_CALLER = re.compile(r"\*|[0-9a-f]{1,128}")
#: A prefix may hold `:` separators but never a brace (it would become the hash tag).
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

#: Keys built per backend are cached; callers beyond this are rebuilt (cheap).
_CACHE_SIZE = 16_384


class Keyspace:
    """Builds and caches the Redis keys of one backend's prefix."""

    def __init__(self, prefix: str) -> None:
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise ConfigError(
                "prefix", "1 to 64 letters, digits, '_', '.', ':' or '-' (no braces)", prefix
            )
        self.prefix = prefix
        self._locate = lru_cache(maxsize=_CACHE_SIZE)(self._build)
        #: Channel the queue scripts publish hand-offs and sheds on.
        self.queue_channel = f"{prefix}:queue"
        #: Hash of the live overrides (slot -> JSON, and "#version").
        self.overrides = f"{prefix}:{{overrides}}"
        #: Channel announcing the overrides' version after each change.
        self.overrides_channel = f"{prefix}:overrides"
        #: Hash of the workers' reports, and the sorted set of when each last reported.
        self.reports = f"{prefix}:{{overrides}}:workers"
        self.reports_seen = f"{prefix}:{{overrides}}:seen"
        #: Sorted set of the workers publishing top-callers windows, by last publish.
        self.top_seen = f"{prefix}:{{top}}:seen"
        self._top_window = f"{prefix}:{{top}}:w:"

    def bucket(self, key: StoreKey) -> str:
        """The string holding a GCRA bucket's state."""
        return self._locate(key)[0]

    def window(self, key: StoreKey) -> str:
        """The key holding a window's state (a string; a list for a moving window)."""
        return self._locate(key)[0][:-3] + "win"  # beside the bucket's ":tat"

    def leases(self, key: StoreKey) -> str:
        """The sorted set holding a concurrency key's leases."""
        return self._locate(key)[1]

    def queue(self, key: StoreKey) -> tuple[str, str, str, str]:
        """The waiting line in front of `key`'s leases: line, tickets, fair counts, meta.

        Same hash tag as the lease table, so a hand-off is one script call on one
        slot (see `queue.lua` for what each key holds).
        """
        return self._locate(key)[4]

    def book(self, key: StoreKey) -> tuple[str, str, str]:
        """The appointments given for `key`'s slots: due times, ranks, meta.

        Same hash tag as the line (see `book.lua` for what each key holds).
        """
        return self._locate(key)[5]

    def tag(self, key: StoreKey) -> str:
        """The hash tag (with braces): keys with equal tags share a cluster slot."""
        return self._locate(key)[2]

    def slot(self, key: StoreKey) -> int:
        """The Redis Cluster hash slot (0..16383) of every key of `key`'s tag."""
        return self._locate(key)[3]

    def top_window(self, worker: str) -> str:
        """The string holding `worker`'s last top-callers window."""
        return self._top_window + worker

    def callers(self, rule: str, limit: str, kind: str) -> str:
        """A SCAN pattern for the `kind` keys ("tat", "leases", "line") of every caller."""
        return f"{self.prefix}:{{{_glob(rule)}:*}}:{_glob(limit)}:{kind}"

    def of_caller(self, caller: str, rule: str | None, kind: str) -> str:
        """A SCAN pattern for the `kind` keys of one caller, in `rule` or every rule."""
        return f"{self.prefix}:{{{'*' if rule is None else _glob(rule)}:{_glob(caller)}}}:*:{kind}"

    def store_key(self, name: str | bytes, kind: str) -> StoreKey | None:
        """The `StoreKey` whose `kind` key is `name` (None: not one of this prefix's)."""
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        head = f"{self.prefix}:{{"
        tail = f":{kind}"
        if not (text.startswith(head) and text.endswith(tail)):
            return None
        tag, sep, limit = text[len(head) : -len(tail)].partition("}:")
        rule, colon, caller = tag.partition(":")
        if not (sep and colon and _NAME.fullmatch(rule) and _NAME.fullmatch(limit)):
            return None
        if not _CALLER.fullmatch(caller):
            return None
        return StoreKey(rule, limit, caller)

    def _build(
        self, key: StoreKey
    ) -> tuple[str, str, str, int, tuple[str, str, str, str], tuple[str, str, str]]:
        rule, limit, caller = key
        if not isinstance(rule, str) or not _NAME.fullmatch(rule):
            raise ConfigError("StoreKey.rule", "a configuration name", rule)
        if not isinstance(limit, str) or not _NAME.fullmatch(limit):
            raise ConfigError("StoreKey.limit", "a configuration name", limit)
        if not isinstance(caller, str) or not _CALLER.fullmatch(caller):
            raise ConfigError("StoreKey.caller", "a lowercase hex digest or '*'", caller)
        tag = f"{{{rule}:{caller}}}"
        base = f"{self.prefix}:{tag}:{limit}"
        queue = (f"{base}:line", f"{base}:tickets", f"{base}:fair", f"{base}:meta")
        book = (f"{base}:book", f"{base}:bookranks", f"{base}:bookmeta")
        return f"{base}:tat", f"{base}:leases", tag, key_slot(tag.encode()), queue, book


def _glob(text: str) -> str:
    """`text` with SCAN's glob characters escaped (configuration names hold none; be sure)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
