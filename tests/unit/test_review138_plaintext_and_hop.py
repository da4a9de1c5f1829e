"""Review 138 (attacker's review of d24d457), areas 3 and 4 at the engine: no hole found;
these tests keep what was tried and held live.

Area 3, the proxy's plaintext rules (``body.refuse_encoded_plaintext`` now for an SDP
and ``text/*`` only, ``refuse_hidden_parts``), on review 136's quoted-printable offer
whose soft line break hides a media-level ``c=IN IP4 127.0.0.9`` from the view
(``ProxyEngine`` with the example home's ``INVITE:application/sdp`` view):

- every spelling of the Content-Type pjsip reads as an SDP (it compares type and
  subtype without case and ignores parameters): ``Application/SDP``,
  ``application/sdp;charset=utf-8``, ``application/sdp ; x=1``, a leading space or a
  trailing tab, ``application / sdp``, ``application/sdp;``, ``application/SDP;
  version=2``, ``application/sdp;boundary=x``: all 415 with the header, and forwarded
  with the raw media recorded without it (``mime.parse_content_type`` lower-cases the
  type and drops the parameters, the same reading);
- ``application/sdp,text/plain`` and ``application/sdp (c)``: 400 with or without the
  header (unreadable Content-Type);
- ``application/x-sdp``: forwarded, no media recorded: pjsip does not take it as an SDP
  either (``pjsip_rdata_get_sdp_info`` compares the subtype with ``sdp``), so no stock
  phone sets up media from it;
- ``multipart/mixed`` bodies (scratch run at the engine, not kept): two SDP parts are
  both recorded (127.0.0.9 and 127.0.0.1; pjsip takes the first, which is among them);
  two Content-Type headers in a part 400 either order; a part with LF line ends, a
  folded or padded Content-Type, or a ``l:`` (Content-Length) header is read as an SDP
  and recorded; a part whose SDP holds a line ``--k`` (the boundary) 400; the same
  bodies as ``multipart/alternative`` 415 (``refuse_hidden_parts``);
- SIP-level Content-Type: two of them (``text/plain`` then compact ``c:
  application/sdp``, or the other order) 400; an empty one 400; none at all:
  forwarded, no media recorded (pjsip parses no body without a Content-Type either:
  read, not run);
- transfer-encoding spellings: ``Quoted-Printable`` 415, ``x-qp`` refused (an encoding
  the view cannot undo), ``7bit `` (trailing space) and ``8BIT`` forwarded with the raw
  127.0.0.9 recorded (no decoding on either side), ``base64`` refused.

Area 4, ``notifier._transport`` and ``in_dialog_hop`` (run on the real Kamailio home
of review 133's fixture in a scratch module, not kept; carol follows bob over UDP with
the Record-Route below):

- ``<sip:SRC:PORT;maddr=V;lr>``: 200, the row's next hop keeps the maddr, but
  Kamailio sent the NOTIFY to carol at SRC, nothing reached a socket at V:PORT
  (Kamailio does not honour a maddr in the NOTIFY's next hop here);
- ``<sips:SRC:PORT;transport=udp;lr>``: 200 (``_transport`` reads ``udp``), no NOTIFY
  reached carol and no TCP/TLS connect reached SRC:PORT (Kamailio will not send to a
  sips URI over UDP): only the subscriber's own follow is lost, and no connect to a
  possibly forged UDP source is made (the rule ``_next_hop`` keeps);
- ``transport=UDP`` (upper case): 200 and carol's NOTIFY; ``sips;transport=sctp``: 403;
  two ``transport`` parameters: 400.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_VIEW, TRUSTED, invite, proxy_engine
from e2m_plugins import notifier
from e2m_plugins.sip import SipMessage
from e2m_plugins.testpki import init_test_pki

_HEAD = b"v=0\r\no=bob 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
CLEAN = _HEAD + b"m=audio 40404 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
QP_SOFT_BREAK = CLEAN + b"a=label:x=\r\nc=IN IP4 127.0.0.9\r\n"
PJSIP_READS_AS_SDP = ["Application/SDP", "application/sdp;charset=utf-8",
                      "application/sdp ; x=1", " application/sdp", "application/sdp\t",
                      "application / sdp", "application/sdp;",
                      "application/SDP;version=2", "application/sdp;boundary=x"]


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _typed(message: SipMessage, content_type: str, *extra: tuple[str, str]) -> SipMessage:
    headers = tuple((n, content_type) if n.lower() in ("content-type", "c") else (n, v)
                    for n, v in message.headers)
    return SipMessage(message.start_line, headers + extra, message.body)


@pytest.mark.parametrize("content_type", PJSIP_READS_AS_SDP)
def test_held_a_quoted_printable_sdp_under_any_spelling_pjsip_reads_is_refused(
        world, content_type):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    message = _typed(invite(world, QP_SOFT_BREAK, call_id=f"r138-{content_type!r}"),
                     content_type, ("Content-Transfer-Encoding", "quoted-printable"))
    verdict = proxy.inspect(message)
    assert verdict.action == "reply", (verdict.action, verdict.media)


@pytest.mark.parametrize("content_type", PJSIP_READS_AS_SDP)
def test_control_the_same_spellings_without_the_header_are_viewed(world, content_type):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    verdict = proxy.inspect(_typed(invite(world, CLEAN, call_id=f"r138c-{content_type!r}"),
                                   content_type))
    assert verdict.action == "forward" and verdict.error is None
    assert [(m.address, m.port) for m in verdict.media] == [("127.0.0.1", 40404)]


@pytest.mark.parametrize("encoding", ["7bit ", "8BIT"])
def test_held_an_identity_encoding_is_read_raw(world, encoding):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    message = _typed(invite(world, QP_SOFT_BREAK, call_id=f"r138e-{encoding}"),
                     "application/sdp", ("Content-Transfer-Encoding", encoding))
    verdict = proxy.inspect(message)
    assert verdict.action == "forward"
    assert [(m.address, m.port) for m in verdict.media] == [("127.0.0.9", 40404)]


@pytest.mark.parametrize("uri,transport", [
    ("sips:127.0.0.2:5061;transport=tcp;lr", "tls"), ("sips:127.0.0.2;lr", "tls"),
    ("sips:127.0.0.2;transport=TCP;lr", "tls"), ("sip:127.0.0.2;transport=TLS;lr", "tls"),
    ("sip:127.0.0.2;transport=UDP;lr", "udp"), ("sip:127.0.0.2;lr", "udp"),
    ("sips:127.0.0.2;transport=udp;lr", "udp")])
def test_held_transport_readings(uri, transport):
    assert notifier._transport(uri) == transport
