"""Fixtures and the end-of-run figures for the hostile-input property tests.

``E2M_FUZZ_EXAMPLES`` (default 100) is the number of hypothesis examples per
target and strategy; CI keeps the default so the whole directory runs well
under a minute, a longer local run raises it.  ``make fuzz`` (atheris, see
``fuzz/run.py``) is the long, coverage-guided run.
"""

from __future__ import annotations


import pytest

from e2m_lab import fuzzkit
from fuzzreport import GROWTH, MEMORY, OUTCOME, STATS  # noqa: E402


@pytest.fixture(scope="session")
def kit() -> fuzzkit.Kit:
    return fuzzkit.kit()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    tr = terminalreporter
    if STATS:
        tr.write_sep("-", "hostile input: inputs run per target (typed rejections), slowest input")
        for name, s in sorted(STATS.items()):
            tr.write_line(f"  {name:<22} {s.runs:>6} inputs  {s.rejected:>6} rejected"
                          f"  max {s.max_seconds * 1e3:8.2f} ms ({s.max_size} bytes)"
                          + (f"  known bugs hit: {s.known}" if s.known else ""))
    if GROWTH:
        tr.write_sep("-", "growth: best of 5 per size; 'growth' = time ratio / size ratio,"
                                 " middle to largest (1 = linear)")
        for family, points in sorted(GROWTH.items()):
            row = "  ".join(f"{size // 1024:>4}K {sec * 1e3:7.2f}ms" for size, sec in points)
            mid, last = points[len(points) // 2], points[-1]
            ratio = ((last[1] / mid[1]) / (last[0] / mid[0])
                     if mid[1] > 0 and last[0] > mid[0] else float("nan"))
            tr.write_line(f"  {family:<28} {row}   growth {ratio:4.2f}x linear  "
                          f"[{OUTCOME.get(family, '?')}]")
    if MEMORY:
        tr.write_sep("-", "memory: bytes still allocated (tracemalloc) after 2, 6 and 10 traced rounds")
        for name, (count, m1, m2, m3) in sorted(MEMORY.items()):
            tr.write_line(f"  {name:<22} {count:>5} inputs traced: {m1:>7} -> {m2:>7} -> {m3:>7} bytes"
                          f"   (last window {m3 - m2:+d})")
