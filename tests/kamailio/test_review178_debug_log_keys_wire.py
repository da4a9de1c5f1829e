"""Review 178: does the proxy keep or log an SRTP key it could read, on the real wire?

Set-up: a real Kamailio per test (``proxy_factory``, ``e2m-proxy``), view
``INVITE:application/sdp`` (and ``MESSAGE:*`` where a MESSAGE is sent), SQLite archive
on; bob is ``raw_uas`` registered through SIPp, a stock peer whose SDES answer carries
its own ``a=crypto ... inline:`` key in the clear; alice is a raw ``SipUa`` whose
INVITE offers a plaintext SDES SDP (a stock phone: no e2m split, so the proxy reads
both keys).  Each key is 30 random octets, base64 (40 characters), searched for in the
proxy's log (what the launcher writes after ``LogCutter``), the archive's bodies and
media rows.

Hole K1: at log_level = "debug" every relayed response is logged whole, body and SRTP key included
  - Attacker: none needed: whoever reads the proxy's log (an operator, a log shipper,
    a support bundle) of a proxy run at ``[kamailio] log_level = "debug"``, the level
    the launcher accepts and docs/reliability.md §6 checked ("Kamailio logs hold no
    plaintext, SDP line, SRTP key").  A stock SDES callee's answer is enough.
  - Messages: alice INVITE (plaintext SDES offer) -> proxy -> bob; bob 200 OK with
    ``a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:<bob's key>`` -> proxy -> alice.  Or a
    200 to a MESSAGE carrying a text/plain body.
  - Effect observed: the 200's whole text, every header and its SDP with bob's
    master key (``a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:nyXD3ri4...``, 1 log line;
    7 SDP lines) is in the proxy's log, as the continuation lines of the DEBUG record
    ``generate_res_buf_from_sip_res(): copied size: ... msg=``; likewise a response's
    text body (the canary of a 200 to a MESSAGE).  The archive kept neither key (the
    SDP rows are cut, review 176) and alice's offer key is not logged (requests are
    not printed): only the relayed reply leaks.
  - Code at fault: kamailio_app/launcher.py:405 ``_QUOTING`` lists the core's parser
    and readers only; Kamailio 5.6.3 src/core/msg_translator.c:2357 logs every reply
    it relays (``LM_DBG("copied size: ... msg=\\n%s\\n", ..., new_buf)``), and
    ``LogCutter`` passes that record and its continuation lines.
  - Suggested fix: add ``b"[core/msg_translator.c"`` to ``_QUOTING`` (the record is cut
    at its first "<"/"[" after "(): " and its continuation lines dropped), or cut any
    record whose continuation lines follow a ``msg=`` end; and extend
    tests/reliability/test_logs.py with a plaintext SDES callee.  Checked here: with
    ``b"[core/msg_translator.c"`` added to ``_QUOTING`` all four tests of this module
    pass (--runxfail).
  - Test: ``test_debug_log_holds_no_srtp_key_of_a_relayed_answer``,
    ``test_debug_log_holds_no_text_of_a_relayed_answer``.

Controls
  - ``test_info_log_archive_and_media_rows_hold_no_key``: at info level the same call
    is 200/200, the archive keeps both SDPs without their ``a=crypto`` line (2 body
    rows), the media rows say audio 127.0.0.1:40000/40002 RTP/SAVP and hold neither
    key, and the log holds neither key.
  - ``test_debug_log_holds_no_key_of_a_relayed_offer``: at debug level the request's
    (alice's offer's) key is nowhere in the log, nor in the archive.

Tried and held
  - Archive (SQLite) rows of a plaintext SDES offer and answer: no ``inline:``, no
    ``a=crypto`` (rows end ``a=rtpmap:0 PCMU/8000``).
  - Media rows: ``codecs`` "0 PCMU/8000", ``proto`` RTP/SAVP: no key.
  - e2m info lines (``e2m media: INVITE request audio 127.0.0.1:40000 RTP/SAVP
    sendrecv``) and their app_python3 DEBUG argument echo: no key.
  - The late-copies store keeps a status line only (late_copies.py), and the archive's
    ``content_uid`` takes Call-ID, tags and CSeq: two calls whose SDPs differ only in
    keys are two rows (read, not run).
  - Cost: the call (INVITE/200/ACK/BYE) took 14 ms end to end on loopback at debug.

Fixed (stop 50): the launcher's ``LogCutter`` drops the lines after the first of every
Kamailio record (one marker line in their place) but a Python traceback's, so no record
that prints a buffer (this reply, a stateless forward, a TCP write: see
``tests/kamailio/test_stop50_debug_log_quotes_wire.py``) passes it.  Both hole tests
failed on the code before the fix and pass with it.
"""

from __future__ import annotations

import base64
import secrets
import time

import pytest

from e2m_lab.kamailio_harness import SipUa
from e2m_lab.sipp import register
from e2m_plugins.sip import make_response

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]

SDP_VIEW = ("INVITE:application/sdp",)


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(30)).decode("ascii")


def _sdes(port: int, key: str) -> bytes:
    return (f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{key}\r\n").encode("ascii")


def _call(proxy_factory, sipp, raw_uas, level: str):
    """alice calls bob, both offering SDES in the clear; (offer key, answer key, proxy)."""
    proxy = proxy_factory("home", e2m=True, view=SDP_VIEW, log_level=level)
    register(proxy, "bob", raw_uas.port, sipp)
    offer_key, answer_key = _key(), _key()

    def answer(request):
        if request.method == "INVITE":
            return make_response(request, 200, "OK", extra_headers=[("Contact", raw_uas.uri)],
                                 body=_sdes(40002, answer_key), content_type="application/sdp")
        return make_response(request, 200, "OK")

    raw_uas.responder = answer
    ua = SipUa(proxy.port, user="alice")
    try:
        result = ua.call("bob", _sdes(40000, offer_key))
    finally:
        ua.close()
    assert result["invite"] is not None and result["invite"].status == 200
    assert result["bye"] is not None and result["bye"].status == 200
    time.sleep(0.5)         # the launcher drains Kamailio's log every 20 ms
    return offer_key, answer_key, proxy


def _archived(proxy) -> bytes:
    rows = proxy.archive_rows()
    return b"\n".join(bytes(row.plaintext) for row in rows) + repr(proxy.media_rows()).encode()


def test_debug_log_holds_no_srtp_key_of_a_relayed_answer(proxy_factory, sipp, raw_uas):
    _, answer_key, proxy = _call(proxy_factory, sipp, raw_uas, "debug")
    assert answer_key.encode() not in _archived(proxy)       # the archive held (review 176)
    log = proxy.log_since(0)
    assert answer_key not in log, [line for line in log.splitlines() if answer_key in line]
    assert "inline:" not in log and "a=crypto" not in log


def test_debug_log_holds_no_text_of_a_relayed_answer(proxy_factory, sipp, raw_uas):
    proxy = proxy_factory("home", e2m=True, view=("MESSAGE:*",), log_level="debug")
    register(proxy, "bob", raw_uas.port, sipp)
    canary = "canary-" + secrets.token_hex(12)

    def answer(request):
        return make_response(request, 200, "OK", body=f"bob's words {canary}\r\n".encode(),
                             content_type="text/plain")

    raw_uas.responder = answer
    ua = SipUa(proxy.port, user="alice")
    try:
        got = ua.message("bob", b"hello bob\r\n")
    finally:
        ua.close()
    assert got is not None and got.status == 200 and canary.encode() in got.body
    time.sleep(0.5)
    log = proxy.log_since(0)
    assert canary not in log, [line for line in log.splitlines() if canary in line]


def test_info_log_archive_and_media_rows_hold_no_key(proxy_factory, sipp, raw_uas):
    offer_key, answer_key, proxy = _call(proxy_factory, sipp, raw_uas, "info")
    rows = proxy.archive_rows()
    assert [(r.direction, r.content_type) for r in rows] == [
        ("request", "application/sdp"), ("response", "application/sdp")]
    for row in rows:
        text = bytes(row.plaintext)
        assert b"m=audio" in text and b"a=crypto" not in text and b"inline:" not in text
    media = proxy.media_rows()
    assert sorted((m["address"], m["port"], m["proto"]) for m in media) == [
        ("127.0.0.1", 40000, "RTP/SAVP"), ("127.0.0.1", 40002, "RTP/SAVP")]
    stored = _archived(proxy)
    log = proxy.log_since(0)
    for key in (offer_key, answer_key):
        assert key.encode() not in stored
        assert key not in log
    assert "inline:" not in log


def test_debug_log_holds_no_key_of_a_relayed_offer(proxy_factory, sipp, raw_uas):
    offer_key, answer_key, proxy = _call(proxy_factory, sipp, raw_uas, "debug")
    assert offer_key not in proxy.log_since(0)
    stored = _archived(proxy)
    assert offer_key.encode() not in stored and answer_key.encode() not in stored
