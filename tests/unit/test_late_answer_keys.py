"""A failed INVITE's offer keys: kept ``LATE_ANSWER_TTL`` more, not dropped at once.

Review 125 HB2: a 2xx that comes after the INVITE's failure answer (a forking proxy's
other branch, the callee's after its own 486; tm relays a late 2xx) found the offer's
keys dropped by the failure route, and the call it made could not be read (alice's
re-INVITE 496 from her own proxy).  ``KeyCache.expire_within`` cuts a key's life
instead; both caches (in-process and on the htable) follow it, and the engine uses
it only for an INVITE that went out.  The wire test is review 125's module.
"""

from __future__ import annotations

import pytest

from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.keycache import DialogScope, MemoryKeyCache, TransactionScope, scope_key
from e2m_plugins.proxy import LATE_ANSWER_TTL, ProxyEngine
from kamailio_app.keycache_htable import HtableKeyCache

CEK = bytes(range(16))
EARLY = DialogScope("late@example.com", "alice-tag")
OTHER = b"ref-other"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _caches(clock: Clock):
    table = MemoryHtable(clock)
    return {"memory": MemoryKeyCache(clock=clock),
            "htable": HtableKeyCache(table, clock=clock)}, table


@pytest.mark.parametrize("kind", ["memory", "htable"])
def test_a_cut_key_lives_the_window_then_goes(kind):
    clock = Clock()
    cache = _caches(clock)[0][kind]
    cache.put(EARLY, b"ref-1", CEK, ttl=200.0, keeper="alice@example.com")
    cache.put(EARLY, OTHER, CEK, ttl=200.0, keeper="alice@example.com")
    cache.expire_within(EARLY, b"ref-1", LATE_ANSWER_TTL)
    clock.now += LATE_ANSWER_TTL - 1
    kept = cache.get(EARLY, b"ref-1", count=False)
    assert kept is not None and kept.keeper == "alice@example.com"   # a late 2xx reads it
    clock.now += 2
    assert cache.get(EARLY, b"ref-1", count=False) is None
    assert cache.get(EARLY, OTHER, count=False) is not None            # only that key


@pytest.mark.parametrize("kind", ["memory", "htable"])
def test_a_cut_never_lengthens_a_life(kind):
    clock = Clock()
    cache = _caches(clock)[0][kind]
    cache.put(EARLY, b"ref-1", CEK, ttl=5.0)
    cache.expire_within(EARLY, b"ref-1", LATE_ANSWER_TTL)
    clock.now += 6
    assert cache.get(EARLY, b"ref-1", count=False) is None


def test_the_htable_record_itself_expires_with_the_window():
    clock = Clock()
    caches, table = _caches(clock)
    cache = caches["htable"]
    cache.put(EARLY, b"ref-1", CEK, ttl=200.0)
    cache.expire_within(EARLY, b"ref-1", LATE_ANSWER_TTL)
    _, expires = table.data[scope_key(EARLY)]
    assert expires - clock.now <= LATE_ANSWER_TTL + 1
    assert not table.locked


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def drop(self, scope, reference):
        self.calls.append(("drop", scope, reference))

    def expire_within(self, scope, reference, seconds):
        self.calls.append(("expire_within", scope, reference, seconds))


@pytest.mark.parametrize("scope, may_follow, expected", [
    (EARLY, True, "expire_within"),                  # an INVITE that went out and failed
    (EARLY, False, "drop"),                          # nothing went out (a failed relay)
    (TransactionScope("m@example.com", 1, "z9hG4bK-m"), True, "drop"),   # a MESSAGE
])
def test_end_attempt_cuts_only_an_invites_keys_that_may_still_be_answered(scope, may_follow,
                                                                          expected):
    recorder = _Recorder()
    engine = ProxyEngine.__new__(ProxyEngine)     # only end_attempt's use of the cache
    engine.cache = recorder
    engine.end_attempt(scope, [b"ref-1"], answer_may_follow=may_follow)
    assert [call[0] for call in recorder.calls] == [expected]
    if expected == "expire_within":
        assert recorder.calls[0][3] == LATE_ANSWER_TTL
