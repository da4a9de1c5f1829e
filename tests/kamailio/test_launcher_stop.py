"""The launcher's stop (kamailio_app/launcher.py ``_wait_stopped``).

Kamailio's TCP main process, started just before a stop, sometimes misses the group's
SIGTERM; the main process then waits for it until the launcher's SIGKILL, 10 s later
(seen as a 10 s teardown in the suite, and about one stop in eight right after a
start).  The launcher sends a child still there after ``STRAGGLER_AFTER`` SIGTERM
again; the group's leader (Kamailio's main process, whose shutdown must run once)
gets only the first.  The same shape is made here with plain processes: a leader that
counts its SIGTERMs and waits for its child, a child that ignores the first SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kamailio_app import launcher

# The leader: exits with the number of SIGTERMs it got once its child is gone.
LEADER = r"""
import os, signal, subprocess, sys
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append(1))
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
open(sys.argv[2], "w").write(str(child.pid))
while child.poll() is None:
    try:
        child.wait()
    except InterruptedError:
        pass
sys.exit(len(got))
"""

# The child: deaf to the first SIGTERM (the straggler), ends on the next.
CHILD = r"""
import signal, time
seen = []
def on_term(*_):
    seen.append(1)
    if len(seen) > 1:
        raise SystemExit(0)
signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(0.05)
"""


def _group(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    marker = tmp_path / "child.pid"
    leader = subprocess.Popen([sys.executable, "-c", LEADER, CHILD, str(marker)],
                              start_new_session=True)
    deadline = time.monotonic() + 10
    while not (marker.exists() and marker.read_text()):
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.02)
    return leader, int(marker.read_text())


def test_a_child_that_missed_the_sigterm_gets_another_and_the_leader_only_one(tmp_path):
    leader, child = _group(tmp_path)
    assert launcher._group_members(leader.pid) == [child]
    os.killpg(leader.pid, signal.SIGTERM)       # what the launcher's forward() sends
    started = time.monotonic()
    code = launcher._wait_stopped(leader)
    took = time.monotonic() - started
    assert code == 1, code                       # the leader saw one SIGTERM, not two
    assert took < launcher.STOP_TIMEOUT / 2, took   # not the SIGKILL's 10 s
    assert launcher._group_members(leader.pid) == []


def test_a_group_that_never_stops_is_killed_at_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "STOP_TIMEOUT", 1.5)
    monkeypatch.setattr(launcher, "STRAGGLER_AFTER", 0.5)
    leader = subprocess.Popen([sys.executable, "-c",
                               "import signal, time\n"
                               "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                               "time.sleep(60)"], start_new_session=True)
    time.sleep(0.3)
    started = time.monotonic()
    code = launcher._wait_stopped(leader)
    assert code == -signal.SIGKILL
    assert 1.4 < time.monotonic() - started < 5
