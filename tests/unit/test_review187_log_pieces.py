"""Review 187: LogCutter on a record written in pieces with another record between them.

Hole K1 (the wire test is tests/kamailio/test_review187_log_split_wire.py): glibc
writes a Kamailio record longer than 8192 octets to the unbuffered stderr in 8192-octet
``write``s; another process's record can land between two of them, so the record's next
piece starts a line.  If that piece (message text the sender chose) starts with spaces
and a record's shape, ``_RECORD`` takes it for a record and it passes whole.
- Code at fault: kamailio_app/launcher.py:399 (``_RECORD``) and :609 (one shared pipe).
- Suggested fix: per-writer line state (AF_UNIX datagram stderr with SO_PASSCRED), or
  at least a strict record start (no run of spaces, a known level, a live pid).
- Test: ``test_a_later_piece_shaped_as_a_record_does_not_pass``.

Controls
- ``test_the_pieces_with_nothing_between_are_cut_as_one_line``: the same record's
  pieces back to back: one line, cut at ``<``.
- ``test_a_later_piece_not_shaped_as_a_record_goes``: the interleaved piece with no
  record shape is a continuation and goes (one marker).
- ``test_a_record_over_the_limit_goes_in_every_piece``: a parser record of 65 535
  quoted octets plus its head (over ``LogCutter.LIMIT``) through ``_pump_log``: no
  piece of its quote passes.

Fixed (stop 50): Kamailio's stderr is a Unix socket whose reader learns each write's
process (``SO_PASSCRED``; ``launcher.log_socket``), and each process's bytes make lines
of their own through a ``LogCutter`` of its own, whose record starts must name that
process's pid and have at most one leading space (Kamailio writes ``%2d(pid)``).  So a
record's later piece continues its own line wherever another process's record lands.
(Through one pipe, a piece starting exactly " 1(pid) INFO: " still passed: that is why
the streams are split, ``tests/unit/test_log_cutter.py``.)  The hole tests failed on the
code before the fix and pass with it.
"""

from __future__ import annotations

import io
import os
import threading

import pytest

from kamailio_app.launcher import LogCutter, _pump_log

HEAD = b" 1(4782) ERROR: <core> [core/parser/parse_via.c:2706]: parse_via(): parsing via on: <"
OTHER = b" 2(4783) ERROR: <core> [core/parser/msg_parser.c:127]: get_hdr_field(): bad via\n"
SECRET = b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:SECRETKEY"


def _record(body: bytes) -> bytes:
    return HEAD + b"SIP/2.0/UDP 127.0.0.1:9 ;;;@@branch=z9hG4bK1. " + body + b">\n"


def _pieces(record: bytes) -> list[bytes]:
    return [record[i:i + 8192] for i in range(0, len(record), 8192)]


def _pumped(writes: list[bytes]) -> bytes:
    read_fd, write_fd = os.pipe()
    out = io.BytesIO()
    with os.fdopen(read_fd, "rb") as reader:
        pump = threading.Thread(target=_pump_log, args=(reader, out))
        pump.start()
        for data in writes:
            os.write(write_fd, data)
        os.close(write_fd)
        pump.join(timeout=10)
        assert not pump.is_alive()
    return out.getvalue()


def _body(shape: bytes) -> bytes:
    block = b" " * 1500 + shape + SECRET + b" "
    return (block * 30)[:30000]


def test_a_later_piece_shaped_as_a_record_does_not_pass():
    pieces = _pieces(_record(_body(b"1(9) INFO: <script>: e2m: ")))
    out = _pumped([pieces[0], OTHER, *pieces[1:]])
    assert b"SECRETKEY" not in out


def test_the_pieces_with_nothing_between_are_cut_as_one_line():
    pieces = _pieces(_record(_body(b"1(9) INFO: <script>: e2m: ")))
    out = _pumped([*pieces, OTHER])
    assert b"SECRETKEY" not in out and out.endswith(OTHER)
    assert out.count(b"cut by e2m-proxy") == 1


def test_a_later_piece_not_shaped_as_a_record_goes():
    pieces = _pieces(_record(_body(b"")))
    out = _pumped([pieces[0], OTHER, *pieces[1:], OTHER])
    assert b"SECRETKEY" not in out
    assert out.count(b"the lines after this record cut") == 1


def test_a_record_over_the_limit_goes_in_every_piece():
    body = (b"x" * 100 + SECRET) * (65535 // (100 + len(SECRET)) + 1)
    record = _record(body[:65535])
    assert len(record) > LogCutter.LIMIT
    out = _pumped([*_pieces(record), OTHER])
    assert b"SECRETKEY" not in out and out.endswith(OTHER)
