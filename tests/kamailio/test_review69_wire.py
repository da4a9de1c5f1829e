"""A sixty-ninth attacker's review (December 2026) of a000c40: the insider hiding from
the archive by what the *next* parser reads (real Kamailio, stock receiving UAs).

Hole 1 (``test_hole_*_past_its_content_length_*``): the proxy reads a response by its
Content-Length, Kamailio relays the whole datagram, a stock pjsip reads the whole
datagram.

- Attacker: an **insider UA** (bob, registered behind the home proxy, archiving on), who
  wants what he answers out of the archive (a MESSAGE receipt; the SDP of his answer,
  the firewall's and the archive's media row); the same from an **untrusted hop**
  between bob and the proxy, for bob's answers.
- Messages: alice's request through the proxy (a plain MESSAGE under ``MESSAGE:*``; an
  INVITE with SDP under ``INVITE:application/sdp``); bob's 200 over UDP whose
  ``Content-Length`` covers a decoy (``ok``) or nothing (``Content-Length: 0`` with
  ``Content-Type: application/sdp``), and the real text or SDP after it in the same
  datagram.
- Effect (seen): Kamailio has no sanity check for replies: tm relays the datagram whole
  (the trailing octets included, Content-Length unchanged).  The proxy's core
  (``kemi._read_message`` -> ``sip.parse``, not ``exact``) takes the body by
  Content-Length and silently drops the rest: the archive holds ``ok`` and not the
  receipt; for the 200 to INVITE it reads no body at all (``seen=- media=0``), so no
  media row for the answer.  A stock pjsua2 2.15.1 caller (no E2M hook, through the
  real proxy) reads the whole datagram as the answer (review 59 showed the same pjsip
  rule for requests): its call is CONFIRMED with remote RTP ``127.0.0.1:40404``, the
  address only the hidden SDP names.  Our own phone refuses such a datagram
  (``_on_rx``: ``sip.parse(exact=True)``, review 59), so the effect is on the archive
  and every stock UA behind the proxy.
- At fault: ``kamailio_app/kemi.py`` ``_read_message`` (``return parse(...)``, used by
  ``read_reply`` for responses) with ``e2m_plugins/sip.py`` ``parse`` (octets after the
  Content-Length dropped unless ``exact``).  Requests are safe only because Kamailio's
  ``sanity_check_defaults`` answers such a datagram 400 (control below); replies get no
  such check.  Fix: read what Kamailio relays as the laxest stack behind it would: in
  ``read_reply`` parse with ``exact=True`` over UDP (or compare ``$bs`` with the core's
  body length), so that ``check_readable`` fails and the core reply route drops it as
  it drops review 57's second To and review 64's unreadable Via; or rewrite the
  relayed body to the Content-Length.

Hole 2 (``test_hole_*_with_another_branch_*``): a reply tm does not match is relayed
unread by a proxy that is not a cluster node.

- Attacker: the same **insider UA** (bob, the callee) or an **untrusted hop** between
  him and the proxy.
- Messages: bob's 200 (a MESSAGE receipt; the SDP answer to a stock pjsua2 caller's
  INVITE) with a true Content-Length, but the top Via's branch (the proxy's own, which
  Kamailio strips) changed from ``z9hG4bK...`` to ``z9hG4bKr69...``; alice's Via below
  it untouched.
- Effect (seen): tm matches no transaction; ``ksr_reply_route`` checks the reply's
  readability (``read_reply``) but reads it into the engine only on a cluster
  (``if self.app.engine is not None and self.app.replicates: self.route_stray_reply()``);
  Kamailio's core then forwards it statelessly along the second Via, alice's, whose
  branch her client transaction matches.  Nothing is logged for it ("response" never
  appears), no row is written: alice's socket gets the 200 with the receipt, the
  archive holds only her own text; the stock caller's call is CONFIRMED with remote RTP
  ``127.0.0.1:40404`` and the proxy has no media row for the answer.  The same works
  for an 18x's early media, and for keys a 2xx offers (forwarded unread).
- At fault: ``kamailio_app/kemi.py`` ``ksr_reply_route`` (``route_stray_reply`` only
  when ``self.app.replicates``).  Fix: on every proxy with an engine, read a stray
  reply that must be read (``route_stray_reply`` without the ``replicates`` condition),
  or, on a single node, drop a reply no transaction of ours matches when it needs
  reading (``response_needs_reading``): a single proxy sent no request it could answer.

Controls: the same receipt and answer with a true Content-Length are archived (the
stock caller gets the same RTP address, and the proxy records it); a *request* with
octets past its Content-Length is answered 400 by Kamailio's sanity check and reaches
nobody; the receipt with the proxy's own branch (in tm's transaction) is read and
archived.

What I tried that held (run): an in-dialog ACK carrying the answer SDP of a late-offer
call, sent to the proxy without the Route (token) header so that ``route_in_dialog``'s
``loose_route`` fails: not relayed at all (tm's ``t_check_trans`` matches no e2e ACK),
bob never got it; with the Route the ACK's SDP is read and a media row written.  A
plain MESSAGE with ``Content-Length: 0`` and text after it (sanity: 400).  Read in the
code, not run: on TCP/TLS Kamailio frames by Content-Length before the core reads
``$mb``, so the core and Kamailio agree and the next hop gets exactly that body
(``tcp_accept_no_cl=yes`` frames a head without Content-Length as bodiless, the rest
becoming the next message); conflicting or non-digit Content-Lengths are 400 in the
core (``_content_length``); a bare BYE/CANCEL is taken unread only when ``$bs`` (the
whole datagram's body) is 0; an in-dialog MESSAGE/INFO/UPDATE with a body is read by
the engine (``relay(inspect=not end_dialog_unread())``).

Fixed (stop 32): (1) the proxy reads every message with ``sip.parse(exact=True)``
(``kemi._read_message``): a reply with octets past its Content-Length body is
unreadable and dropped in the core reply route, so neither the archive nor the stock
caller gets it (the hole's assertion now names the drop); (2) a reply matching no
transaction is read on every proxy with an engine (``route_stray_reply`` without the
cluster condition), archived and its SDP recorded.  All four holes turned XPASS; the
markers are gone.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from e2m_lab.kamailio_harness import registered_uas
from e2m_lab.stock_caller import PRELUDE, script_result
from e2m_plugins.sip import make_request, make_response, parse
from tests.kamailio.test_review57_wire import receipt_exchange

pytestmark = pytest.mark.kamailio

HIDDEN = b"the receipt the archive never sees"
SDP_VIEW = ("INVITE:application/sdp",)
# bob's answer: the RTP address only the hidden copy names
BOB_SDP = (b"v=0\r\no=bob 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           b"m=audio 40404 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


# -- a MESSAGE receipt ---------------------------------------------------------------------

def _receipt(proxy_factory, *, smuggled: bool, name: str):
    """bob answers alice's plain MESSAGE with a 200 whose text is ``ok`` + HIDDEN: the
    Content-Length counts it all, or (``smuggled``) only ``ok``."""
    def responder(request):
        if smuggled:
            return make_response(request, 200, "OK", body=b"ok",
                                 content_type="text/plain").serialize() + HIDDEN
        return make_response(request, 200, "OK", body=b"ok" + HIDDEN,
                             content_type="text/plain").serialize()
    return receipt_exchange(proxy_factory, name, responder, bob_at="127.0.0.69",
                            alice_at="127.0.0.70")


def test_control_a_receipt_within_its_content_length_is_archived(proxy_factory):
    answers, rows, _ = _receipt(proxy_factory, smuggled=False, name="r69c")
    assert len(answers) == 1 and parse(answers[0], exact=True).body == b"ok" + HIDDEN
    assert b"hello bob" in rows and b"ok" + HIDDEN in rows


def test_hole_a_receipt_past_its_content_length_is_relayed_unarchived(proxy_factory):
    """Secure: what the proxy relays is what it read and archived, or it is dropped."""
    answers, rows, log = _receipt(proxy_factory, smuggled=True, name="r69h")
    # what reached alice's socket: the whole datagram, the hidden text after the body
    # the Content-Length counts (a stock pjsip takes it all for the body)
    relayed = [a for a in answers if a.endswith(b"\r\n\r\nok" + HIDDEN)]
    assert b"hello bob" in rows                     # alice's own text was archived
    assert not relayed or any(HIDDEN in r for r in rows), (rows, log[-600:])


def test_control_a_request_past_its_content_length_is_refused(proxy_factory):
    """The request side holds: Kamailio's sanity check answers 400 and relays nothing."""
    proxy = proxy_factory("r69r", e2m=True, view=("MESSAGE:*",))
    with registered_uas(proxy, "bob", None, "127.0.0.71") as uas:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.72", 0))
        sock.settimeout(2)
        try:
            port = sock.getsockname()[1]
            msg = make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:alice@example.com",
                               to_uri="sip:bob@example.com", via_host=f"127.0.0.72:{port}",
                               body=b"ok", content_type="text/plain")
            sock.sendto(msg.serialize() + HIDDEN, ("127.0.0.1", proxy.port))
            answer = parse(sock.recv(65535))
            assert answer.status == 400, answer.status
            time.sleep(0.3)
            assert not uas.wait_for(1, timeout=0.5, method="MESSAGE")
            assert not any(HIDDEN in r.plaintext for r in proxy.archive_rows())
        finally:
            sock.close()


# -- an INVITE's answer to a stock pjsip caller -----------------------------------------

# A stock pjsua2 caller: calls sip:bob@example.com through the proxy and prints the
# remote RTP address pjsip negotiated from the answer it read.
_STOCK_CALLER = PRELUDE + r'''
result = {}
class Call(pj.Call):
    def onCallMediaState(self, prm):
        try:
            result["remote_rtp"] = self.getStreamInfo(0).remoteRtpAddress
        except Exception as exc:
            result["error"] = repr(exc)
call = Call(acc)
call.makeCall("sip:bob@example.com", pj.CallOpParam(True))
deadline = time.time() + 4
while time.time() < deadline and "remote_rtp" not in result:
    ep.libHandleEvents(50)
try:
    result["state"] = call.getInfo().stateText
except Exception:
    pass
print("RESULT " + json.dumps(result), flush=True)
os._exit(0)
'''


def _stock_call(proxy_factory, tmp_path, *, smuggled: bool, name: str, stray: bool = False):
    """A stock pjsua2 caller calls bob (a RawUas) through a proxy viewing INVITE SDP;
    bob's 200 carries BOB_SDP with a true Content-Length, or (``smuggled``)
    ``Content-Length: 0`` and BOB_SDP after the head; ``stray``: the 200 with a true
    Content-Length, the proxy's Via branch changed (``_stray``).  Returns (what pjsip
    negotiated, the proxy's media rows for responses, its log)."""
    pytest.importorskip("pjsua2")
    script = tmp_path / "stock_caller.py"
    script.write_text(_STOCK_CALLER)
    proxy = proxy_factory(name, e2m=True, view=SDP_VIEW)
    mark = proxy.log_mark()
    state = {}

    def responder(request):
        if request.method != "INVITE":
            return make_response(request, 200, "OK")
        extra = [("Record-Route", rr) for rr in request.get_all("Record-Route")]
        extra.append(("Contact", f"<sip:bob@127.0.0.1:{state['port']}>"))
        if not smuggled:
            reply = make_response(request, 200, "OK", extra, body=BOB_SDP,
                                  content_type="application/sdp")
            return _stray(reply) if stray else reply
        wire = make_response(request, 200, "OK", extra, content_type="application/sdp").serialize()
        assert wire.endswith(b"Content-Length: 0\r\n\r\n")
        return wire + BOB_SDP
    with registered_uas(proxy, "bob", None, "127.0.0.73", responder=responder) as bob:
        state["port"] = bob.port
        out = subprocess.run([sys.executable, str(script), str(proxy.port)],
                             capture_output=True, timeout=20)
        got = script_result(out.stdout, out.stderr)
        assert bob.wait_for(1, method="INVITE")
        time.sleep(0.3)
        answers = [row for row in proxy.media_rows() if row["direction"] != "request"]
        return got, answers, proxy.log_since(mark)


def test_control_an_answer_sdp_within_its_content_length_is_recorded(proxy_factory, tmp_path):
    got, answers, _ = _stock_call(proxy_factory, tmp_path, smuggled=False, name="r69s")
    assert got.get("state") == "CONFIRMED" and got.get("remote_rtp") == "127.0.0.1:40404", got
    assert [row["port"] for row in answers] == [40404], answers


def test_hole_an_answer_sdp_past_its_content_length_moves_a_stock_callers_media_unrecorded(
        proxy_factory, tmp_path):
    """Secure: the media a stock caller takes from an answer the proxy relayed is the
    media the proxy recorded (or the answer is not relayed)."""
    got, answers, log = _stock_call(proxy_factory, tmp_path, smuggled=True, name="r69m")
    # the fix: the core reply route refuses it whole and drops it (not relayed)
    assert "octets after the Content-Length body): dropped" in log
    taken = got.get("remote_rtp")
    assert taken != "127.0.0.1:40404" or any(row["port"] == 40404 for row in answers), \
        (got, answers, log[-600:])


# -- hole 2: a reply tm does not match is relayed unread (one proxy, no cluster) ---------

def _stray(reply) -> bytes:
    """``reply``'s wire bytes with the top Via's (the proxy's) branch changed: tm matches
    no transaction, Kamailio's core forwards it statelessly along the second Via, the
    caller's own, whose branch her transaction matches."""
    top = reply.get_all("Via")[0]
    assert "branch=z9hG4bK" in top
    return reply.serialize().replace(top.encode(),
                                     top.replace("branch=z9hG4bK", "branch=z9hG4bKr69").encode(), 1)


def _stray_receipt(proxy_factory, *, stray: bool, name: str):
    def responder(request):
        reply = make_response(request, 200, "OK", body=HIDDEN, content_type="text/plain")
        return _stray(reply) if stray else reply.serialize()
    return receipt_exchange(proxy_factory, name, responder, bob_at="127.0.0.75",
                            alice_at="127.0.0.76")


def test_control_a_receipt_in_the_transaction_is_read_and_archived(proxy_factory):
    answers, rows, log = _stray_receipt(proxy_factory, stray=False, name="r69t")
    assert len(answers) == 1 and parse(answers[0], exact=True).body == HIDDEN
    assert HIDDEN in rows and "MESSAGE response 200" in log


def test_hole_a_receipt_with_another_branch_is_relayed_unread(proxy_factory):
    """Secure: a reply the proxy relays with a body it views is read and archived (as a
    cluster node reads a stray reply), or it is dropped."""
    answers, rows, log = _stray_receipt(proxy_factory, stray=True, name="r69u")
    delivered = [parse(a, exact=True) for a in answers]
    assert b"hello bob" in rows
    assert not any(m.body == HIDDEN for m in delivered) or HIDDEN in rows, (rows, log[-600:])


def test_hole_an_answer_with_another_branch_moves_a_stock_callers_media_unrecorded(
        proxy_factory, tmp_path):
    got, answers, log = _stock_call(proxy_factory, tmp_path, smuggled=False, stray=True,
                                    name="r69v")
    taken = got.get("remote_rtp")
    assert taken != "127.0.0.1:40404" or any(row["port"] == 40404 for row in answers), \
        (got, answers, log[-600:])
