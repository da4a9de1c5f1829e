"""The launcher's ``LogCutter``: what of Kamailio's log records reaches the log file.

Review 178 and stop 50: Kamailio prints whole messages on the lines after a record's
first one (at DEBUG: every relayed reply, stateless forward and TCP write), so those
lines never pass; a Python traceback's do only before the first message is handled (it
is how an operator learns why the script did not load), since a printed message may
hold a line written to look like one (review 180).  At DEBUG Kamailio writes what it
handles on the first line too (auth's digest response, review 180 K1; a database row's
HA1, review 182 K1): a DEBUG record keeps only its place and function name.
"""

from __future__ import annotations

import io

from kamailio_app.launcher import LogCutter

REPLY = (b" 3(12) DEBUG: <core> [core/msg_translator.c:2357]: generate_res_buf_from_sip_res():"
         b" copied size: orig:500, new: 480, rest: 200 msg=\n"
         b"SIP/2.0 200 OK\n"
         b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:SECRETKEY\n")
TRACEBACK = (b" 2(11) ERROR: app_python3 [python_support.c:150]: python_handle_exception():"
             b" Unhandled exception in the Python code:\n"
             b"Traceback (most recent call last):\n"
             b"  File \"kemi.py\", line 3, in ksr_request_route\n"
             b"ValueError: no such route\n")
PLAIN = b" 1(10) INFO: <script>: e2m: MESSAGE request action=forward\n"
IN_MESSAGE = b" 1(10) INFO: {1 MESSAGE c1@x} <script>: e2m: MESSAGE request action=forward\n"
# a relayed reply whose folded To header alice wrote to look like a traceback record
FOLDED = (b" 3(12) DEBUG: {1 MESSAGE c1@x} <core> [core/msg_translator.c:2357]: "
          b"generate_res_buf_from_sip_res(): copied size: orig:1, new: 1, rest: 1 msg=\n"
          b"SIP/2.0 200 OK\n"
          b"To: <sip:bob@example.com>\n" + TRACEBACK.splitlines(keepends=True)[0] +
          b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:SECRETKEY\n")
DIGEST = (b" 3(12) DEBUG: {1 REGISTER c2@x} auth [api.c:292]: auth_check_response(): "
          b"Our result = '0123456789abcdef0123456789abcdef'\n")


def _cut(data: bytes, limit: int = LogCutter.LIMIT) -> bytes:
    stream, cutter, out = io.BytesIO(data), LogCutter(), b""
    while chunk := stream.readline(limit):
        out += cutter.process(chunk)
    return out


def test_a_records_printed_message_is_one_marker_line():
    out = _cut(PLAIN + REPLY + PLAIN)
    assert b"SECRETKEY" not in out and b"SIP/2.0 200" not in out
    assert out.count(b"the lines after this record cut") == 1
    assert out.startswith(PLAIN) and out.endswith(PLAIN)
    assert b"generate_res_buf_from_sip_res()" in out    # the record itself stays


def test_a_long_printed_line_goes_in_every_piece():
    long_reply = REPLY.replace(b"SECRETKEY", b"SECRETKEY" + b"k" * 500)
    out = _cut(long_reply + PLAIN, limit=64)
    assert b"SECRETKEY" not in out and b"kkkk" not in out and out.endswith(PLAIN)


def test_a_python_traceback_at_start_keeps_its_lines():
    out = _cut(TRACEBACK + REPLY)
    assert TRACEBACK in out and b"SECRETKEY" not in out


def test_a_traceback_once_messages_are_handled_loses_its_lines():
    out = _cut(IN_MESSAGE + TRACEBACK)
    assert b"ValueError" not in out and b"Unhandled exception" in out


def test_a_printed_line_shaped_as_a_traceback_record_lets_nothing_after_it_pass():
    out = _cut(IN_MESSAGE + FOLDED)
    assert b"SECRETKEY" not in out


def test_the_digest_check_record_is_cut_before_the_response():
    out = _cut(DIGEST)
    assert b"0123456789abcdef" not in out and b"auth_check_response()" in out


def test_a_line_after_a_traceback_record_and_a_new_record_is_judged_again():
    out = _cut(TRACEBACK + PLAIN + b"a=crypto:1 inline:LATE\n")
    assert b"ValueError" in out and b"LATE" not in out


def test_a_debug_record_keeps_its_place_and_function_only():
    row = (b" 4(13) DEBUG: {1 REGISTER c3@x} <core> [db_row.c:64]: db_free_row(): "
           b"free VAL_STRING[0] '8c330dcc0123'\n")
    bare = b" 4(13) DEBUG: <core> [core/receive.c:1]: HA1 8c330dcc0123\n"
    out = _cut(row + bare + PLAIN)
    assert b"8c330dcc" not in out and out.endswith(PLAIN)
    assert b"[db_row.c:64]: db_free_row()" in out and b"[core/receive.c:1]:" in out


def test_a_debug_record_written_on_another_records_line_is_cut_too():
    # Kamailio writes some records in two pieces, the first without its newline: another
    # process's record may start on the same line
    line = (b"11(26357) INFO: <core> [core/tcp_main.c:1]: tcpconn_close(): closing ->"
            b"12(26358) DEBUG: <core> [core/db_row.c:64]: db_free_row(): free VAL_STRING[0] "
            b"'8c330dcc0123'\n")
    out = _cut(line + PLAIN)
    assert b"8c330dcc" not in out and b"closing ->12(26358) DEBUG" in out and out.endswith(PLAIN)


def test_a_buffer_printed_between_double_brackets_is_cut_at_any_level():
    kdmq = (b" 5(14) ERROR: {1 KDMQ k1@x} htable [ht_dmq.c:289]: ht_dmq_handle_msg(): "
            b"invalid json doc [[a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:SECRETKEY]]\n")
    out = _cut(kdmq + PLAIN)
    assert b"SECRETKEY" not in out and b"invalid json doc [[" in out and out.endswith(PLAIN)


def test_one_processs_pieces_stay_one_line_whatever_another_writes_between():
    """Review 187 K1: a record over 8 KiB reaches stderr in 8 KiB pieces, and another
    process's record can land between two.  Through one pipe the next piece starts a
    line, and text the sender chose shaped exactly as a record start (" 1(pid) INFO: ")
    passed whole.  Through ``log_socket`` each process's bytes make lines of their own,
    and a record start must name its writer's pid."""
    import os
    import threading

    from kamailio_app.launcher import _pump_log, log_socket

    head = (b" 1(%d) ERROR: <core> [core/parser/parse_via.c:2706]: parse_via(): parsing via on: <"
            % os.getpid())
    forged = b" 1(%d) INFO: <script>: e2m: " % os.getpid()
    body = b"x" * (8192 - len(head)) + forged + b"a=crypto:1 inline:SECRETKEY" + b"y" * 9000
    record = head + body + b">\n"
    pieces = [record[i:i + 8192] for i in range(0, len(record), 8192)]
    assert pieces[1].startswith(forged)
    reader, writer = log_socket()
    out = io.BytesIO()
    pump = threading.Thread(target=_pump_log, args=(reader, out))
    pump.start()
    writer.sendall(pieces[0])
    child = os.fork()
    if child == 0:                        # another Kamailio process's record, between
        try:
            writer.sendall(b" 2(%d) INFO: <script>: e2m: another line\n" % os.getpid())
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    for piece in pieces[1:]:
        writer.sendall(piece)
    writer.close()
    pump.join(timeout=10)
    assert not pump.is_alive()
    got = out.getvalue()
    assert b"SECRETKEY" not in got and b"another line" in got
    assert got.count(b"parse_via(): parsing via on: <") == 1
