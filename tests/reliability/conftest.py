"""Fixtures for the reliability tests: real Kamailio (``e2m-proxy``), SIPp, raw UDP/TCP
peers, and (for the log test) ``e2m-phone`` processes.

Everything listens on 127.0.0.1 on free ports and is stopped in teardown, also when a
test fails; a failing test's report shows the exchange (start lines, headers, body
length and digest, never a body) and the tail of each Kamailio log it started.

``proxy_factory(name, **settings) -> ProxyHandle`` and ``sipp``: the Kamailio tests'
fixtures (``e2m_lab/pytest_fixtures.py``).
``exchange``: a list the test appends lines to (what was sent and answered); printed
on failure.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


from e2m_lab.pytest_fixtures import failed


@pytest.fixture
def exchange(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    lines: list[str] = []
    yield lines
    if failed(request) and lines:
        print(f"\n===== exchange ({len(lines)} lines, last 150) =====")
        print("\n".join(lines[-150:]))
