"""What the hostile-input tests measured, for the summary conftest.py prints.

A module of its own (not conftest.py) so test modules can import it by a
name no other directory's conftest shadows.
"""

from __future__ import annotations

import os

from e2m_lab import fuzzkit

EXAMPLES = int(os.environ.get("E2M_FUZZ_EXAMPLES", "100"))

# name -> fuzzkit.Stats, filled by the tests, printed at the end.
STATS: dict[str, fuzzkit.Stats] = {}
# family -> [(size, seconds)], filled by test_growth.
GROWTH: dict[str, list[tuple[int, float]]] = {}
OUTCOME: dict[str, str] = {}   # family -> what the largest input got (accepted or the error)
# target -> (inputs run while traced, bytes still allocated at three points)
MEMORY: dict[str, tuple[int, int, int, int]] = {}


def stats_for(name: str) -> fuzzkit.Stats:
    return STATS.setdefault(name, fuzzkit.Stats())
