"""The launcher's ``LogCutter``: what of Kamailio's log records reaches the log file.

Review 178 and stop 50: Kamailio prints whole messages on the lines after a record's
first one (at DEBUG: every relayed reply, stateless forward and TCP write), so those
lines never pass; a Python traceback's do (it is how an operator learns why the script
failed, and our code puts no body in an exception).
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


def _cut(data: bytes, limit: int = LogCutter.LIMIT) -> bytes:
    stream, cutter, out = io.BytesIO(data), LogCutter(), b""
    while chunk := stream.readline(limit):
        out += cutter.process(chunk)
    return out


def test_a_records_printed_message_is_one_marker_line():
    out = _cut(PLAIN + REPLY + PLAIN)
    assert b"SECRETKEY" not in out and b"SIP/2.0 200" not in out
    assert out.count(b"cut by e2m-proxy") == 1
    assert out.startswith(PLAIN) and out.endswith(PLAIN)
    assert b"copied size" in out           # the record itself stays


def test_a_long_printed_line_goes_in_every_piece():
    long_reply = REPLY.replace(b"SECRETKEY", b"SECRETKEY" + b"k" * 500)
    out = _cut(long_reply + PLAIN, limit=64)
    assert b"SECRETKEY" not in out and b"kkkk" not in out and out.endswith(PLAIN)


def test_a_python_traceback_keeps_its_lines():
    out = _cut(TRACEBACK + REPLY)
    assert TRACEBACK in out and b"SECRETKEY" not in out


def test_a_line_after_a_traceback_record_and_a_new_record_is_judged_again():
    out = _cut(TRACEBACK + PLAIN + b"a=crypto:1 inline:LATE\n")
    assert b"ValueError" in out and b"LATE" not in out
