"""``make demo-cluster`` as a test: a front, two home nodes, PostgreSQL and two pjsua2
phones; the node carrying a call is SIGKILLed; holds from both ends, a MESSAGE and the
BYE go through the other node; the killed node comes back; the archive lost nothing.
Every expectation the demo prints must hold (e2m_lab/demo_cluster.py)."""

from __future__ import annotations

import pytest

from e2m_lab.demo_cluster import Demo

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.pjsua2, pytest.mark.slow]


def test_the_cluster_demo_holds_every_expectation(tmp_path):
    demo = Demo(tmp_path)
    demo.run()
    failed = [what for what, held in demo.results if not held]
    assert demo.results and not failed, f"expectations that failed: {failed}"
    assert len(demo.results) >= 18
