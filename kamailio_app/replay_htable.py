"""The core's ``ReplayCache`` on a Kamailio ``htable``: one record for every worker.

A replayed request may reach any worker, so the messages already seen must be in
shared memory.  Each entry is one name, ``r`` plus the context's replay key, with its
own expiry (the time window plus a transaction's lifetime): the htable drops it even
if nobody asks again.  The check and the write happen under the name's slot lock,
so two workers handed the same message at once cannot both let it through.

A proxy never sees a request's retransmission here (tm absorbed it before the script
ran), so any second sighting is a replay.  A response is recorded only when it opened
with a kept CEK or offers one: a copy of it (tm relays every 2xx) is still read, but
spends no use and keeps nothing.  An early dialog's forks (``admit_fork``) are items
``f`` + a digest + the slot, each holding a digest of its dialog's tag.  Bounds: an entry lives while its body could pass
the time check (the later of now and the body's time, plus the window and 32 s); their number is the request rate times that, in shared memory; when a write
fails (shared memory full), the request is refused (``LimitExceededError``), never
let through unrecorded.  Values hold no message content.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from e2m_plugins.errors import ReplayError
from e2m_plugins.replay import TRANSACTION_LIFETIME, short_digest
from e2m_plugins.sipcontext import SipContext

from .keycache_htable import HtableBackend

__all__ = ["HtableReplayCache", "REPLAY_TABLE"]

REPLAY_TABLE = "e2mseen"    # declared in the cfg template


class HtableReplayCache:
    """``ReplayCache`` over an htable backend (``KsrHtable`` inside Kamailio)."""

    def __init__(self, backend: HtableBackend, *, window: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._backend = backend
        self.window = window
        self._clock = clock

    def check_and_record(self, context: SipContext, branch: str | None, *,
                         retransmissions: bool, to_tag: str | None = None) -> None:
        now = self._clock()
        context.check_time(now, self.window)
        name, ttl = self.entry(context, to_tag, now)
        self._backend.lock(name)
        try:
            seen = self._backend.get(name)
            if seen is not None:
                first, _, first_branch = seen.partition(" ")
                if retransmissions and branch is not None and branch == first_branch \
                        and now - _number(first) <= TRANSACTION_LIFETIME:
                    return
                raise ReplayError("the body of this message was seen before")
            self._backend.set(name, f"{now:.0f} {branch or ''}", ttl)
        finally:
            self._backend.unlock(name)

    def entry(self, context: SipContext, to_tag: str | None, now: float) -> tuple[str, int]:
        """The record's name and its life in seconds: kept while the body could pass the
        time check, however far the sender's clock runs ahead of ours."""
        ahead = max(0.0, context.time - now)
        return "r" + context.replay_key(to_tag), int(ahead + self.window + TRANSACTION_LIFETIME) + 1

    def admit_fork(self, early: str, tag: str, limit: int, *, made: float | None = None,
                   claim: bool = True, shared: bool = True,
                   take: Callable[[str, int], bool] | None = None) -> int | None:
        """``ReplayCache.admit_fork`` (``shared`` is for a cluster's wrapper, which
        passes ``take`` or not: this table is the node's own).  ``take(name, ttl)``,
        when given, is asked before a free slot is taken (a cluster's claim,
        ``replay_claims``): False means another node holds that slot, not yet
        replicated here, so the next one is tried and the slots this node sees may
        have gaps."""
        # slot i of an early dialog is one item, "f" + a digest of the early dialog + i,
        # holding a digest of its tag: a tag finds its slot with reads alone, a new
        # one takes the first free slot under that slot's lock.  Each lives while the
        # message asking could pass the time check (a body made ahead: longer).
        now = self._clock()
        ahead = max(0.0, (made or now) - now)
        ttl = int(ahead + self.window + TRANSACTION_LIFETIME) + 1
        base = "f" + short_digest(early).hex()
        mine = short_digest(tag).hex()
        names = [f"{base}{slot}" for slot in range(limit)]
        if take is not None:
            # gaps are possible: find this tag in any slot before claiming a new one
            for slot, name in enumerate(names):
                if self._backend.get(name) == mine:
                    return self._held(name, mine, ttl, ahead, slot)
            if not claim:
                return None
        for slot, name in enumerate(names):
            held = self._backend.get(name)
            if held is None:
                if not claim:
                    return None       # slots are taken in order: none further
                # the cluster's claim outside the slot lock: a slow database must not
                # hold up other workers whose names share the lock (review 41)
                if take is not None and not take(name, ttl):
                    continue          # another node's, on its way here
                self._backend.lock(name)
                try:
                    held = self._backend.get(name)
                    if held is None:
                        self._backend.set(name, mine, ttl)
                        return slot
                finally:
                    self._backend.unlock(name)
            if held == mine:
                return self._held(name, mine, ttl, ahead, slot)
        return None

    def _held(self, name: str, mine: str, ttl: int, ahead: float, slot: int) -> int:
        if ahead:                     # kept as long as this body could come again
            self._backend.set(name, mine, ttl)
        return slot


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0
