"""Review 136 (attacker's review of e01bb86), area 1 and 2, hole K1: an SDP sent with
``Content-Transfer-Encoding: quoted-printable`` is viewed decoded; a stock pjsua2 phone
reads the octets.  Real Kamailio (``proxy_factory``, E2M on, ``view =
INVITE:application/sdp``); review 133's stock pjsua2 2.15.1 caller with bob a
``RawUas`` (answer side), and a stock pjsua2 2.15.1 callee of this module (offer side:
a ``pj.Account`` whose ``onIncomingCall`` answers 200, registered at the proxy) called
by a raw UDP caller.

Hole K1
-------

- Attacker: an **insider UA** (bob the callee, or a raw caller) hiding where a stock
  phone's media goes from the archive and the firewall view; the same from an
  **untrusted hop** on the insider's side of the proxy (it adds the header and one
  line).  No key, no error, no odd spelling the SDP view looks for.
- Messages: a plaintext SDP (``Content-Type: application/sdp``) with the SIP header
  ``Content-Transfer-Encoding: quoted-printable``: session ``c=IN IP4 127.0.0.1``,
  ``m=audio 40404 RTP/AVP 0``, ``a=rtpmap:0 PCMU/8000``, then ``a=label:x=`` and a
  media-level ``c=IN IP4 127.0.0.9``.  Decoded as quoted-printable, the ``=`` at the
  end of ``a=label:x=`` is a soft line break: the proxy reads one attribute
  ``a=label:xc=IN IP4 127.0.0.9`` and no media-level ``c=``.  pjsip does not know the
  header and reads the octets: the media-level ``c=`` is there.
- Observed, answer side (bob's 200 to the stock caller): the proxy logs ``e2m: INVITE
  response 200 action=forward seen=application/sdp/141B/sig=none media=1`` (no error:
  neither review 133's nor review 134's drop rule applies), the answer row is
  **(127.0.0.1, 40404)**, and the stock caller is ``CONFIRMED`` with remote RTP
  **127.0.0.9:40404**.  Offer side (the raw caller's INVITE to the stock callee): the
  proxy relays it, the offer row is **(127.0.0.1, 40404)**, the stock callee answers
  200 and its stream's remote RTP is **127.0.0.9:40404**.  Without the header (the
  controls) the same SDP is recorded as (127.0.0.9, 40404) on both sides.  The engine
  reads a QP SDP part of ``multipart/mixed`` and an UPDATE the same way
  (``tests/unit/test_review136_transfer_encoding.py``).
- Code at fault: ``e2m_plugins/body.py:220-221`` (``open_part`` hands back a plain
  part's ``part.decoded()``), ``e2m_plugins/mime.py:318-333`` (``decoded``/``_decode``
  undo base64 and quoted-printable for any part, the SIP body's own
  ``Content-Transfer-Encoding`` header included, ``body_part`` at ``:512``), and
  ``e2m_plugins/proxy.py:798-799`` (``_read_body`` summarises media from that decoded
  content).  Review 54 held "transfer encodings at either level (one ``decoded()``)"
  for E2M UAs, which decode as the proxy does (``as_read``); a stock SIP stack does
  not decode at all (RFC 3261 bodies are 8-bit; pjsip ignores the header).
- Suggested fix: for a method the view's rules cover, refuse a plaintext part (the body
  itself or a part of the top ``multipart/mixed``) whose ``Content-Transfer-Encoding``
  is anything but absent, ``7bit``, ``8bit`` or ``binary`` (415 for a request, a
  ``MalformedError`` or ``UnsupportedMediaTypeError`` that the core reply route drops
  for a response), or summarise media from the raw octets (``part.body``), never the
  decoded ones; S/MIME parts keep their base64 (the UA and the proxy both decode
  those).
- Tests: ``test_a_quoted_printable_answer_is_not_relayed_unrecorded`` and
  ``test_a_quoted_printable_offer_is_not_relayed_unrecorded`` (strict xfail): secure
  means the media the stock phone took is a recorded row's (or the message never
  reached it).

Controls (unmarked, pass): ``test_control_the_same_answer_without_the_header_is_recorded``
(CONFIRMED on 127.0.0.9:40404, answer row (127.0.0.9, 40404)) and
``test_control_the_same_offer_without_the_header_is_recorded`` (the stock callee on
127.0.0.9:40404, offer row (127.0.0.9, 40404)): the set-up is live and the SDP itself is
one the view reads.

Tried and held (area 1).  Read in pjsip's sources (the stored pjproject mirror, 2.17-dev;
the phones run 2.15.1, whose behaviour review 135's controls match): pjsip finds SDP only
in an ``application/sdp`` body or a top-level part of a ``multipart/mixed`` or
``/alternative`` (``pjsip_get_sdp_info``), so ``message/sipfrag``, ``multipart/related``
(review 135's control, now dropped) and a body without Content-Type give it none, and a
nested multipart is now refused by the view; a part's headers go through pjsip's SIP
header parser (``parse_multipart_part``), whose ``c:`` our MIME reader expands too, and
whose last Content-Type wins where ours refuses two; a part with no blank line has no
headers for pjsip (text/plain), which only hides SDP from pjsip; a boundary string
mid-line (pjsip's ``pj_strstr``) is refused by the count check; base64 cannot carry an
SDP pjmedia parses (``=`` only as padding).  Run at the engine: in the unit module,
``Content-Encoding: gzip`` is undone by neither side (the raw 127.0.0.9 is recorded) and
the QP header on an SDP whose decoding changes nothing reads as before; in a scratch
script (not kept), two Content-Type headers (``c`` and long form) are 400,
``Content-Transfer-Encoding: x-foo`` is 415 and ``base64`` on an SDP 400, and a
top-level ``text/plain`` SDP is forwarded with no media (pjsip takes none from it).

Area 2, read in the code, not run: the core reply route drops an answer only for an
error in reading its own body (``read_response``); the request enters that reading only
through the keys the proxy kept, and a lost or evicted key makes a sealed answer
``ProxyCannotDecryptError`` with no keyless part: relayed with its error, not dropped.
A hop on the answer's path can drop it anyway; none was found that makes the proxy
drop an honest answer it does not carry.  K1 is the answer that gets through
unrecorded.

Fixed (stop 44), K1: where the view's rules cover the method, a part in the clear (or
any leaf of it) whose Content-Transfer-Encoding changes its octets is refused
(``body.refuse_encoded_plaintext``): 415 for a request, the response dropped in the
core reply route.  A header whose decoding changes nothing still reads as before (the
control).  The hole tests failed on the code before and pass now.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from e2m_lab.stock_caller import ENDPOINT, announced_port, script_result
from tests.kamailio.test_review133_answer_sdp_wire import _stock_call as _stock_call133

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)
_HEAD = b"v=0\r\no=bob 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
_M = b"m=audio 40404 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
CLEAN = _HEAD + _M
# a quoted-printable soft line break ("=" at a line's end) joins the media-level c= line
# into the attribute before it, for a reader that undoes the transfer encoding
QP_SOFT_BREAK = CLEAN + b"a=label:x=\r\nc=IN IP4 127.0.0.9\r\n"


def _stock_call(proxy_factory, tmp_path, sdp: bytes, name: str, *,
                content_type: str = "application/sdp",
                headers: tuple[tuple[str, str], ...] = ()):
    """Review 133's stock call (a stock pjsua2 caller, bob a RawUas answering 200 with
    ``sdp``), with ``headers`` added to bob's 200: (what the caller took, the answer
    rows, the proxy's lines about the 200)."""
    got, answers, _, log = _stock_call133(proxy_factory, tmp_path, sdp, name,
                                          content_type=content_type, headers=headers)
    seen = [ln[ln.index("e2m: "):] for ln in log.splitlines()
            if "e2m: INVITE response" in ln or "INVITE 200 that must be read" in ln]
    print(f"\n{name}: caller {got}; answer rows "
          f"{[(r['address'], r['port']) for r in answers]}; log {seen}")
    return got, answers, seen


def _recorded_as_taken(got, answers) -> bool:
    taken = got.get("final_rtp") or got.get("remote_rtp")
    return got.get("state") != "CONFIRMED" or \
        any(f"{row['address']}:{row['port']}" == taken for row in answers)


def test_a_quoted_printable_answer_is_not_relayed_unrecorded(proxy_factory, tmp_path):
    """Secure: the media a stock caller takes from a relayed answer is media the proxy
    recorded for it (or the answer is not relayed)."""
    got, answers, seen = _stock_call(
        proxy_factory, tmp_path, QP_SOFT_BREAK, "r136qp",
        headers=(("Content-Transfer-Encoding", "quoted-printable"),))
    assert _recorded_as_taken(got, answers), (got, answers, seen)


def test_control_the_same_answer_without_the_header_is_recorded(proxy_factory, tmp_path):
    got, answers, seen = _stock_call(proxy_factory, tmp_path, QP_SOFT_BREAK, "r136qpc")
    assert got.get("state") == "CONFIRMED", got
    assert (got.get("final_rtp") or got.get("remote_rtp")) == "127.0.0.9:40404", got
    assert [(r["address"], r["port"]) for r in answers] == [("127.0.0.9", 40404)], answers


# -- the offer side: a stock pjsua2 callee -------------------------------------------

# A stock pjsua2 callee (no E2M hook): prints its SIP port, answers the first call 200
# and prints the remote RTP address pjsip took from the offer.
_STOCK_CALLEE = ENDPOINT + r'''
print("PORT " + ep.transportGetInfo(transport_id).localName.rsplit(":", 1)[1], flush=True)
acfg = pj.AccountConfig()
acfg.idUri = "sip:bob@example.com"
acfg.sipConfig.transportId = transport_id
acfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
result = {}
calls = []
class Call(pj.Call):
    def onCallMediaState(self, prm):
        try:
            result["remote_rtp"] = self.getStreamInfo(0).remoteRtpAddress
        except Exception as exc:
            result["error"] = repr(exc)
class Account(pj.Account):
    def onIncomingCall(self, prm):
        call = Call(self, prm.callId)
        calls.append(call)
        result["incoming"] = True
        op = pj.CallOpParam()
        op.statusCode = 200
        try:
            call.answer(op)
        except Exception as exc:
            result["answer_error"] = repr(exc)
acc = Account()
acc.create(acfg)
deadline = time.time() + float(sys.argv[1])
while time.time() < deadline and "remote_rtp" not in result:
    ep.libHandleEvents(50)
print("RESULT " + json.dumps(result), flush=True)
os._exit(0)
'''


def _call_stock_callee(proxy_factory, tmp_path, sdp: bytes, name: str, *,
                       content_type: str = "application/sdp",
                       headers: tuple[tuple[str, str], ...] = ()):
    """An insider caller (raw UDP, plaintext) INVITEs bob, a stock pjsua2 callee
    registered at a proxy viewing INVITE SDP.  Returns (what the callee's pjsip took,
    the proxy's offer media rows, the final status the caller got)."""
    import socket
    from e2m_lab.kamailio_harness import build_request, register_contact
    from e2m_plugins.sip import parse
    pytest.importorskip("pjsua2")
    script = tmp_path / "stock_callee.py"
    script.write_text(_STOCK_CALLEE)
    proxy = proxy_factory(name, e2m=True, view=SDP_VIEW)
    callee = subprocess.Popen([sys.executable, str(script), "6"], stdout=subprocess.PIPE)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    status = None
    try:
        register_contact(proxy, "bob", announced_port(callee), source="127.0.0.137")
        raw = build_request("INVITE", "sip:bob@example.com", body=sdp, content_type=content_type,
                            headers=[("Contact", f"<sip:alice@127.0.0.1:{sock.getsockname()[1]}>"),
                                     *headers],
                            local_port=sock.getsockname()[1])
        sock.sendto(raw, ("127.0.0.1", proxy.port))
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and status is None:
            try:
                reply = parse(sock.recvfrom(65535)[0])
            except (socket.timeout, Exception):
                continue
            if reply.is_request:
                continue
            if (reply.status or 0) >= 200:
                status = reply.status
        out, _ = callee.communicate(timeout=15)
    finally:
        sock.close()
        if callee.poll() is None:
            callee.kill()
            callee.wait()
    got = script_result(out)
    offers = [row for row in proxy.media_rows() if row["direction"] == "request"]
    print(f"\n{name}: callee {got}; offer rows {[(r['address'], r['port']) for r in offers]}; "
          f"caller status {status}")
    return got, offers, status


def test_a_quoted_printable_offer_is_not_relayed_unrecorded(proxy_factory, tmp_path):
    """Secure: the media a stock callee takes from a relayed offer is media the proxy
    recorded for it (or the offer never reached it)."""
    got, offers, status = _call_stock_callee(
        proxy_factory, tmp_path, QP_SOFT_BREAK, "r136qpo",
        headers=(("Content-Transfer-Encoding", "quoted-printable"),))
    taken = got.get("remote_rtp")
    assert taken is None or any(f"{r['address']}:{r['port']}" == taken for r in offers), \
        (got, offers, status)


def test_control_the_same_offer_without_the_header_is_recorded(proxy_factory, tmp_path):
    got, offers, status = _call_stock_callee(proxy_factory, tmp_path, QP_SOFT_BREAK, "r136qpoc")
    assert got.get("remote_rtp") == "127.0.0.9:40404", got
    assert [(r["address"], r["port"]) for r in offers] == [("127.0.0.9", 40404)], offers
