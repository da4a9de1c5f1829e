"""The replay cache: which messages' bodies were already seen, for how long.

Every reader of a signed body (a UA, a proxy) checks its ``SipContext``: made within
the time window, and not seen before.  A message is identified by the fields of its
context (``SipContext.replay_key``), which are the same on every copy of it whatever
path it took, and different for every new request and every retry (a new CSeq).

What a repeat is depends on who reads:

* a proxy never sees a retransmission (Kamailio's tm absorbs them before the script
  runs), so any second sighting is a replay;
* a UA sees them (its hook runs before pjsip's transaction layer), so a repeat that
  carries the same top Via branch within a transaction's lifetime is a
  retransmission and passes; pjsip then matches it to its transaction.

Bounded in count and age.  An entry lives while its body could still pass the time
check (its own time, or when it was seen, plus the window and a transaction's
lifetime); when the table is full the oldest entries go, and every entry that goes,
by age or by count, raises a floor: a body made at or before it is refused as stale,
so an attacker who floods the table, or steps a reader's clock forward and back,
only makes old messages fail, never replays pass.
"""

from __future__ import annotations

import hashlib
import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from .errors import ReplayError
from .sipcontext import SipContext

__all__ = ["ReplayCache", "MemoryReplayCache", "TRANSACTION_LIFETIME", "DEFAULT_WINDOW",
           "short_digest"]

TRANSACTION_LIFETIME = 32.0     # 64*T1: a retransmission comes no later than this
DEFAULT_WINDOW = 300.0          # seconds a body's time may differ from ours


@runtime_checkable
class ReplayCache(Protocol):
    """Where a reader records the messages it has seen (shared by all workers of a
    proxy: Kamailio's htable in ``kamailio_app``)."""

    def check_and_record(self, context: SipContext, branch: str | None, *,
                         retransmissions: bool, to_tag: str | None = None) -> None:
        """Record ``context``; ``ReplayError`` if it was seen before (and, with
        ``retransmissions``, the repeat is not one: another ``branch`` or too late).
        ``to_tag``: a response's, part of what is recorded (``replay_key``)."""

    def admit_fork(self, early: str, tag: str, limit: int, *, made: float | None = None,
                   claim: bool = True, shared: bool = True) -> int | None:
        """Which of the first ``limit`` dialogs grown from the early dialog ``early``
        (Call-ID and the tag it began with) the one with the other tag ``tag`` is,
        recorded on its first sighting (``claim``; else only looked up); None when
        ``limit`` others came first, or, not claiming, when ``tag`` holds none.  Kept
        while the message asking (its body ``made`` then) could pass the time check:
        the later of now and ``made``, plus the window and a transaction's lifetime
        (the early dialog's keys live ``EARLY_DIALOG_TTL``, less than that).
        ``shared``: a new slot may be claimed across the readers that share this cache
        (a cluster's database); False keeps the decision local (nothing kept or signed
        is at stake, so a stranger's message costs no shared write)."""


class MemoryReplayCache:
    """A ``ReplayCache`` in this process (a UA, or one proxy worker in tests)."""

    def __init__(self, *, window: float = DEFAULT_WINDOW, max_entries: int = 65536,
                 clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1 or window <= 0:
            raise ValueError("max_entries and window must be positive")
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (first seen, branch, the context's time as counted, kept until)
        self._seen: OrderedDict[str, tuple[float, str | None, int, float]] = OrderedDict()
        self._expiries: list[tuple[float, str]] = []   # a heap of (kept until, key)
        self._floor = -1   # bodies made at or before this are no longer remembered: stale
        # early dialog -> (remembered until, its forks' tags in order), oldest first
        self._forks: OrderedDict[bytes, tuple[float, list[bytes]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_record(self, context: SipContext, branch: str | None, *,
                         retransmissions: bool, to_tag: str | None = None) -> None:
        now = self._clock()
        context.check_time(now, self.window)
        key = context.replay_key(to_tag)
        with self._lock:
            self._expire(now)
            if context.time <= self._floor:
                raise ReplayError("the body is older than what the replay cache still holds")
            seen = self._seen.get(key)
            if seen is not None:
                first, first_branch, _, _ = seen
                if retransmissions and branch is not None and branch == first_branch \
                        and now - first <= TRANSACTION_LIFETIME:
                    return   # the same transaction again: the stack absorbs it
                raise ReplayError("the body of this message was seen before")
            # Kept while the body could still pass the time check, however far the
            # sender's clock is ahead of ours: until its own time plus the window, never
            # less than a window after we saw it.
            until = max(now, float(context.time)) + self.window + TRANSACTION_LIFETIME
            # For the floor, a time claimed in the future counts as now: a flood of such
            # bodies must not push the floor past the messages honest senders are making.
            self._seen[key] = (now, branch, min(context.time, int(now)), until)
            heapq.heappush(self._expiries, (until, key))
            while len(self._seen) > self.max_entries:
                _, (_, _, made, _) = self._seen.popitem(last=False)
                self._floor = max(self._floor, made)

    def admit_fork(self, early: str, tag: str, limit: int, *, made: float | None = None,
                   claim: bool = True, shared: bool = True) -> int | None:
        now = self._clock()
        until = max(now, made or now) + self.window + TRANSACTION_LIFETIME
        # digests, as replay keys are: a Call-ID, tag or AoR may be kilobytes long
        early_key, tag_key = short_digest(early), short_digest(tag)
        with self._lock:
            while self._forks:            # oldest first: expired, or past the bound
                first = next(iter(self._forks))
                if self._forks[first][0] >= now and len(self._forks) < self.max_entries:
                    break
                del self._forks[first]
            entry = self._forks.get(early_key)
            if entry is not None and entry[0] < now:
                del self._forks[early_key]    # expired behind a longer-lived head
                entry = None
            tags = entry[1] if entry is not None else []
            if tag_key in tags:
                slot: int | None = tags.index(tag_key)
                extend = bool(made and made > now)    # a body made ahead comes later
            elif not claim or len(tags) >= limit:
                slot, extend = None, False
            else:
                tags.append(tag_key)
                slot, extend = len(tags) - 1, True
            if extend:    # kept while its latest holder could pass the time check
                self._forks[early_key] = (max(until, entry[0] if entry else until), tags)
            return slot

    def _expire(self, now: float) -> None:
        """Forget what can no longer pass the time check; what is forgotten raises the
        floor, so a clock stepped forward (a sweep) and back again lets nothing through."""
        while self._expiries and self._expiries[0][0] < now:
            until, key = heapq.heappop(self._expiries)
            entry = self._seen.get(key)
            if entry is not None and entry[3] == until:   # not already pushed out by count
                del self._seen[key]
                self._floor = max(self._floor, entry[2])
        if len(self._expiries) > 2 * self.max_entries:     # drop heap items of evicted keys
            self._expiries = [(u, k) for u, k in self._expiries
                              if k in self._seen and self._seen[k][3] == u]
            heapq.heapify(self._expiries)


def short_digest(text: str) -> bytes:
    """16 octets of SHA-256 of ``text``: what the fork tables keep of an early dialog's ids
    and a tag (both tables, so one digest)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]
