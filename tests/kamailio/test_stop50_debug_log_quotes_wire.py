"""Stop 50, after review 178: every record of Kamailio's that quotes a message at debug
level, not only the relayed reply review 178 found.

Review 178 K1 showed the core's ``generate_res_buf_from_sip_res`` record (every relayed
reply, whole) passing the launcher's ``LogCutter``, which cut only the records it named.
Kamailio 5.6.3 has more records that print a whole message on the lines after their
first: the core's stateless forward (``forward.c``: ``Sending:``, an ACK with its
body), the TCP writer (``tcp_main.c``: ``buf=``, everything sent on a connection), tm's
reparse of an INVITE it sent to build the ACK of its 2xx (``t_msgbuilder.c``), STUN,
raw sockets.  Naming them one by one misses the next; so
``LogCutter`` now drops the continuation lines of every record (one marker line says so)
but an app_python3 traceback's.

The first two tests below are attacks that worked on the code before the fix (at
debug, the key or the canary was in the log); the third held there too and stays as a
guard:

- ``test_debug_log_holds_no_key_of_a_relayed_ack``: an offerless INVITE, bob's offer in
  his 200, alice's keyed answer in her ACK (forwarded statelessly: ``Sending:``).
- ``test_debug_log_holds_no_text_sent_on_a_tcp_connection``: alice over TCP; the 200 to
  her MESSAGE, with bob's text, written on her connection (``buf=``).
- ``test_debug_log_holds_no_key_of_a_cancelled_offer``: alice's keyed INVITE rings and
  she cancels it; tm builds the CANCEL to bob from her INVITE (no record quoted it).
"""

from __future__ import annotations

import secrets
import time

import pytest

from e2m_lab.kamailio_harness import SipUa, parse_address_uri
from e2m_lab.sipp import register
from e2m_plugins.sip import make_response

from tests.kamailio.test_review178_debug_log_keys_wire import SDP_VIEW, _key, _sdes

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]


def _no_key_in(log: str, *keys: str) -> None:
    for key in keys:
        assert key not in log, [line for line in log.splitlines() if key in line]
    assert "inline:" not in log and "a=crypto" not in log


def test_debug_log_holds_no_key_of_a_relayed_ack(proxy_factory, sipp, raw_uas):
    proxy = proxy_factory("home", e2m=True, view=SDP_VIEW + ("ACK:application/sdp",),
                          log_level="debug")
    register(proxy, "bob", raw_uas.port, sipp)
    bob_key, alice_key = _key(), _key()
    raw_uas.responder = lambda request: make_response(
        request, 200, "OK", extra_headers=[("Contact", raw_uas.uri)],
        body=_sdes(40002, bob_key), content_type="application/sdp")
    ua = SipUa(proxy.port, user="alice")
    try:
        invite = ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com")
        ok = ua.request(invite, timeout=8)
        assert ok is not None and ok.status == 200, ok
        sent = ua.sent[-1]
        ack = ua.build("ACK", parse_address_uri(ok.get("Contact") or ""),
                       to="sip:bob@example.com", call_id=sent.get("Call-ID"),
                       from_tag=sent.from_tag, cseq=sent.cseq[0], to_tag=ok.to_tag,
                       routes=list(reversed(ok.get_all("Record-Route"))),
                       body=_sdes(40000, alice_key), content_type="application/sdp")
        ua.send(ack.replace("Via", ua.via()))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not any(
                m.method == "ACK" for m in raw_uas.received):
            time.sleep(0.05)
        assert any(m.method == "ACK" and alice_key.encode() in m.body
                   for m in raw_uas.received), "the ACK did not reach bob"
    finally:
        ua.close()
    time.sleep(0.5)        # the launcher drains Kamailio's log every 20 ms
    _no_key_in(proxy.log_since(0), alice_key, bob_key)


def test_debug_log_holds_no_key_of_a_cancelled_offer(proxy_factory, sipp, raw_uas):
    proxy = proxy_factory("home", e2m=True, view=SDP_VIEW, log_level="debug")
    register(proxy, "bob", raw_uas.port, sipp)
    raw_uas.responder = lambda request: make_response(
        request, 180 if request.method == "INVITE" else 200,
        "Ringing" if request.method == "INVITE" else "OK")
    alice_key = _key()
    ua = SipUa(proxy.port, user="alice")
    try:
        invite = ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com",
                          body=_sdes(40000, alice_key), content_type="application/sdp")
        invite = invite.replace("Via", ua.via())
        ua.send(invite)
        ringing = ua.receive(timeout=3)
        while ringing is not None and ringing.status != 180:
            ringing = ua.receive(timeout=3)
        assert ringing is not None, "no 180"
        cancel = ua.build("CANCEL", invite.request_uri or "", to="sip:bob@example.com",
                          call_id=invite.get("Call-ID"), from_tag=invite.from_tag,
                          cseq=invite.cseq[0])
        ua.send(cancel.replace("Via", invite.get("Via") or ""))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not any(
                m.method == "CANCEL" for m in raw_uas.received):
            time.sleep(0.05)
        assert any(m.method == "CANCEL" for m in raw_uas.received), "no CANCEL reached bob"
    finally:
        ua.close()
    time.sleep(0.5)
    _no_key_in(proxy.log_since(0), alice_key)


def test_debug_log_holds_no_text_sent_on_a_tcp_connection(proxy_factory, sipp, raw_uas):
    proxy = proxy_factory("home", e2m=True, view=("MESSAGE:*",), log_level="debug")
    register(proxy, "bob", raw_uas.port, sipp)
    canary = "canary-" + secrets.token_hex(12)
    raw_uas.responder = lambda request: make_response(
        request, 200, "OK", body=f"bob's words {canary}\r\n".encode(),
        content_type="text/plain")
    ua = SipUa(proxy.port, user="alice", transport="tcp")
    try:
        got = ua.message("bob", b"hello bob\r\n")
    finally:
        ua.close()
    assert got is not None and got.status == 200 and canary.encode() in got.body
    time.sleep(0.5)
    log = proxy.log_since(0)
    assert canary not in log, [line for line in log.splitlines() if canary in line]
