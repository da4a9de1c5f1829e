"""Fixtures for the reliability tests: real Kamailio (``e2m-proxy``), SIPp, raw UDP/TCP
peers, and (for the log test) ``e2m-phone`` processes.

Everything listens on 127.0.0.1 on free ports and is stopped in teardown, also when a
test fails; a failing test's report shows the exchange (start lines, headers, body
length and digest, never a body) and the tail of each Kamailio log it started.

``proxy_factory(name, **settings) -> ProxyHandle`` and ``sipp``: the Kamailio tests'
fixtures (``tests/kamailio/wire_fixtures.py``).
``exchange``: a list the test appends lines to (what was sent and answered); printed
on failure.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for _p in (HERE.parent / "kamailio", HERE.parent / "e2e", HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from wire_fixtures import failed, proxy_factory, sipp  # noqa: E402,F401


@pytest.fixture
def exchange(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    lines: list[str] = []
    yield lines
    if failed(request) and lines:
        print(f"\n===== exchange ({len(lines)} lines, last 150) =====")
        print("\n".join(lines[-150:]))
