"""The child-process runner itself: an abort in one test fails that test only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE_ENV = "E2M_PJSUA_CRASH_PROBE"
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.environ.get(PROBE_ENV) != "1", reason="only inside the isolation test")
def test_probe_passes() -> None:
    assert True


@pytest.mark.skipif(os.environ.get(PROBE_ENV) != "1", reason="only inside the isolation test")
def test_probe_aborts() -> None:
    os.abort()   # what a pjsip assertion does


@pytest.mark.skipif(os.environ.get(PROBE_ENV) == "1", reason="not inside itself")
def test_an_abort_fails_only_its_test() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2M_PJSUA_")}
    env[PROBE_ENV] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
         f"{Path(__file__).relative_to(ROOT)}::test_probe_passes",
         f"{Path(__file__).relative_to(ROOT)}::test_probe_aborts"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "PASSED tests/pjsua/test_isolation.py::test_probe_passes" in out
    assert "FAILED tests/pjsua/test_isolation.py::test_probe_aborts" in out
    assert "killed by SIGABRT" in out
