"""``ReplayCache.admit_fork``: how many dialogs one early dialog may grow keys under, the
same in one process (``MemoryReplayCache``) and in Kamailio's shared table
(``HtableReplayCache`` over the stand-in htable)."""

from __future__ import annotations

import pytest

from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.replay import MemoryReplayCache
from kamailio_app.replay_htable import HtableReplayCache

WINDOW = 300.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _memory(clock: Clock):
    return MemoryReplayCache(window=WINDOW, clock=clock)


def _htable(clock: Clock):
    return HtableReplayCache(MemoryHtable(clock), window=WINDOW, clock=clock)


CACHES = pytest.mark.parametrize("make", [_memory, _htable], ids=["memory", "htable"])


@CACHES
def test_each_tag_keeps_its_slot_and_a_fifth_gets_none(make):
    cache = make(Clock())
    assert [cache.admit_fork("call\na1", tag, 4) for tag in ("b1", "b2", "b1", "b3", "b4")] \
        == [0, 1, 0, 2, 3]
    assert cache.admit_fork("call\na1", "hop", 4) is None
    assert cache.admit_fork("call\na1", "b3", 4) == 2          # still its own
    assert cache.admit_fork("call\na2", "hop", 4) == 0         # another early dialog


@CACHES
def test_slots_are_forgotten_after_the_window_and_a_transaction(make):
    clock = Clock()
    cache = make(clock)
    for tag in ("b1", "b2", "b3", "b4"):
        cache.admit_fork("call\na1", tag, 4)
    clock.now += WINDOW + 10
    assert cache.admit_fork("call\na1", "late", 4) is None     # (the early key is gone by now)
    clock.now += 30
    assert cache.admit_fork("call\na1", "late", 4) == 0


def test_the_memory_table_is_bounded_in_early_dialogs():
    cache = MemoryReplayCache(window=WINDOW, max_entries=8, clock=Clock())
    for n in range(100):
        assert cache.admit_fork(f"call-{n}\na1", "b1", 4) == 0
    assert len(cache._forks) <= 8
