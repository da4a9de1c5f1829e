"""Review 136 (attacker's review of e01bb86), hole K1 at the engine: the proxy's view of
a plaintext SDP undoes a ``Content-Transfer-Encoding`` that no SIP stack undoes.

``mime.MimePart.decoded`` undoes ``quoted-printable`` (and base64) for every part, the
plaintext ones included, and ``ProxyEngine._read_body`` summarises media from that
decoded text (``OpenedPart.content``), while pjsip (pjmedia's SDP parser) reads the
octets as sent: it does not know the header.  A quoted-printable soft line break
(``=`` at a line's end) joins the next line into the one before it for the proxy only,
so ``a=label:x=`` followed by a media-level ``c=IN IP4 127.0.0.9`` is an attribute to
the proxy (which records the session ``c=IN IP4 127.0.0.1``) and a connection line to
pjsip (which sends the media to 127.0.0.9).  The wire runs (stock pjsua2 caller and
callee, real Kamailio) are in ``tests/kamailio/test_review136_transfer_encoding_wire.py``;
this module holds the same reading at the engine for an offer, an answer, a part of a
``multipart/mixed`` and an UPDATE (every method ``INVITE:`` covers reads one way).

Secure (the hole tests, strict xfail): the view either refuses such a body (415 for a
request; the response dropped, ``response_refused``) or records the media the raw
octets name.  Controls (unmarked): the same SDP without the header is recorded as
127.0.0.9; the same header on an SDP whose decoding changes nothing is read as before;
``Content-Encoding: gzip`` (no decoding on either side) is read raw.

Fixed (stop 44), K1: where the view's rules cover the method, a part in the clear (or
any leaf of it) whose Content-Transfer-Encoding changes its octets is refused
(``body.refuse_encoded_plaintext``): 415 for a request, the response dropped in the
core reply route.  A header whose decoding changes nothing still reads as before (the
control).  The hole tests failed on the code before and pass now.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_VIEW, TRUSTED, answer, invite, proxy_engine
from e2m_plugins.sdp import media_summary
from e2m_plugins.sip import SipMessage
from e2m_plugins.testpki import init_test_pki

_HEAD = b"v=0\r\no=bob 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
_M = b"m=audio 40404 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
CLEAN = _HEAD + _M
QP_SOFT_BREAK = CLEAN + b"a=label:x=\r\nc=IN IP4 127.0.0.9\r\n"
QP = ("Content-Transfer-Encoding", "quoted-printable")


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _with(message: SipMessage, *headers: tuple[str, str]) -> SipMessage:
    return SipMessage(message.start_line, message.headers + tuple(headers), message.body)


def _raw_media():
    """What pjmedia reads (the octets): one stream, to 127.0.0.9:40404."""
    return [(m.address, m.port) for m in media_summary(QP_SOFT_BREAK)]


def _secure_request(verdict) -> bool:
    return verdict.action == "reply" or [(m.address, m.port) for m in verdict.media] == _raw_media()


def test_the_raw_octets_name_127_0_0_9():
    assert _raw_media() == [("127.0.0.9", 40404)]


def test_a_quoted_printable_offer_is_refused_or_recorded_as_sent(world):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    verdict = proxy.inspect(_with(invite(world, QP_SOFT_BREAK, call_id="k1-offer"), QP))
    assert _secure_request(verdict), (verdict.action, verdict.media)


def test_a_quoted_printable_sdp_part_is_refused_or_recorded_as_sent(world):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    body = (b"--k1\r\nContent-Type: application/sdp\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + QP_SOFT_BREAK
            + b"\r\n--k1--\r\n")
    verdict = proxy.inspect(invite(world, call_id="k1-part").with_body(
        body, "multipart/mixed;boundary=k1"))
    assert _secure_request(verdict), (verdict.action, verdict.media)


def test_a_quoted_printable_update_is_refused_or_recorded_as_sent(world):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    update = invite(world, QP_SOFT_BREAK, call_id="k1-update", to_tag="b1", cseq=2,
                    method="UPDATE")
    verdict = proxy.inspect(_with(update, QP))
    assert _secure_request(verdict), (verdict.action, verdict.media)


def test_a_quoted_printable_answer_is_dropped_or_recorded_as_sent(world):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    request = invite(world, call_id="k1-answer")
    proxy.inspect(request)
    reading = proxy.read_response(_with(answer(request, QP_SOFT_BREAK), QP))
    assert proxy.response_refused(reading) or \
        [(m.address, m.port) for m in reading.media] == _raw_media(), \
        (reading.error, reading.media)


def test_control_without_the_header_the_raw_address_is_recorded(world):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    verdict = proxy.inspect(invite(world, QP_SOFT_BREAK, call_id="k1-c1"))
    assert verdict.action == "forward" and verdict.error is None
    assert [(m.address, m.port) for m in verdict.media] == [("127.0.0.9", 40404)]


def test_control_the_header_on_an_sdp_decoding_leaves_alone_reads_as_before(world):
    """The header alone changes nothing for an SDP without ``=`` at a line's end or
    ``=XX``: the reading is the same, which is why K1 needs the soft line break."""
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    verdict = proxy.inspect(_with(invite(world, CLEAN, call_id="k1-c2"), QP))
    assert verdict.action == "forward" and verdict.error is None
    assert [(m.address, m.port) for m in verdict.media] == [("127.0.0.1", 40404)]


def test_held_content_encoding_is_not_undone(world):
    """Tried and held: ``Content-Encoding: gzip`` is undone by neither the proxy nor
    pjsip: both read the raw SDP (127.0.0.9 recorded)."""
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    verdict = proxy.inspect(_with(invite(world, QP_SOFT_BREAK, call_id="k1-c3"),
                                  ("Content-Encoding", "gzip")))
    assert verdict.action == "forward" and \
        [(m.address, m.port) for m in verdict.media] == [("127.0.0.9", 40404)]
