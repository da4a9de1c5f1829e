"""The short form of the phone soak (``make soak-phone`` runs it for 10 minutes):
``bench/phone_soak.py`` for 40 s, an ``e2m-phone`` (bob) under refused 3 KB MESSAGEs,
stray 493s, INVITEs from strangers, policy floods and garbage, while alice's E2M
MESSAGEs keep coming.  Every valid MESSAGE answered 200 and delivered encrypted; bob
never stops; his RSS flat between the first and the last third (6 MiB, see the
script's docstring for why that bound).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.pjsua2, pytest.mark.serial]   # memory over time: alone

ROOT = Path(__file__).resolve().parents[2]
SECONDS = float(os.environ.get("PHONE_SOAK_CI_SECONDS", 40))


def _soak_module():
    spec = importlib.util.spec_from_file_location("phone_soak", ROOT / "bench" / "phone_soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phone_soak_every_valid_message_answered_memory_flat(tmp_path: Path) -> None:
    result = _soak_module().run_phone_soak(SECONDS, tmp_path, sample=1.0)
    memory, valid = result["memory"], result["valid"]
    report = (f"valid {valid}, hostile {result['hostile']}, memory "
              f"{ {k: v for k, v in memory.items() if k != 'rss_kib'} }, rss {memory['rss_kib']}, "
              f"bob rc={result['bob_rc']} alive={result['bob_alive_at_end']}, "
              f"last events {result['bob_last_events']}, stderr {result['bob_stderr_tail']!r}")
    print(report)
    assert result["bob_alive_at_end"], report
    assert valid["ok"], report
    assert result["hostile"]["unanswered_probes"] == 0, report
    assert result["hostile"]["rounds"] > 100, report
    assert memory["flat"], report
    status = result["bob_status"]
    assert status["events"] <= status["limits"]["events"]
    assert status["errors"] <= status["limits"]["errors"]
    assert status["counts"]["handler_failures"] == 0, report
