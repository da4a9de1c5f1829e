"""`e2m demo cms` runs every expectation and exits 0 only when all hold."""

from __future__ import annotations

from e2m_plugins.cli import main
from e2m_plugins.cli.demo_cmd import run_demo


def test_demo_exits_zero_and_every_expectation_holds(capsys):
    assert main(["demo", "cms"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    assert "no SIP traffic" in out  # it says what it is not
    assert "Lunch at noon" not in out and "m=audio" not in out


def test_demo_checks_can_fail():
    checks = run_demo()
    assert all(c.held for c in checks)
    visited = [c for c in checks if "visited" in c.party]
    assert visited and all("cannot read" in c.observed for c in visited)
    checks[0].observed = "cannot read"
    assert not checks[0].held
