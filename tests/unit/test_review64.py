"""A sixty-fourth attacker's review (December 2026) of ef7ffd6: differential parsing,
round two (core vs pjsip, core vs Kamailio).  The wire side is
``tests/kamailio/test_review64_wire.py``.

Hole (``test_hole_a_response_is_unreadable_for_a_via_kamailio_strips``):

- Attacker: an insider UA (the callee, registered behind the home proxy) or an untrusted
  hop between the callee and the proxy.
- Messages: the answer to a request the proxy views (a 200 with a body), with an extra
  parameter ``;x=a&b`` in the top Via - the proxy's own, the one Kamailio removes
  before relaying (a control octet there, ``;x=a<0x01>b``, does the same through
  ``_take_line``: shown on the wire).
- Effect: ``sip.parse`` refuses the whole response (``_check_unambiguous``: an ``&``
  outside quotes in a typed header), so ``kemi.route_reply`` cannot read it and the
  reply goes on unread; Kamailio strips its Via and relays the rest, which the caller's
  own core (and pjsip) reads: delivered, never inspected nor archived (real Kamailio:
  the receipt of a MESSAGE is in no archive row, alice gets the 200).
- At fault: ``kamailio_app/kemi.py`` ``route_reply`` (``_read_message`` outside the
  ``try``; the outer handler lets the response go on unchanged) with
  ``e2m_plugins/sip.py`` ``_check_unambiguous`` run on a header the next hop never gets.
  Fix: drop a response the core cannot read when its method is viewed (as review 57
  drops a second To), or judge the response as relayed (without the proxy's own Via).

What held (run on the real phone, bob with E2M required, a hop's re-INVITE typed
``text/plain`` over a plaintext SRTP offer; not kept as phone tests):

- ``Subject: x`` / ``<SP>c: application/sdp`` (a fold): pjsip folds it too, text/plain,
  415; the core reads one Content-Type (control below).
- ``Subject: x`` / ``<SP>`` (a whitespace-only line) / ``<SP>c: application/sdp``:
  the core folds both lines into Subject; pjsip 2.15 drops the datagram ("syntax error
  exception when parsing '' header"), so no offer is taken (tab form too).
- The same inside a multipart part (``Content-Description: x`` / ``<SP>`` /
  ``<SP>c: application/sdp``): pjsip folds, text/plain, 415.
- ``Content-Type: text/plain;x=[`` with ``Subject: ]&c:application/sdp`` (pjsip's
  ``[...]`` parameter value crossing the line end): pjsip 2.15 refuses the ``[`` in a
  Content-Type parameter (dropped); in a part (``Content-Description: "]&c:..."``):
  415.
- Read only: a body without Content-Type (pjsip makes no body of it); ``Content-Type:
  application;sdp`` (pjsip's media type takes any separator, the core refuses without
  ``/``); RFC 2231 ``boundary*`` (neither stack decodes it); bare CR line ends (the core
  refuses CR in a head line, message and part); ``SIP /2.0`` start lines (the core
  refuses them).

Fixed (stop 31): the proxy reads a response that must be read in Kamailio's core reply
route (``kamailio.read_reply``, kept for tm's reply route), and drops one the core
refuses there, as review 57's second To: never relayed unread.  Review 30's over-long
To tag answer is dropped the same way now (``tests/kamailio/test_review30_wire.py``).
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SRTP_OFFER, ua_engine
from e2m_plugins import sip
from e2m_plugins.body import message_body
from e2m_plugins.errors import MalformedError
from e2m_plugins.testpki import TestPKI, init_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review64-pki"), users=("alice", "bob"),
                         key_type="ec")


def _message_and_receipt(via_param: str) -> tuple[bytes, bytes]:
    """alice's MESSAGE as it left the proxy (the proxy's Via on top) and bob's 200 with a
    receipt, ``via_param`` added to that top Via; returns (what the proxy reads, what
    Kamailio relays: the same without its Via)."""
    msg = sip.make_request("MESSAGE", "sip:bob@127.0.0.1:5070", from_uri="sip:alice@example.com",
                           to_uri="sip:bob@example.com", via_host="127.0.0.1:5999",
                           body=b"hello bob", content_type="text/plain")
    msg = msg.insert("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKproxy1")
    reply = sip.make_response(msg, 200, "OK", body=b"receipt", content_type="text/plain")
    top = reply.get_all("Via")[0]
    wire = reply.serialize()
    at_proxy = wire.replace(top.encode(), (top + via_param).encode(), 1)
    relayed = at_proxy.replace(b"Via: " + (top + via_param).encode() + b"\r\n", b"", 1)
    return at_proxy, relayed


def test_control_the_proxy_reads_an_answer_with_an_ordinary_via_parameter():
    at_proxy, relayed = _message_and_receipt(";x=ab")
    assert sip.parse(at_proxy).body == b"receipt"
    assert sip.parse(relayed, exact=True).body == b"receipt"
    assert len(sip.parse(relayed).get_all("Via")) == 1


def test_hole_a_response_is_unreadable_for_a_via_kamailio_strips():
    """The core's side of the hole: what the caller's stack reads once Kamailio relays
    it, the proxy's core refuses for a Via only the proxy sees.  Fixed at the proxy:
    such a response is dropped in Kamailio's core reply route
    (``tests/kamailio/test_review64_wire.py``), never relayed unread."""
    at_proxy, relayed = _message_and_receipt(";x=a&b")
    assert sip.parse(relayed, exact=True).body == b"receipt"     # alice reads it
    with pytest.raises(MalformedError):
        sip.parse(at_proxy)                                       # the proxy cannot


# -- what held (the core's side) ---------------------------------------------------------

def _reinvite_wire(content_type: str, body: bytes, extra: bytes) -> bytes:
    msg = sip.make_request("INVITE", "sip:bob@127.0.0.1:5070", from_uri="sip:alice@example.com",
                           to_uri="sip:bob@example.com", from_tag="a1", to_tag="b1",
                           extra_headers=[("Content-Type", content_type)])
    return msg.serialize().replace(
        b"Content-Length: 0", extra + b"\r\nContent-Length: %d" % len(body)) + body


@pytest.mark.parametrize("extra", [b"Subject: x\r\n c: application/sdp",
                                   b"Subject: x\r\n \r\n c: application/sdp",
                                   b"Subject: x\r\n\t\r\n\tc: application/sdp"])
def test_control_a_folded_compact_content_type_is_part_of_the_subject(pki, extra):
    """The core folds the continuation into Subject: one Content-Type, text/plain, let
    through (pjsip folds the first form alike, 415; it drops the other two)."""
    msg = sip.parse(_reinvite_wire("text/plain", SRTP_OFFER, extra), exact=True)
    assert msg.get_all("Content-Type") == ["text/plain"]
    assert "c: application/sdp" in (msg.get("Subject") or "")
    assert message_body(msg).content_type.mime_type == "text/plain"
    ua_engine(pki, "bob", peers=("alice",), require_e2m=True).open(msg)


@pytest.mark.parametrize("content_type", ["application;sdp", "application sdp"])
def test_control_a_media_type_without_slash_is_refused(content_type):
    msg = sip.parse(_reinvite_wire(content_type, SRTP_OFFER, b"Subject: x"), exact=True)
    with pytest.raises(MalformedError):
        message_body(msg)


def test_control_a_bare_cr_line_end_is_refused():
    wire = _reinvite_wire("text/plain", SRTP_OFFER, b"Subject: x\rc: application/sdp")
    with pytest.raises(MalformedError):
        sip.parse(wire, exact=True)
