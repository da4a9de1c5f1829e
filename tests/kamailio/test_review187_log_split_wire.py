"""Review 187: records longer than one write, interleaved in Kamailio's log pipe.

Hole K1: a parser error over 8 KiB is written in pieces; a flood lands a piece at a line's start, shaped as a record, and it passes
- Attacker: any off-path sender on UDP (no account, no dialog), at the proxy's default
  info level.  Four loopback sources, 300 datagrams each of ~30 KB, in ~1 s.
- Messages: a MESSAGE whose Via is broken (``;;;@@``) and whose body is runs of 1500
  spaces each followed by a text shaped as a record start, ``1(9) INFO: <script>: e2m:
  CANARY inline:CANARY``.
- Effect observed: Kamailio logs ``parse_via(): parsing via on: <`` + the rest of the
  message (``ksr_buf_oneline``: one line, up to 64 KiB) with one ``fprintf(stderr)``;
  glibc 2.36 writes an unbuffered stream's record in 8192-octet ``write``s (strace: a
  30 KB record went as 8192+8192+8192+5507).  Between two of them another worker's
  record (ending in a newline) lands in the pipe, so the record's second piece starts a
  line.  ``_RECORD`` (``^\\s*\\d+\\(\\d+\\) [A-Z]+: ``) takes the leading spaces, so the piece
  is judged a new INFO record: not DEBUG, no ``_QUOTING`` mark, no ``[[``, so it passes
  whole.  Two runs: 74 and 40 log lines carried the body (one 22 120 octets, the
  ``inline:`` canary 28 times), of 2 884 and 3 328 ``parse_via`` records.  The same
  gives an off-path sender forged log lines of its choosing (``e2m:`` lines the
  operator trusts).
- Code at fault: kamailio_app/launcher.py:399 (``_RECORD`` accepts any leading
  whitespace and any process number; a line start is taken for a record start) and
  launcher.py:609 (Kamailio's stderr is one pipe shared by all its processes, so a
  record's pieces cannot be told from another's: neither the cutter's state
  ``_rest_of_line``/``_marked`` nor ``_pump_log`` knows whose piece a line starts with).
- Suggested fix: give Kamailio a stderr whose writes carry their writer: an AF_UNIX
  ``SOCK_DGRAM`` socketpair with ``SO_PASSCRED`` (each ``write`` one datagram, with the
  writer's pid in ``SCM_CREDENTIALS``), and keep the cutter's line state per pid, so a
  piece always continues its own process's line (a piece whose process has no open
  line is dropped).  At the least: a record start is ``^( \\d|\\d\\d+)\\(<pid of a
  Kamailio process>\\) <known level>: `` with no other leading space, and a line that
  follows a cut line still open (another record written after its cut point) is
  dropped.
- Test: ``test_a_flood_of_big_broken_requests_puts_no_body_in_the_log``.

Controls
- ``test_big_broken_requests_without_a_record_shape_leave_no_body``: the same flood,
  body without the record shape: the tail pieces that start lines are continuations
  and go (0 lines with the canary), and the cut marker is there.

Tried and held
- One big record with no other writer: its pieces follow each other on one line and
  the line is cut at ``<`` (the unit control in test_review187_log_pieces.py).
- ``_pump_log``'s own pieces (64 KiB, ``LogCutter.LIMIT``): ``ksr_buf_oneline`` caps the
  quote at BUF_SIZE (65 535), so a parser record is at most one LIMIT piece plus a
  tail; ``_rest_of_line`` carries the cut to that tail (unit control).
- cert_route.py:192 ``PUBLISH: %s`` and :263/:317: the exception is a
  ``CertTableError`` whose text is the table's path and sqlite3's message (no row
  values: sqlite3 names columns, not values, in its constraint errors); the body
  never reaches it.  ``refused ...: {answer.detail}`` names the AoR (a URI), not the
  body.
- archive.py:384 (``archive ... failed: {type}: {exc}``) and archive_spool.py:281/312:
  sqlite3/psycopg/OSError texts; psycopg's ``DETAIL`` with row values is not included
  (``str(exc)`` is the primary message) -- read, not driven, for want of time.

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

import secrets
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.kamailio

FORGED = "1(9) INFO: <script>: e2m: "


def _big_broken(body: str) -> bytes:
    via = f"SIP/2.0/UDP 127.0.0.1:9 ;;;@@branch=z9hG4bK-{secrets.token_hex(4)}"
    data = body.encode()
    return (f"MESSAGE sip:bob@example.com SIP/2.0\r\nVia: {via}\r\n"
            f"From: <sip:a@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n"
            f"Call-ID: r187-{secrets.token_hex(4)}@x\r\nCSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def _fill(block: str, size: int = 30000) -> str:
    return (block * (size // len(block) + 1))[:size]


def _flood(port: int, data: bytes, source: str, count: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    sock.bind((source, 0))
    for _ in range(count):
        sock.sendto(data, ("127.0.0.1", port))
        time.sleep(0.0005)
    sock.close()


def _flood_and_read(proxy, data: bytes, canary: str, rounds: int) -> tuple[list[str], str]:
    mark = proxy.log_mark()
    lines: list[str] = []
    log = ""
    for _ in range(rounds):
        threads = [threading.Thread(target=_flood,
                                    args=(proxy.port, data, f"127.0.0.{10 + i}", 300))
                   for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(1.0)
        assert proxy.options() is not None           # alive, and its lines have passed
        time.sleep(0.5)
        log = proxy.log_since(mark)
        lines = [line for line in log.splitlines() if canary in line]
        if lines:
            break
    return lines, log


def test_a_flood_of_big_broken_requests_puts_no_body_in_the_log(proxy_factory):
    proxy = proxy_factory("split", e2m=True, view=("MESSAGE:*",), log_level="info")
    canary = f"CANARY{secrets.token_hex(6)}"
    data = _big_broken(_fill(" " * 1500 + FORGED + canary + " inline:" + canary + " "))
    lines, log = _flood_and_read(proxy, data, canary, rounds=4)
    assert "parse_via" in log
    assert not lines, (f"{len(lines)} log lines carry the body, the longest "
                       f"{max(len(line) for line in lines)} octets")


def test_big_broken_requests_without_a_record_shape_leave_no_body(proxy_factory):
    proxy = proxy_factory("split-control", e2m=True, view=("MESSAGE:*",), log_level="info")
    canary = f"CANARY{secrets.token_hex(6)}"
    data = _big_broken(_fill(" " * 1500 + canary + " inline:" + canary + " "))
    lines, log = _flood_and_read(proxy, data, canary, rounds=1)
    assert log.count("parse_via(): parsing via on: <... [cut by e2m-proxy") > 100
    assert not lines
