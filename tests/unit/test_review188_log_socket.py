"""Review 188: the launcher's per-process log pump (9e498ef: Kamailio's stderr is an
AF_UNIX stream socket with SO_PASSCRED, one ``LogCutter`` per writing pid).

The wire tests are tests/kamailio/test_review188_log_socket_wire.py.

Hole K1: a process's lines pass whole until it writes a record naming its own pid
- Attacker: whoever reads the proxy's log (the log is meant to hold no DEBUG text past
  a record's function name, no printed message, review 178/180/182).  No sender needed
  for the figures below; any process whose records name another pid is enough.
- Messages: none: Kamailio's own start at ``log_level = "debug"``.
- Effect observed: ``fork_process`` (core/pt.c:307-312, 5.6.3) logs "seeding PRNG with
  %u" and "test random numbers ..." in the child *before* it waits on the process lock,
  i.e. before the parent wrote ``pt[child].pid``; ``my_pid()`` reads
  ``pt[process_no].pid``, still 0, so the record starts `` 5(0) DEBUG:``.  The child's
  credentials name its real pid, so its new ``LogCutter(pid=...)`` does not take the
  line for a record; a new cutter's ``_keep_continuation`` is True ("lines before any
  record"), so the line passes whole, DEBUG text included: the child's PRNG seed, its
  cryptorand seed and four outputs of its generators.  Three starts with 8 workers: 12,
  16 and 12 uncut DEBUG lines (1 of ~1 900 lines with 2 workers).  The same holds for
  any process whose records name another pid (a ``fork`` that keeps its parent's
  ``pt`` slot): everything it writes passes whole, printed messages included, until it
  writes a record with its own pid.  Through the pipe before 9e498ef these lines were
  cut (one cutter, any pid).
- Code at fault: kamailio_app/launcher.py:453 (``_keep_continuation = True`` for every
  new cutter, not only for Kamailio's start) with :467 (a record naming another pid is
  judged a continuation, and kept).
- Suggested fix: a line shaped as a record but naming another pid is cut as a record
  (``_first_line``) or dropped, never kept; and keep "lines before any record" only
  while no process has written a record (a flag shared like ``serving``), so a
  process's first lines are judged as continuations once Kamailio has started.
- Test: ``test_a_record_naming_pid_0_is_cut_like_any_debug_record``.

Controls
- ``test_a_debug_record_naming_its_own_pid_is_cut``: the same DEBUG line with the
  writer's own pid: cut after ``fork_process():``.
- ``test_a_records_pieces_with_another_writer_between_stay_one_line``: a 30 KB parser
  record written in 8 KiB pieces by one process, another process's record between two
  pieces: its tail pieces go, the other record passes.
- ``test_the_last_line_without_newline_reaches_the_log``: a process's last line, no
  newline, then exit: it reaches the log.
- ``test_the_pump_keeps_up_with_four_writers``: 4 forked writers, 25 000 80-octet lines
  each, interleaved: the pump passed every line at 190 000 lines/s (the pipe pump
  before 9e498ef: 219 000 lines/s); asserted: more than 30 000 lines/s.

Tried and held
- Capacity before a writer blocks: the socket held 2 731 lines of 80 octets (218 KB:
  each write is one skb, ~770 octets of overhead; SO_SNDBUF 2 MiB) where the 1 MiB pipe
  held 13 056.  As ``nobody`` (``setpriv --reuid 65534``) SO_SNDBUFFORCE fails and
  SO_SNDBUF is used: the same 2 MiB here because net.core.wmem_max is 4 MiB on this
  host (on a stock kernel, 212 992: 416 KiB, about 540 such lines, 27 000 lines/s for
  LOG_POLL = 20 ms).  See HB1 in the wire module for where that matters.
- ``MAX_WRITERS`` eviction: needs more than 1 024 writing pids; Kamailio has tens of
  processes and none respawns, so no sender can reach it.
- pid None (no credentials): Linux attaches SCM_CREDENTIALS to every write once the
  reader has SO_PASSCRED, which ``log_socket`` sets before Kamailio starts.
- Threads: SCM_CREDENTIALS carry the thread group id, which is what ``my_pid()`` prints.

Fixed (stop 50): K1, a line before a process's first record passes only while no
process has written a record at all (Python's own warnings at start), and a line shaped
as a record naming another pid never does: the pid-0 lines of ``fork_process`` now go
as a continuation (one marker).  HB1, when the launcher's stderr fails the pump reads
on and lets the log go, so Kamailio's workers never block on a full log socket.  The
tests failed on the code before the fix and pass with it.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from kamailio_app.launcher import _pump_log, log_socket

SEED = b"700966935"


class _Out:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def flush(self) -> None:
        pass


def _pump(writers: list) -> bytes:
    """Each of ``writers`` (a function of the writer fd and its own pid) runs in a forked
    process writing to ``log_socket``'s writer, one after the other; the pump's output."""
    reader, writer = log_socket()
    out = _Out()
    pump = threading.Thread(target=_pump_log, args=(reader, out))
    pump.start()
    for write in writers:
        pid = os.fork()
        if pid == 0:
            try:
                write(writer.fileno(), os.getpid())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    writer.close()
    pump.join(timeout=20)
    assert not pump.is_alive()
    reader.close()
    return out.data


def _seeding(fd: int, pid: int) -> None:
    os.write(fd, b" 5(0) DEBUG: <core> [core/pt.c:308]: fork_process(): seeding PRNG with "
             + SEED + b"\n")
    os.write(fd, b" 5(%d) INFO: <core> [main.c:1]: child(): started\n" % pid)


def test_a_record_naming_pid_0_is_cut_like_any_debug_record():
    out = _pump([_seeding])
    assert b"started" in out
    assert SEED not in out


def test_a_debug_record_naming_its_own_pid_is_cut():
    def own(fd: int, pid: int) -> None:
        os.write(fd, b" 5(%d) DEBUG: <core> [core/pt.c:308]: fork_process(): seeding PRNG with "
                 % pid + SEED + b"\n")
    out = _pump([own])
    assert b"fork_process(): [debug text cut" in out and SEED not in out


SECRET = b"inline:SECRETKEY"


def test_a_records_pieces_with_another_writer_between_stay_one_line():
    body = ((b" " * 1500 + b"1(9) INFO: <script>: e2m: " + SECRET) * 30)[:30000]

    def big(fd: int, pid: int) -> None:
        record = (b" 1(%d) ERROR: <core> [core/parser/parse_via.c:2706]: parse_via(): "
                  b"parsing via on: <" % pid + body + b">\n")
        os.write(fd, record[:8192])
        child = os.fork()                  # another process writes between two pieces
        if child == 0:
            os.write(fd, b" 2(%d) ERROR: <core> [x.c:1]: f(): other\n" % os.getpid())
            os._exit(0)
        os.waitpid(child, 0)
        for i in range(8192, len(record), 8192):
            os.write(fd, record[i:i + 8192])
    out = _pump([big])
    assert b"SECRETKEY" not in out
    assert b"f(): other\n" in out and b"cut by e2m-proxy" in out


def test_the_last_line_without_newline_reaches_the_log():
    def last(fd: int, pid: int) -> None:
        os.write(fd, b" 0(%d) INFO: <core> [main.c:1]: first\n" % pid)
        os.write(fd, b" 0(%d) ALERT: <core> [main.c:2]: exiting without newline" % pid)
    out = _pump([last])
    assert out.endswith(b"exiting without newline")


def test_the_pump_keeps_up_with_four_writers():
    reader, writer = log_socket()
    out = _Out()
    count, writers = 25000, 4
    started = time.monotonic()
    children = []
    for k in range(writers):
        pid = os.fork()
        if pid == 0:
            try:
                line = (b" %d(%d) INFO: {1 MESSAGE c1@x} <script>: e2m: MESSAGE request "
                        b"action=forward\n" % (k, os.getpid()))
                for _ in range(count):
                    os.write(writer.fileno(), line)
            finally:
                os._exit(0)
        children.append(pid)
    writer.close()
    pump = threading.Thread(target=_pump_log, args=(reader, out))
    pump.start()
    for pid in children:
        os.waitpid(pid, 0)
    pump.join(timeout=60)
    took = time.monotonic() - started
    reader.close()
    assert not pump.is_alive()
    assert out.data.count(b"action=forward\n") == count * writers
    assert count * writers / took > 30000, f"{count * writers / took:.0f} lines/s"
