"""The soak's account of SIPp's error log (``bench/soak.py``): a failed CI soak must
say why from its printed summary, without its workdir."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))   # soak imports its neighbours
import soak  # noqa: E402

# as SIPp 3.6 writes it: some entries run on after the last one without a line break
_LOG = (
    "2026-12-06\t12:28:06.225628\t1796560086.225628: Aborting call on unexpected message for "
    "Call-Id '3086-1@127.0.0.1': while expecting '200' (index 1), received 'SIP/2.0 408 Request "
    "Timeout\n'2026-12-06\t12:28:10.220488\t1796560090.220488: Call-Id: 3664-1@127.0.0.1, receive "
    "timeout on message bench uac MESSAGE:1 without label to jump to (ontimeout attribute): "
    "aborting call2026-12-06\t12:28:10.226247\t1796560090.226247: Aborting call on unexpected "
    "message for Call-Id '5283-1@127.0.0.1': while expecting '200' (index 1), received "
    "'SIP/2.0 482 Loop Detected\n"
    "'2026-12-06\t12:28:44.287708\t1796560124.287708: Dead call 21973-1@127.0.0.1 (aborted at "
    "index 1), received 'SIP/2.0 404 Not Here\n"
    "----------------------------------------------- 2026-12-06\t12:28:00 start\n")


def test_error_kinds_counted_with_the_status_received_instead():
    assert soak.sipp_error_kinds(_LOG) == {
        "Aborting call on unexpected message 408": 1,
        "Aborting call on unexpected message 482": 1,
        "receive timeout": 1,
        "Dead call 404": 1,
    }


def test_no_errors_no_kinds():
    assert soak.sipp_error_kinds("") == {}
    assert soak.sipp_error_kinds("------ 2026-12-06\t12:28:00 start of the run\n") == {}
