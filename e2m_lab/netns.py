"""Tests in two halves, the inner one in a network namespace of its own.

Some attacks need addresses the host's loopback does not have (a whole IPv6 /48 routed
to ``lo``, a dual-stack ``[::]`` listener): the test module's outer half runs its inner
test again under ``unshare -n`` (root), where it may set up ``lo`` as it likes, and
reads back what the inner half wrote to a JSON file.  ``tag`` names the module (its
two environment variables ``E2M_<tag>_NETNS`` and ``E2M_<tag>_OUT``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

__all__ = ["inside", "result_path", "run_inner", "unshare_works"]

_ROOT = Path(__file__).resolve().parents[1]


def unshare_works() -> bool:
    """Whether this process may make a network namespace (root, ``unshare``, ``ip``)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def inside(tag: str) -> bool:
    """True in the inner half (the namespace) of module ``tag``."""
    return os.environ.get(f"E2M_{tag}_NETNS") == "1"


def result_path(tag: str) -> str:
    """Where the inner half of module ``tag`` writes its result ("" outside)."""
    return os.environ.get(f"E2M_{tag}_OUT", "")


def run_inner(test_file: str, inner_test: str, tag: str, tmp_path_factory: Any, *,
              timeout: float = 300, show: bool = True) -> dict[str, Any]:
    """Run ``test_file::inner_test`` in a namespace of its own and return what it
    wrote; skips inside the namespace itself and where no namespace can be made."""
    if inside(tag):
        pytest.skip("the inner half runs the attack")
    if not unshare_works():
        pytest.skip("needs root and unshare -n (a network namespace of its own)")
    out = tmp_path_factory.mktemp(tag.lower()) / "result.json"
    env = dict(os.environ, **{f"E2M_{tag}_NETNS": "1", f"E2M_{tag}_OUT": str(out)})
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(_ROOT), f"{test_file}::{inner_test}"],
        cwd=str(_ROOT), env=env, capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        pytest.fail("the inner half wrote nothing:\n" + (done.stdout + done.stderr)[-4000:])
    result = json.loads(out.read_text())
    if show:
        print("\n" + json.dumps(result, indent=1))
    return result
