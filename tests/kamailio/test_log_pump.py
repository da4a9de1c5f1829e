"""The launcher's pump of Kamailio's log pipe (kamailio_app/launcher.py ``_pump_log``).

It drains the pipe every ``LOG_POLL`` seconds instead of blocking on it (a blocked
reader makes every log write wake it on another core: bench/README.md), and must
still hand ``LogCutter`` exactly the chunks a blocking ``readline(LIMIT)`` would:
whole lines, pieces of over-long lines, and a last line without its newline.
"""

from __future__ import annotations

import io
import os
import threading
import time

from kamailio_app.launcher import LogCutter, _pump_log

PARSER_LINE = (b" 3(12) ERROR: <core> [core/parser/parse_via.c:2596]: parse_via(): "
               b"bad char <v=0 o=- 1 1 IN IP4 10.0.0.1 s=secret-sdp\n")


def _reference(data: bytes) -> bytes:
    stream, cutter, out = io.BytesIO(data), LogCutter(), b""
    while chunk := stream.readline(LogCutter.LIMIT):
        out += cutter.process(chunk)
    return out


def _pumped(pieces: list[bytes], pause: float) -> bytes:
    read_fd, write_fd = os.pipe()
    out = io.BytesIO()
    with os.fdopen(read_fd, "rb") as reader:
        pump = threading.Thread(target=_pump_log, args=(reader, out))
        pump.start()
        for piece in pieces:       # written the way workers write: a line at a time,
            os.write(write_fd, piece)   # sometimes split, some long, with pauses
            time.sleep(pause)
        os.close(write_fd)
        pump.join(timeout=10)
        assert not pump.is_alive(), "the pump did not end at the pipe's end"
    return out.getvalue()


def test_the_pump_gives_the_cutter_what_readline_would():
    long_line = b" 1(10) INFO: e2m: " + b"x" * (LogCutter.LIMIT + 5000) + b"\n"
    pieces = [b" 1(10) INFO: e2m: MESSAGE request action=forward\n",
              PARSER_LINE[:40], PARSER_LINE[40:],
              b"  continuation of the cut record, quoting more SDP\n",
              long_line[:30000], long_line[30000:],
              b" 2(11) INFO: e2m: INVITE request action=forward\n",
              b" 2(11) INFO: the last line, with no newline"]
    for pause in (0.0, 0.03):       # all in one read, and across several polls
        got = _pumped(pieces, pause)
        assert got == _reference(b"".join(pieces))
        assert b"secret-sdp" not in got and b"continuation" not in got
        assert got.endswith(b"with no newline")


def test_a_pipe_that_cannot_grow_is_read_blocking(monkeypatch):
    """Where the pipe stays at 64 KiB (F_SETPIPE_SZ refused), a 20 ms poll would let a
    flood of log lines fill it and stall Kamailio's workers: the pump blocks on it
    instead, as before, and passes the same lines."""
    import fcntl

    def refused(*_args):
        raise OSError("F_SETPIPE_SZ refused")
    monkeypatch.setattr(fcntl, "fcntl", refused)
    pieces = [b" 1(10) INFO: e2m: one\n", PARSER_LINE, b" 1(10) INFO: e2m: two\n"]
    read_fd, write_fd = os.pipe()
    out = io.BytesIO()
    with os.fdopen(read_fd, "rb") as reader:
        pump = threading.Thread(target=_pump_log, args=(reader, out))
        pump.start()
        os.write(write_fd, pieces[0])
        time.sleep(0.05)
        assert os.get_blocking(read_fd), "the pump made the pipe non-blocking anyway"
        for piece in pieces[1:]:
            os.write(write_fd, piece)
        os.close(write_fd)
        pump.join(timeout=10)
        assert not pump.is_alive()
    assert out.getvalue() == _reference(b"".join(pieces))
