"""Every script call's KEYS and ARGV, and every reply read back: the scripts' layouts in one place.

checks.lua's layout (a kind letter and three numbers per check, each lease
check bringing its line's keys) is shared by decide.lua, enqueue.lua and
refund.lua; it is written here only, as are the replies' shapes. Calls made
again and again (a caller's next decision, a lease's release) are packed once
and kept (`_CallTemplate`): between a caller's requests only the lease ids change.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from ..base import (
    BucketCheck,
    Check,
    CheckResult,
    Entry,
    LeaseCheck,
    QueueCheck,
    StoreKey,
    Verdict,
    WindowCheck,
)
from .ghosts import Undo
from .keyspace import Keyspace
from .resp import pack_script_call
from .scripts import Script, ScriptSet

#: A script call: KEYS, ARGV and the packed EVALSHA.
Call = tuple[list[str], list[str], bytes]

#: Seconds a ticket lives without a heartbeat: the waiters of a worker that died
#: leave the line within this. A heartbeat never extends a ticket past the waiter's
#: deadline plus TICKET_MARGIN.
TICKET_TTL = 5.0
TICKET_MARGIN = 1.0

#: Packed calls kept per backend, of each kind (as many as the engine's key cache).
_KEPT = 4096


class Calls:
    """Builds every script call of one backend (its key names, scripts and channel)."""

    def __init__(self, keys: Keyspace, scripts: ScriptSet) -> None:
        self.keys = keys
        self.scripts = scripts
        #: Where the queue scripts publish hand-offs and sheds (one channel per prefix).
        self.channel = keys.queue_channel
        #: One bucket's decide call per caller, packed (see `bucket`).
        self.buckets: dict[BucketCheck, Call] = {}
        #: Other decide calls and releases, packed but for their lease ids.
        self._decides: dict[tuple[Any, ...], _CallTemplate] = {}
        self._releases: dict[StoreKey, _CallTemplate] = {}

    # -- decide.lua, refund.lua, enqueue.lua: checks.lua's layout -----------------

    def bucket(self, check: BucketCheck) -> Call:
        """decide.lua for one bucket, kept per check (the engine reuses one per caller)."""
        call = self.buckets.get(check)
        if call is None:
            if len(self.buckets) >= _KEPT:
                self.buckets.clear()
            keys, args = self.decide_args((check,), "1")
            packed = pack_script_call("EVALSHA", self.scripts.decide.sha, keys, args)
            call = self.buckets[check] = (keys, args, packed)
        return call

    def decide(self, checks: Sequence[Check]) -> Call:
        """decide.lua for `checks`, from a template kept per rule and caller."""
        shape: list[Any] = []
        ids: list[str] = []
        for c in checks:
            if c.__class__ is LeaseCheck:
                shape.append(c[:3])  # key, limit, ttl
                ids.append(c[3])
            elif c.__class__ is WindowCheck:
                shape.append(c[:5])  # all but the receipt, this request's own
            else:
                shape.append(c)
        template = self._decides.get(tuple(shape))
        if template is None:
            if len(self._decides) >= _KEPT:
                self._decides.clear()
            keys, args = self.decide_args(checks, "1")
            # Lease check i's id is ARGV[4i + 4] (0-based): after the commit flag, four each.
            holes = tuple(4 * i + 4 for i, c in enumerate(checks) if c.__class__ is LeaseCheck)
            template = _CallTemplate(self.scripts.decide, keys, args, holes)
            self._decides[tuple(shape)] = template
        return template.fill(ids)

    def decide_args(self, checks: Sequence[Check], commit: str) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of decide.lua (`commit` "0": a dry run): each lease brings its line."""
        keys, lines, args = self._checks(checks, 1)
        return keys + lines, [commit, *args]

    def refund_args(self, checks: Sequence[Check]) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of refund.lua: each lease check brings its line's four keys; a
        window check that took nothing (no receipt) is left out, unless it charges (a
        negative cost: a settlement's debt). No KEYS: nothing to do."""
        keys, lines, args = self._checks(checks, 4, refund=True)
        return keys + lines, [self.channel, *args]

    def enqueue_args(
        self, checks: Sequence[Check], index: int, queue: QueueCheck
    ) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of enqueue.lua for `checks` (one slot), queued lease `checks[index]`."""
        keys, lines, check_args = self._checks(checks, 1)
        key = queue.lease.key
        guaranteed = " ".join(f"{rank} {slots}" for rank, slots in queue.guaranteed)
        args = [
            str(index + 1),
            self.channel,
            str(queue.capacity),
            str(queue.rank),
            queue.fair,
            str(queue.max_position),
            guaranteed,
            repr(TICKET_TTL),
            repr(float(queue.spacing)),
            *check_args,
        ]
        return [*keys, *lines, *self.keys.queue(key)[1:], *self.keys.book(key)], args

    def _checks(
        self, checks: Sequence[Check], queue_keys: int, *, refund: bool = False
    ) -> tuple[list[str], list[str], list[str]]:
        """The checks' state keys, the first `queue_keys` line keys of each lease check,
        and the checks' ARGV (checks.lua's layout; refund.lua's with `refund`: a window
        brings the time its units were taken instead of its limit)."""
        keys: list[str] = []
        lines: list[str] = []
        args: list[str] = []
        for check in checks:
            if isinstance(check, BucketCheck):
                keys.append(self.keys.bucket(check.key))
                args += ("t", repr(check.interval), str(check.burst), str(check.cost))
            elif isinstance(check, WindowCheck):
                if refund and not check.receipt and check.cost >= 0:
                    continue  # took nothing: nothing to give back
                keys.append(self.keys.window(check.key))
                if refund:
                    # A charge with no receipt goes to the window open now (any `at`).
                    first = repr(check.receipt[-1]) if check.receipt else "0"
                else:
                    first = str(check.limit)
                args += (_WINDOW_KINDS[check.strategy], first, repr(check.period), str(check.cost))
            else:
                keys.append(self.keys.leases(check.key))
                lines += self.keys.queue(check.key)[:queue_keys]
                args += ("l", str(check.limit), repr(check.ttl), check.lease_id)
        return keys, lines, args

    # -- one lease, one line ------------------------------------------------------

    def release(self, lease: LeaseCheck) -> Call:
        """release.lua for `lease` (a template per key)."""
        template = self._releases.get(lease.key)
        if template is None:
            if len(self._releases) >= _KEPT:
                self._releases.clear()
            template = self._releases[lease.key] = _CallTemplate(
                self.scripts.release, self._line(lease.key), [lease.lease_id, self.channel], (0,)
            )
        return template.fill([lease.lease_id])

    def renew_args(self, leases: Sequence[LeaseCheck]) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of renew.lua: a lease table and (ttl, id) per lease."""
        args: list[str] = []
        for lease in leases:
            args += (repr(lease.ttl), lease.lease_id)
        return [self.keys.leases(lease.key) for lease in leases], args

    def wait_args(self, lease: LeaseCheck, member: str, left: float) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of wait.lua, keeping the ticket alive for at most `left` s more."""
        ttl = min(TICKET_TTL, left + TICKET_MARGIN)
        return self._line(lease.key), [member, repr(ttl), self.channel]

    def leave_args(
        self, lease: LeaseCheck, member: str, *, release: bool
    ) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of leave.lua (with `release`, a slot granted meanwhile is freed)."""
        return self._line(lease.key), [member, "1" if release else "0", self.channel]

    def appoint_args(self, queue: QueueCheck) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of appoint.lua: the line's tickets and book, the rank and spacing."""
        key = queue.lease.key
        keys = [self.keys.queue(key)[1], *self.keys.book(key)]
        return keys, [str(queue.rank), queue.fair, repr(float(queue.spacing))]

    def undos(self, checks: Sequence[Check]) -> list[Undo]:
        """forget.lua's KEYS and ARGV, and the ttl, for each lease among `checks`."""
        return [
            (self._line(c.key), [c.lease_id, self.channel], c.ttl)
            for c in checks
            if isinstance(c, LeaseCheck)
        ]

    def _line(self, key: StoreKey) -> list[str]:
        """A lease table and its line's four keys: what the line scripts take."""
        return [self.keys.leases(key), *self.keys.queue(key)]


class _CallTemplate:
    """One script call packed once, with holes where lease ids go.

    Packing a call part by part costs a few microseconds a request; filling in
    the lease ids of a packed template costs a fraction of that. `holes` are the
    ARGV indices of the lease ids, in order.
    """

    __slots__ = ("args", "holes", "keys", "pieces", "script")

    def __init__(
        self,
        script: Script,
        keys: list[str],
        args: list[str],
        holes: tuple[int, ...],
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.holes = holes
        blank = list(args)
        for i in holes:
            blank[i] = _HOLE
        packed = pack_script_call("EVALSHA", script.sha, keys, blank)
        self.pieces = packed.split(_HOLE_PACKED)
        assert len(self.pieces) == len(holes) + 1

    def fill(self, ids: list[str]) -> Call:
        """KEYS, ARGV and the packed call with `ids` in the holes, in order."""
        if not ids:
            return self.keys, self.args, self.pieces[0]
        args = self.args.copy()
        pieces = self.pieces
        out = [pieces[0]]
        fits = True  # every id ASCII: its length in characters is its length in bytes
        for n, i in enumerate(self.holes, 1):
            lease_id = args[i] = ids[n - 1]
            fits = fits and lease_id.isascii()
            out.append(f"${len(lease_id)}\r\n{lease_id}\r\n".encode())
            out.append(pieces[n])
        if not fits:
            return self.keys, args, pack_script_call("EVALSHA", self.script.sha, self.keys, args)
        return self.keys, args, b"".join(out)


#: Where a lease id goes in a template: a byte no key, number or channel name holds.
_HOLE = "\x00"
_HOLE_PACKED = b"$1\r\n\x00\r\n"

#: checks.lua's results(): the verdict, then (admitted, remaining, retry_after,
#: reset_after) per check, as little-endian doubles.
_VERDICT = struct.Struct("<d")
_RESULT = struct.Struct("<dddd")
_ONE_RESULT = struct.Struct("<ddddd")
#: WindowCheck.strategy -> its kind in checks.lua's layout.
_WINDOW_KINDS = {"fixed": "f", "sliding": "s", "moving": "m", "day": "D", "month": "M"}
#: Builds a NamedTuple from a tuple in C (their classes construct through a Python __new__).
_new = tuple.__new__


def parse_decide(reply: bytes, checks: Sequence[Check] = ()) -> tuple[bool, list[CheckResult]]:
    """The verdict and per-check results of a decide.lua reply (checks.lua's results()).

    A reply whose window checks took units ends with the time they were taken:
    it goes on the receipt of each window check among `checks` that took some.
    """
    end = len(reply)
    if (end - 8) % 32:
        end -= 8
        (stamp,) = _VERDICT.unpack_from(reply, end)
        for check in checks:
            if check.__class__ is WindowCheck and check.cost > 0:
                check.receipt.append(stamp)
    return _VERDICT.unpack_from(reply)[0] == 1, [
        CheckResult(admitted == 1, int(remaining), retry_after, reset_after)
        for admitted, remaining, retry_after, reset_after in _RESULT.iter_unpack(reply[8:end])
    ]


def parse_one(reply: bytes) -> Verdict:
    """`parse_decide` for one check, without the loop (the commonest rule, one bucket)."""
    verdict, admitted, remaining, retry_after, reset_after = _ONE_RESULT.unpack(reply)
    result = _new(CheckResult, (admitted == 1, int(remaining), retry_after, reset_after))
    return _new(Verdict, (verdict == 1, (result,)))


def parse_enqueue(reply: Any, checks: Sequence[Check]) -> tuple[Entry, str]:
    """An enqueue.lua reply: the entry, and the ticket's text in line ("" if not queued)."""
    outcome, position, length, member, retry_in = (_text(part) for part in reply[:5])
    verdict, results = parse_decide(reply[5], checks)
    entry = Entry(
        outcome, Verdict(verdict, tuple(results)), int(position), int(length), float(retry_in)
    )
    return entry, member


def _text(part: Any) -> str:
    """A reply element as text (replies come as bytes, or int for integers)."""
    return part.decode() if isinstance(part, bytes) else str(part)
