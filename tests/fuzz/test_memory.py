"""No memory growth: the same hostile inputs, over and over, leave nothing behind.

For each target, its seeds plus a fixed set of mutations run a few rounds to
warm up (caches that are meant to fill, fill: the OID cache, the engines' key
caches for the dialogs in the seeds), then more rounds under tracemalloc,
reading what is still allocated after 2, 6 and 10 of them.  A leak adds about
the same to each window; the last window must add at most 8 KiB (or clearly
less than the one before).  A long run to a plateau (600 rounds of the mime
target: 17.6 -> 42.7 -> 52.6 -> 54.2 KB after 10/100/300/600) showed the
small early growth is the interpreter's, not ours.  The figures are printed
at the end and kept in docs/reliability.md; ``make fuzz`` adds libFuzzer's
RSS over millions of inputs.
"""

from __future__ import annotations

import gc
import random
import tracemalloc

import pytest
from fuzzreport import MEMORY

from e2m_lab import fuzzkit

WARMUP, FIRST, WINDOW, MUTANTS = 3, 2, 4, 20
# A leak grows every window by about the same amount; warm-up effects
# (interpreter freelists, interned strings, the re module's caches, entries
# written again) are over after the first rounds or shrink from one window to
# the next.  So the last window must add at most SLACK bytes, or clearly less
# than the window before it.
SLACK = 8 * 1024
# ua_react (a fresh UAEngine per input, each protecting a retry) keeps 8.1-9.3 KB in this
# test's last window (6.5-7.2 KB at b62b6dd), and it is not a leak: run on, it levels
# off (73.6, 77.3, 77.9 KB still allocated after 200, 400, 800 rounds; 2026-12-03), with
# no dict, list, set or lru_cache of ours growing. The last window here is still on the
# way up to that plateau, so this target gets a larger allowance.
SLACK_FOR = {"ua_react": 12 * 1024}


# Only what was allocated under fuzzkit.run_one counts: tracemalloc sees every
# thread, and in a whole-suite run a thread an earlier test left behind (a reader
# of a child's output) once added 130-330 KB per window to this target's count.
_DEPTH = 64
_UNDER_THE_TARGET = tracemalloc.Filter(True, fuzzkit.__file__, all_frames=True)


def _held_by_the_target() -> int:
    if not tracemalloc.is_tracing():
        return 0                       # the warm-up rounds
    snapshot = tracemalloc.take_snapshot().filter_traces([_UNDER_THE_TARGET])
    return sum(stat.size for stat in snapshot.statistics("filename"))


@pytest.mark.parametrize("name", sorted(fuzzkit.TARGETS))
def test_repeated_hostile_input_does_not_grow_memory(kit, name):
    target = fuzzkit.TARGETS[name]
    seeds = target.seeds(kit)
    rng = random.Random(f"memory-{name}")
    inputs = seeds + [fuzzkit.mutate(rng, seeds) for _ in range(MUTANTS)]

    def rounds(n: int) -> int:
        for _ in range(n):
            for data in inputs:
                # tracemalloc slows each run manyfold: the time bound is the fuzz
                # tests' to check (tests/fuzz/test_no_untyped_errors.py), not this one's
                fuzzkit.run_one(target, kit, data, timed=False)
        gc.collect()
        return _held_by_the_target()

    for _ in range(WARMUP):
        rounds(1)
    tracemalloc.start(_DEPTH)
    try:
        m1 = rounds(FIRST)
        m2 = rounds(WINDOW)
        m3 = rounds(WINDOW)
    finally:
        tracemalloc.stop()
    MEMORY[name] = (len(inputs) * (FIRST + 2 * WINDOW), m1, m2, m3)
    growth, previous = m3 - m2, m2 - m1
    assert growth <= SLACK_FOR.get(name, SLACK) or growth <= 0.6 * previous, (
        f"{name}: traced memory {m1} -> {m2} -> {m3} bytes, "
        f"{WINDOW} rounds of {len(inputs)} inputs apart: it keeps growing")
